"""`fuse`'s GELU order: x * (0.5 * (1 + erf(x / sqrt 2))), as torch's dynamo exporter writes it, becomes
(x * (1 + erf(...))) * 0.5, which ONNX Runtime fuses into one Gelu kernel; the outputs stay equal."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import onnx
from conftest import ort_run, parse, run_pass

from onnxopt.passes.fuse import FuseOps

SQRT2 = 1.4142135381698608


def gelu(order: str, extra_reader: bool = False) -> onnx.ModelProto:
    """h = x @ w + b, then an erf GELU in `order`: 'dynamo' x * (0.5 * (1 + erf)), 'torchscript'
    (x * (1 + erf)) * 0.5."""
    tail = {"dynamo": "half = Mul(c05, one_plus)\n y = Mul(h, half)",
            "torchscript": "t = Mul(h, one_plus)\n y = Mul(t, c05)"}[order]
    extra = ", float[2, 8] other" if extra_reader else ""
    other = "\n other = Identity(half)" if extra_reader else ""
    return parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 4] x) => (float[2, 8] y{extra}) <float[4, 8] w = {{{', '.join(str(0.1 * i - 1.5) for i in range(32))}}},
                                                float[8] b = {{0.1, -0.2, 0.3, 0.0, 0.5, -0.6, 0.7, 0.05}},
                                                float sqrt2 = {{{SQRT2}}}, float one = {{1.0}}, float c05 = {{0.5}}> {{
        m = MatMul(x, w)
        h = Add(m, b)
        scaled = Div(h, sqrt2)
        e = Erf(scaled)
        one_plus = Add(e, one)
        {tail}{other}
    }}
    """)


def unoptimized_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Each op as written: what the rewrite itself computes, before ORT fuses anything."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def ort_ops(model: onnx.ModelProto, tmp_path) -> set[str]:
    """The ops ONNX Runtime runs after its own graph optimizations."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}


def test_the_dynamo_order_is_reordered_and_ort_then_fuses_it(tmp_path):
    model = gelu("dynamo")
    assert "Erf" in ort_ops(model, tmp_path)  # the oracle: ORT leaves this order unfused
    result = run_pass(FuseOps, model)
    assert result.counts["erf GELU reordered for ORT's Gelu fusion"] == 1
    assert "Erf" not in ort_ops(result.model, tmp_path) and ort_ops(result.model, tmp_path) & {"Gelu", "BiasGelu"}
    x = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32) * 3}
    np.testing.assert_array_equal(unoptimized_run(result.model, x), unoptimized_run(model, x))
    np.testing.assert_allclose(ort_run(result.model, x)[0], ort_run(model, x)[0], rtol=1e-6, atol=1e-6)  # fused
    assert not run_pass(FuseOps, result.model).changed  # idempotent


def test_what_is_left_alone_the_fused_order_a_shared_half_and_the_option():
    assert not run_pass(FuseOps, gelu("torchscript"), gemm=False).changed
    shared = run_pass(FuseOps, gelu("dynamo", extra_reader=True), gemm=False)
    assert not shared.changed and any("read elsewhere" in s for s in shared.skipped)
    assert not run_pass(FuseOps, gelu("dynamo"), gemm=False, gelu_order=False).changed
