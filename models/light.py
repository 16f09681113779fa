"""Real model topologies that ship inside the ``onnx`` package, with inputs and reference outputs.

``light_case`` gives the onnx "light" models (ResNet-50, DenseNet-121, ... with light weights) fed
exactly as onnx's backend test runner feeds them (``generate_dummy_data(random=False)``), with the
reference outputs stored next to them. ``node_cases`` gives the pytorch-converted and
pytorch-operator backend test cases (model plus ``test_data_set_*`` protobufs), restricted to those
onnxruntime can load and reproduce; the others are listed, with the reason, in ``ORT_UNSUPPORTED``.
Nothing is built: all files are read from the installed onnx package.

The light models are opset 9 and carry no real weights: every weight is a ``ConstantOfShape`` node
(value 0.02) fed by a shape initializer, so the reference outputs are near-uniform (softmax 0.001)
and constant-folding them materialises the full weights (e.g. 144M floats for vgg19).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ONNX_DATA = Path(onnx.__file__).parent / "backend/test/data"
LIGHT_DIR = ONNX_DATA / "light"
NODE_KINDS = ("pytorch-converted", "pytorch-operator")

RTOL, ATOL = 1e-3, 1e-7
NODE_RTOL, NODE_ATOL = 1e-3, 1e-5
LIGHT_TOLERANCE: dict[str, tuple[float, float]] = {"densenet121": (2e-3, 1e-7)}

ORT_UNSUPPORTED: dict[str, str] = {
    "test_AvgPool1d": "onnxruntime has no kernel for AveragePool-1 (model opset 6)",
    "test_AvgPool1d_stride": "onnxruntime has no kernel for AveragePool-1 (model opset 6)",
    "test_AvgPool2d": "onnxruntime has no kernel for AveragePool-1 (model opset 6)",
    "test_AvgPool2d_stride": "onnxruntime has no kernel for AveragePool-1 (model opset 6)",
    "test_AvgPool3d": "onnxruntime has no kernel for AveragePool-1 (model opset 6)",
    "test_AvgPool3d_stride": "onnxruntime has no kernel for AveragePool-1 (model opset 6)",
    "test_AvgPool3d_stride1_pad0_gpu_input": "onnxruntime has no kernel for AveragePool-1 (model opset 6)",
    "test_BatchNorm1d_3d_input_eval": "onnxruntime has no kernel for BatchNormalization-6 (model opset 6)",
    "test_BatchNorm2d_eval": "onnxruntime has no kernel for BatchNormalization-6 (model opset 6)",
    "test_BatchNorm2d_momentum_eval": "onnxruntime has no kernel for BatchNormalization-6 (model opset 6)",
    "test_BatchNorm3d_eval": "onnxruntime has no kernel for BatchNormalization-6 (model opset 6)",
    "test_BatchNorm3d_momentum_eval": "onnxruntime has no kernel for BatchNormalization-6 (model opset 6)",
    "test_GLU": "onnxruntime has no kernel for Mul-6 (model opset 6)",
    "test_GLU_dim": "onnxruntime has no kernel for Mul-6 (model opset 6)",
    "test_Linear": "onnxruntime has no kernel for Gemm-6 (model opset 6)",
    "test_PReLU_1d": "onnxruntime has no kernel for PRelu-6 (model opset 6)",
    "test_PReLU_1d_multiparam": "onnxruntime has no kernel for PRelu-6 (model opset 6)",
    "test_PReLU_2d": "onnxruntime has no kernel for PRelu-6 (model opset 6)",
    "test_PReLU_2d_multiparam": "onnxruntime has no kernel for PRelu-6 (model opset 6)",
    "test_PReLU_3d": "onnxruntime has no kernel for PRelu-6 (model opset 6)",
    "test_PReLU_3d_multiparam": "onnxruntime has no kernel for PRelu-6 (model opset 6)",
    "test_PoissonNLLLLoss_no_reduce": "onnxruntime has no kernel for Mul-6 (model opset 6)",
    "test_Softsign": "onnxruntime has no kernel for Add-6 (model opset 6)",
    "test_operator_add_broadcast": "onnxruntime has no kernel for Add-6 (model opset 6)",
    "test_operator_add_size1_broadcast": "onnxruntime has no kernel for Add-6 (model opset 6)",
    "test_operator_add_size1_right_broadcast": "onnxruntime has no kernel for Add-6 (model opset 6)",
    "test_operator_add_size1_singleton_broadcast": "onnxruntime has no kernel for Add-6 (model opset 6)",
    "test_operator_addconstant": "onnxruntime has no kernel for Add-6 (model opset 6)",
    "test_operator_addmm": "onnxruntime has no kernel for Gemm-6 (model opset 6)",
    "test_operator_basic": "onnxruntime has no kernel for Add-6 (model opset 6)",
    "test_operator_mm": "onnxruntime has no kernel for Gemm-6 (model opset 6)",
    "test_operator_non_float_params": "onnxruntime has no kernel for Add-6 (model opset 6)",
    "test_operator_params": "onnxruntime has no kernel for Add-6 (model opset 6)",
    "test_operator_pow": "onnxruntime has no kernel for Pow-1 (model opset 6)",
}

Case = tuple[dict[str, np.ndarray], list[np.ndarray]]


def light_models() -> list[str]:
    """Names of the light models, e.g. ``resnet50`` (file ``light/light_resnet50.onnx``)."""
    return sorted(p.stem[len("light_"):] for p in LIGHT_DIR.glob("light_*.onnx"))


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {init.name for init in model.graph.initializer}
    return [x for x in model.graph.input if x.name not in inits]


def dummy_input(value_info: onnx.ValueInfoProto) -> np.ndarray:
    """onnx's backend runner input: dynamic dims set to 1, ``arange(n).reshape(shape) / n`` as float32."""
    dims = value_info.type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in dims)
    n = int(np.prod(shape))
    return (np.arange(n).reshape(shape) / n).astype(np.float32)


