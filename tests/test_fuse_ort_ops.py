"""`fuse`'s rules for ONNX Runtime's CPU EP: a residual Add before LayerNormalization as Sum, and ORT's own
SkipLayerNormalization and Attention (from its transformer optimizer) as ONNX ops. Each rewrite must
compute what the fused op computes under ORT, and ORT must then not fuse it back."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import op_types, ort_run, run_pass
from onnx import TensorProto, helper, numpy_helper

from onnxopt.manager import copy_model
from onnxopt.options import build_options
from onnxopt.pass_api import PassContext
from onnxopt.passes.fuse import FuseOps

rng = np.random.default_rng(0)
BATCH, SEQ, HIDDEN, HEADS = 2, 6, 8, 2


def tensor(name: str, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def weight(name: str, *shape) -> onnx.TensorProto:
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def model_of(nodes, inputs, outputs, initializers, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])


def ort_ops(model: onnx.ModelProto, tmp_path) -> list[str]:
    """The ops ORT's CPU EP runs after its own graph optimizations."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "ort.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def fuse(model: onnx.ModelProto, ep: str = "cpu", **options):
    return FuseOps(build_options("fuse", FuseOps.Options, options)).run(copy_model(model), PassContext(ep=ep))


def residual_layernorm() -> onnx.ModelProto:
    """x @ W + b + x, then LayerNormalization: a transformer's residual, shapes declared."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["biased"]),
             helper.make_node("Add", ["biased", "x"], ["residual"]),
             helper.make_node("LayerNormalization", ["residual", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12)]
    return model_of(nodes, [tensor("x", ["batch", "sequence", HIDDEN])], [tensor("y", ["batch", "sequence", HIDDEN])],
                    [weight("w", HIDDEN, HIDDEN), weight("b", HIDDEN), weight("gamma", HIDDEN), weight("beta", HIDDEN)])


def feeds_x() -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal((BATCH, SEQ, HIDDEN)).astype(np.float32)}


def test_a_residual_add_before_layernorm_becomes_sum_and_ort_keeps_it_unfused(tmp_path):
    model = residual_layernorm()
    assert "SkipLayerNormalization" in ort_ops(model, tmp_path)  # the oracle: what ORT does unhelped
    result = fuse(model)
    assert result.counts.get("residual Add before LayerNormalization -> Sum") == 1
    assert op_types(result.model) == ["MatMul", "Add", "Sum", "LayerNormalization"]  # the bias Add stays
    assert "SkipLayerNormalization" not in ort_ops(result.model, tmp_path)
    inputs = feeds_x()
    np.testing.assert_allclose(ort_run(result.model, inputs)[0], ort_run(model, inputs)[0], rtol=1e-5, atol=1e-5)
    assert not fuse(result.model).counts.get("residual Add before LayerNormalization -> Sum")  # idempotent
    assert "Sum" not in op_types(fuse(model, ep="cuda").model)  # other EPs: their fused kernel is fast
    assert "Sum" not in op_types(fuse(model, skip_layernorm="keep").model)


def skip_layernorm(bias: bool, beta: bool, sum_output: bool, opset: int = 17) -> onnx.ModelProto:
    inputs = ["x", "skip", "gamma", "beta" if beta else ""] + (["bias"] if bias else [])
    outputs = ["y", "", "", "total"] if sum_output else ["y"]
    nodes = [helper.make_node("SkipLayerNormalization", inputs, outputs, domain="com.microsoft", epsilon=1e-5)]
    graph_outputs = [tensor("y", [BATCH, SEQ, HIDDEN])] + ([tensor("total", [BATCH, SEQ, HIDDEN])] if sum_output else [])
    return model_of(nodes, [tensor("x", [BATCH, SEQ, HIDDEN]), tensor("skip", [BATCH, SEQ, HIDDEN])], graph_outputs,
                    [weight("gamma", HIDDEN), weight("beta", HIDDEN), weight("bias", HIDDEN)], opset)


@pytest.mark.parametrize("bias, beta, sum_output", [(True, True, False), (False, True, False), (True, False, True)])
def test_ort_skip_layernorm_is_written_as_onnx_ops_computing_the_same(bias, beta, sum_output, tmp_path):
    model = skip_layernorm(bias, beta, sum_output)
    result = fuse(model)
    assert result.counts == {"com.microsoft SkipLayerNormalization -> Add, Sum, LayerNormalization": 1}
    assert op_types(result.model) == ["Add"] * bias + ["Sum", "LayerNormalization"]
    assert "SkipLayerNormalization" not in ort_ops(result.model, tmp_path)
    inputs = {**feeds_x(), "skip": rng.standard_normal((BATCH, SEQ, HIDDEN)).astype(np.float32)}
    for got, want in zip(ort_run(result.model, inputs), ort_run(model, inputs), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_skip_layernorm_is_kept_before_opset_17_and_where_its_statistics_are_read():
    old = fuse(skip_layernorm(True, True, False, opset=16))
    assert not old.changed and any("needs opset 17" in s for s in old.skipped)
    model = skip_layernorm(True, True, False)
    model.graph.node[0].output[:] = ["y", "mean"]
    model.graph.output.append(tensor("mean", None))
    kept = fuse(model)
    assert not kept.changed and any("mean or inverse standard deviation" in s for s in kept.skipped)


def attention_model(mask: str, opset: int = 17, **attributes) -> onnx.ModelProto:
    """Attention over `x` (or over EmbedLayerNormalization's output for mask="lengths").
    mask: "none", "raw" (a [batch, sequence] int32 input), "lengths" (EmbedLayerNormalization's
    mask_index), "1d" (a [batch] graph input: start and end positions cannot be told apart)."""
    inits = [weight("qkv_weight", HIDDEN, 3 * HIDDEN), weight("qkv_bias", 3 * HIDDEN)]
    inputs, nodes, x = [], [], "x"
    if mask == "lengths":
        inits += [weight("words", 20, HIDDEN), weight("positions", 16, HIDDEN), weight("segments", 2, HIDDEN),
                  weight("gamma", HIDDEN), weight("beta", HIDDEN)]
        inputs += [tensor(n, ["batch", "sequence"], TensorProto.INT32) for n in ("ids", "segment_ids", "attention_mask")]
        nodes.append(helper.make_node("EmbedLayerNormalization", ["ids", "segment_ids", "words", "positions", "segments",
                                                                  "gamma", "beta", "attention_mask"],
                                      ["embedded", "mask_index"], domain="com.microsoft", epsilon=1e-12))
        x, mask_input = "embedded", "mask_index"
    else:
        inputs.append(tensor("x", ["batch", "sequence", HIDDEN]))
        mask_input = {"none": "", "raw": "attention_mask", "1d": "lengths"}[mask]
        if mask == "raw":
            inputs.append(tensor("attention_mask", ["batch", "sequence"], TensorProto.INT32))
        if mask == "1d":
            inputs.append(tensor("lengths", ["batch"], TensorProto.INT32))
    nodes.append(helper.make_node("Attention", [x, "qkv_weight", "qkv_bias"] + ([mask_input] if mask_input else []),
                                  ["y"], domain="com.microsoft", num_heads=HEADS, **attributes))
    return model_of(nodes, inputs, [tensor("y", ["batch", "sequence", HIDDEN])], inits, opset)


def attention_feeds() -> dict[str, np.ndarray]:
    lengths = np.array([SEQ, 3])  # the second sequence padded after 3 tokens
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int32)
    return {"x": (rng.standard_normal((BATCH, SEQ, HIDDEN)) * 3).astype(np.float32), "attention_mask": mask,
            "ids": rng.integers(0, 20, (BATCH, SEQ)).astype(np.int32), "segment_ids": np.zeros((BATCH, SEQ), np.int32)}


@pytest.mark.parametrize("mask", ["none", "raw", "lengths"])
@pytest.mark.parametrize("opset", [12, 17])
def test_ort_attention_is_written_as_onnx_ops_computing_the_same(mask, opset, tmp_path):
    model = attention_model(mask, opset)
    result = fuse(model)
    assert result.counts.get("com.microsoft Attention -> ONNX ops") == 1
    assert "Attention" not in op_types(result.model) and "Attention" not in ort_ops(result.model, tmp_path)
    assert op_types(result.model).count("MatMul") == 5  # Q, K, V, scores, context: quant and prune see them
    inputs = attention_feeds()
    want = ort_run(model, inputs)[0]
    np.testing.assert_allclose(ort_run(result.model, inputs)[0], want, rtol=1e-4, atol=1e-5)
    if mask != "none":  # the oracle: the mask matters here, so a rewrite that dropped it would fail
        unmasked = ort_run(attention_model("none"), {"x": inputs["x"]})[0]
        assert mask == "lengths" or np.abs(unmasked[1] - want[1]).max() > 1e-2


def test_the_rewritten_attention_gets_the_softmax_floor_on_the_next_round():
    once = fuse(attention_model("raw"))
    again = fuse(once.model)
    assert again.counts == {"Softmax floor": 1}


@pytest.mark.parametrize("model, why", [
    (attention_model("raw", unidirectional=1), "causal or rotary"),
    (attention_model("1d"), "mask_index is neither"),
    (attention_model("raw", opset=10), "needs opset 11"),
])
def test_what_attention_rewrite_leaves_alone(model, why):
    result = fuse(model)
    assert "Attention" in op_types(result.model) and any(why in s for s in result.skipped), result.skipped


def test_attention_is_kept_for_other_eps_and_on_request():
    model = attention_model("raw")
    assert "Attention" in op_types(fuse(model, ep="cuda").model)
    assert "Attention" in op_types(fuse(model, ort_attention="keep").model)
    assert "Attention" not in op_types(fuse(model, ep="cuda", ort_attention="onnx").model)


def test_a_float16_attention_is_written_in_float16(tmp_path):
    model = attention_model("raw")
    for tensor_ in model.graph.initializer:
        tensor_.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor_).astype(np.float16), tensor_.name))
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    result = fuse(model)
    assert result.counts.get("com.microsoft Attention -> ONNX ops") == 1
    inputs = attention_feeds()
    inputs["x"] = inputs["x"].astype(np.float16)
    got, want = ort_run(result.model, inputs)[0], ort_run(model, inputs)[0]
    error = np.abs(got.astype(np.float32) - want.astype(np.float32)).max()
    assert got.dtype == np.float16 and error <= 1e-2 * np.abs(want.astype(np.float32)).max()  # float16's precision
