"""The `fuse` pass: Conv/ConvTranspose + BatchNormalization, MatMul + Add -> Gemm."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import assert_same_outputs, op_types, run_pass
from onnx import TensorProto, helper, numpy_helper

from onnxopt.passes.fuse import FuseOps

rng = np.random.default_rng(0)


def conv_bn_model(op: str = "Conv", group: int = 1, with_bias: bool = True, weight_is_input: bool = False,
                  training: bool = False) -> onnx.ModelProto:
    cin, cout = 4, 6
    if op == "Conv":
        w = rng.standard_normal((cout, cin // group, 3, 3)).astype(np.float32)
    else:
        w = rng.standard_normal((cin, cout // group, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), n) for n in ("scale", "shift", "mean")]
    inits.append(numpy_helper.from_array(rng.uniform(0.5, 2, cout).astype(np.float32), "var"))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, cin, 8, 8])]
    if weight_is_input:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, list(w.shape)))
    else:
        inits.append(numpy_helper.from_array(w, "w"))
    conv_inputs = ["x", "w"]
    if with_bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "b"))
        conv_inputs.append("b")
    nodes = [
        helper.make_node(op, conv_inputs, ["c"], group=group, pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["bn"], epsilon=1e-3,
                         **({"training_mode": 1} if training else {})),
        helper.make_node("Relu", ["bn"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("op,group,with_bias", [
    ("Conv", 1, True), ("Conv", 2, False), ("ConvTranspose", 1, True), ("ConvTranspose", 2, True),
])
def test_conv_batchnorm_folds_exactly(op, group, with_bias):
    model = conv_bn_model(op, group, with_bias)
    result = run_pass(FuseOps, model)
    assert result.changed
    assert op_types(result.model) == [op, "Relu"]
    assert result.counts == {f"{op}+BatchNormalization": 1}
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    assert_same_outputs(model, result.model, {"x": x}, rtol=1e-5, atol=1e-5)
    # the unfused weights are gone: no dead parameters left behind
    assert {t.name for t in result.model.graph.initializer} == set(result.model.graph.node[0].input[1:])


def test_conv_with_runtime_weight_is_left_alone_with_reason():
    result = run_pass(FuseOps, conv_bn_model(weight_is_input=True))
    assert not result.changed
    assert any("weight is not constant" in s for s in result.skipped)


def test_conv_feeding_two_consumers_is_left_alone():
    model = conv_bn_model()
    model.graph.output.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, None))
    assert not run_pass(FuseOps, model).changed


def test_idempotent():
    once = run_pass(FuseOps, conv_bn_model()).model
    twice = run_pass(FuseOps, once)
    assert not twice.changed
    assert twice.model.SerializeToString() == once.SerializeToString()


def matmul_add_model(a_shape, bias_shape) -> onnx.ModelProto:
    k, n = a_shape[-1], 5
    inits = [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(bias_shape).astype(np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["a", "w"], ["m"]), helper.make_node("Add", ["b", "m"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("bias_shape", [(5,), (1, 5)])
def test_matmul_add_becomes_gemm(bias_shape):
    model = matmul_add_model((3, 4), bias_shape)
    result = run_pass(FuseOps, model)
    assert op_types(result.model) == ["Gemm"]
    assert_same_outputs(model, result.model, {"a": rng.standard_normal((3, 4)).astype(np.float32)})


@pytest.mark.parametrize("a_shape,bias_shape,reason", [
    ((2, 3, 4), (5,), "not 2-D"),
    ((3, 4), (3, 5), "broadcast as one row"),
])
def test_matmul_add_left_alone_when_gemm_cannot_express_it(a_shape, bias_shape, reason):
    result = run_pass(FuseOps, matmul_add_model(a_shape, bias_shape))
    assert not result.changed
    assert any(reason in s for s in result.skipped)


def test_training_mode_batchnorm_is_left_alone():
    model = conv_bn_model()
    model.opset_import[0].version = 15
    for attr in ("training_mode",):
        model.graph.node[1].attribute.append(helper.make_attribute(attr, 1))
    result = run_pass(FuseOps, model)
    assert not result.changed
    assert any("training mode" in s for s in result.skipped)


def affine_model(producer: str, op: str, const_shape) -> onnx.ModelProto:
    c = 6
    value = rng.uniform(0.5, 1.5, const_shape).astype(np.float32)
    inits = [numpy_helper.from_array(value, "a")]
    if producer == "Conv":
        inits += [numpy_helper.from_array(rng.standard_normal((c, 4, 3, 3)).astype(np.float32), "w")]
        first = helper.make_node("Conv", ["x", "w"], ["p"], pads=[1, 1, 1, 1])
    else:
        for n in ("scale", "shift", "mean"):
            inits.append(numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), n))
        inits.append(numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "var"))
        first = helper.make_node("BatchNormalization", ["x", "scale", "shift", "mean", "var"], ["p"])
    cin = 4 if producer == "Conv" else c
    nodes = [first, helper.make_node(op, ["p", "a"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, cin, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("producer", ["Conv", "BatchNormalization"])
@pytest.mark.parametrize("op", ["Mul", "Add"])
@pytest.mark.parametrize("shape", [(6, 1, 1), (1, 6, 1, 1), (1,)])
def test_per_channel_affine_folds_into_producer(producer, op, shape):
    model = affine_model(producer, op, shape)
    result = run_pass(FuseOps, model)
    assert [n.op_type for n in result.model.graph.node] == [producer]
    assert result.counts == {f"{producer}+{op}": 1}
    cin = 4 if producer == "Conv" else 6
    assert_same_outputs(model, result.model, {"x": rng.standard_normal((2, cin, 5, 5)).astype(np.float32)},
                        rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(6,), (5, 5), (1, 6, 5, 1)])
def test_affine_that_is_not_per_channel_is_left_alone(shape):
    result = run_pass(FuseOps, affine_model("Conv", "Mul", shape))
    assert not result.changed
    assert any("not per channel" in s for s in result.skipped)