def tolerance(name: str) -> tuple[float, float]:
    """(rtol, atol) onnx's backend tests use for light model `name`; onnxruntime 1.32 matches bit-exactly."""
    return LIGHT_TOLERANCE.get(name, (RTOL, ATOL))


def light_case(name: str) -> tuple[Path, dict[str, np.ndarray], list[np.ndarray]]:
    """(model path, feeds, expected outputs) for light model `name`."""
    path = LIGHT_DIR / f"light_{name}.onnx"
    if not path.exists():
        raise KeyError(f"unknown light model {name!r}; known: {light_models()}")
    model = onnx.load(str(path), load_external_data=False)
    feeds = {x.name: dummy_input(x) for x in _graph_inputs(model)}
    expected = [_load_tensor(LIGHT_DIR / f"light_{name}_output_{i}.pb") for i in range(len(model.graph.output))]
    return path, feeds, expected


def _load_tensor(path: Path) -> np.ndarray:
    tensor = onnx.TensorProto()
    tensor.ParseFromString(path.read_bytes())
    return numpy_helper.to_array(tensor)


def _data_sets(case_dir: Path, input_names: list[str]) -> list[Case]:
    sets = []
    for data_dir in sorted(case_dir.glob("test_data_set_*")):
        inputs = [_load_tensor(p) for p in sorted(data_dir.glob("input_*.pb"), key=_index)]
        outputs = [_load_tensor(p) for p in sorted(data_dir.glob("output_*.pb"), key=_index)]
        sets.append((dict(zip(input_names, inputs, strict=True)), outputs))
    return sets


def _index(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1])


def all_node_cases(kind: str) -> list[tuple[str, Path, list[Case]]]:
    """Every case of `kind` (``pytorch-converted`` or ``pytorch-operator``), ORT-supported or not."""
    if kind not in NODE_KINDS:
        raise ValueError(f"kind must be one of {NODE_KINDS}, not {kind!r}")
    cases = []
    for case_dir in sorted((ONNX_DATA / kind).iterdir()):
        path = case_dir / "model.onnx"
        if not path.exists():
            continue
        names = [x.name for x in _graph_inputs(onnx.load(str(path), load_external_data=False))]
        cases.append((case_dir.name, path, _data_sets(case_dir, names)))
    return cases


def node_cases(kind: str) -> list[tuple[str, Path, list[Case]]]:
    """Cases of `kind` as (case name, model path, [(feeds, expected outputs), ...]), minus ``ORT_UNSUPPORTED``."""
    return [case for case in all_node_cases(kind) if case[0] not in ORT_UNSUPPORTED]


def check_with_ort(model_path: Path, cases: list[Case], rtol: float, atol: float) -> float:
    """Run `cases` with onnxruntime; returns the max abs error, raises AssertionError past (rtol, atol)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for feeds, expected in cases:
        for got, want in zip(sess.run(None, feeds), expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=str(model_path))
            worst = max(worst, float(np.abs(got - want).max()) if got.size else 0.0)
    return worst


if __name__ == "__main__":
    import time

    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    for name in light_models():
        start = time.perf_counter()
        path, feeds, expected = light_case(name)
        err = check_with_ort(path, [(feeds, expected)], *tolerance(name))
        print(f"light {name:13s} opset {onnx.load(str(path)).opset_import[0].version} "
              f"max|err| {err:.2g} at (rtol, atol) {tolerance(name)} in {time.perf_counter() - start:.1f}s")
    for kind in NODE_KINDS:
        cases = node_cases(kind)
        for _, path, data in cases:
            check_with_ort(path, data, NODE_RTOL, NODE_ATOL)
        total = len(all_node_cases(kind))
        print(f"{kind}: {len(cases)}/{total} cases run and match on onnxruntime "
              f"{ort.__version__} (rtol {NODE_RTOL}, atol {NODE_ATOL}); {total - len(cases)} unsupported")
