"""`fuse`'s Softmax floor: a masked Softmax reads Max(x, ReduceMax(x) - 80), which keeps ONNX Runtime's
CPU Softmax out of its slow underflow path; the outputs stay equal to within 2e-35."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import op_types, ort_run, parse, run_pass

from onnxopt.passes.fuse import FuseOps

rng = np.random.default_rng(0)


def masked_softmax(opset: int, axis: str = "", mask_op: str = "Add") -> str:
    combine = "masked = Add(s, mask)" if mask_op == "Add" else "masked = Where(keep, s, mask)"
    keep = ", bool[2, 1, 1, 6] keep" if mask_op == "Where" else ""
    return f"""
    <ir_version: 8, opset_import: ["" : {opset}]>
    g (float[2, 3, 6, 6] s, float[2, 1, 1, 6] mask{keep}) => (float[2, 3, 6, 6] y) {{
        {combine}
        y = Softmax{axis}(masked)
    }}
    """


def feeds(mask_value: float, where: bool = False) -> dict[str, np.ndarray]:
    keep = rng.random((2, 1, 1, 6)) < 0.6
    keep[..., 0] = True  # every row keeps one position
    result = {"s": (rng.standard_normal((2, 3, 6, 6)) * 30).astype(np.float32),  # spread past 87: underflow
              "mask": np.where(keep, 0, mask_value).astype(np.float32)}
    if where:
        result["keep"] = keep
    return result


@pytest.mark.parametrize("opset, axis", [(13, ""), (18, ""), (17, "<axis = 3>"), (11, "<axis = -1>"),
                                         (11, "<axis = 3>")])
@pytest.mark.parametrize("mask_value", [-1e4, float(np.finfo(np.float32).min), -np.inf])
def test_a_masked_softmax_gets_its_floor_and_computes_the_same(opset, axis, mask_value):
    model = parse(masked_softmax(opset, axis))
    result = run_pass(FuseOps, model)
    assert result.counts == {"Softmax floor": 1}
    assert op_types(result.model) == ["Add", "ReduceMax", "Sub", "Max", "Softmax"]
    inputs = feeds(mask_value)
    want, got = ort_run(model, inputs)[0], ort_run(result.model, inputs)[0]
    assert np.abs(got - want).max() < 2e-35
    assert want.min() == 0 and got.min() > 1e-37  # it did act: masked entries get e^-80 of their row's top
    assert not run_pass(FuseOps, result.model).changed  # idempotent


def test_a_where_mask_is_floored_too():
    model = parse(masked_softmax(17, mask_op="Where"))
    result = run_pass(FuseOps, model)
    assert result.counts == {"Softmax floor": 1}
    inputs = feeds(-np.inf, where=True)
    assert np.abs(ort_run(result.model, inputs)[0] - ort_run(model, inputs)[0]).max() < 2e-35


def test_what_is_left_alone_unmasked_other_axes_and_the_option():
    plain = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 6] a, float[6, 6] b) => (float[2, 6] y) { s = MatMul(a, b)
        y = Softmax(s) }
    """)
    assert not run_pass(FuseOps, plain).changed  # no mask: the floor would only cost
    classifier = run_pass(FuseOps, parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 6] a, float[6] b) => (float[2, 6] y) { s = Add(a, b)
        y = Softmax(s) }
    """))
    assert not classifier.changed and any("fewer than 3 dims" in s for s in classifier.skipped)
    other_axis = run_pass(FuseOps, parse(masked_softmax(17, "<axis = 1>")))
    assert not other_axis.changed and any("Softmax floor: not over the last axis" in s for s in other_axis.skipped)
    # before opset 13 the default axis 1 means "flatten from axis 1": not the last axis alone
    assert not run_pass(FuseOps, parse(masked_softmax(11))).changed
    assert not run_pass(FuseOps, parse(masked_softmax(17)), softmax_floor=False).changed


# The attention mask as torch's exporter writes it before opset 13: a Reshape to a shape computed at run
# time (here the scores' own), which onnx's shape inference cannot rank; nor then the Add, the Softmax,
# or anything after it (in MiniLM at opset 11: every layer after the first attention).
OPSET11_MASK = """
<ir_version: 6, opset_import: ["" : 11]>
g (float[batch, 3, seq, seq] s, float[n] mask, float[6, 4] w) => (float[batch, 3, seq, 4] y) {
    shape = Shape(s)
    target = Concat<axis = 0>(shape)
    mask4 = Reshape(mask, target)
    masked = Add(s, mask4)
    p = Softmax<axis = 3>(masked)
    y = MatMul(p, w)
}
"""


def test_a_mask_reshaped_to_a_computed_shape_is_ranked_and_floored():
    from onnxopt.graph import infer_value_info

    model = parse(OPSET11_MASK)
    onnx_alone = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
    assert not onnx_alone["masked"].type.tensor_type.HasField("shape")  # the oracle: onnx cannot rank it
    infos = infer_value_info(model)
    assert [len(infos[name].type.tensor_type.shape.dim) for name in ("mask4", "masked", "p")] == [4, 4, 4]
    result = run_pass(FuseOps, model)
    assert result.counts == {"Softmax floor": 1}
    mask = np.where(rng.random((2, 3, 6, 6)) < 0.5, -1e4, 0).astype(np.float32)
    mask[..., 0] = 0
    inputs = {"s": (rng.standard_normal((2, 3, 6, 6)) * 30).astype(np.float32), "mask": mask.reshape(-1),
              "w": rng.standard_normal((6, 4)).astype(np.float32)}
    assert np.allclose(ort_run(result.model, inputs)[0], ort_run(model, inputs)[0], atol=1e-6)
