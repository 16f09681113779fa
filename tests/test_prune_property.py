"""A property of `prune`: on any small graph built from the blocks real CNNs and MLPs use (convs,
depthwise convs, residual Adds, Concats, upsampling Resizes, MatMul/Gemm chains), at any ratio, the pruned model is
valid, loads in ONNX Runtime, keeps its output shapes and has no more weights than before."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import ort_run
from onnx import TensorProto, helper, numpy_helper

import onnxopt

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BLOCKS = ("conv", "depthwise", "residual", "concat", "upsample")


class Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.count = [], [], 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}{self.count}"

    def weight(self, shape, fan_in) -> str:
        name = self.name("w")
        self.inits.append(numpy_helper.from_array((self.rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name))
        return name

    def bias(self, n) -> str:
        name = self.name("b")
        self.inits.append(numpy_helper.from_array((0.1 * self.rng.standard_normal(n)).astype(np.float32), name))
        return name

    def node(self, op, inputs, **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name("n"), **attrs))
        return out

    def conv(self, x, cin, cout, k=3, group=1) -> str:
        w = self.weight((cout, cin // group, k, k), cin * k * k // group)
        y = self.node("Conv", [x, w, self.bias(cout)], kernel_shape=[k, k], pads=[k // 2] * 4, group=group)
        return self.node("Relu", [y])


def cnn(blocks: list[tuple[str, int]], seed: int) -> onnx.ModelProto:
    b = Builder(seed)
    x, channels = b.conv("x", 3, 8), 8
    for kind, width in blocks:
        if kind == "conv":
            x, channels = b.conv(x, channels, width), width
        elif kind == "depthwise":
            x = b.conv(x, channels, channels, group=channels)
        elif kind == "residual":
            inner = b.conv(x, channels, width)
            x = b.node("Relu", [b.node("Add", [x, b.conv(inner, width, channels)])])
        elif kind == "upsample":  # a U-Net's Resize by constant scales, pooled back to the same size
            scales = b.name("scales")
            b.inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), scales))
            x = b.node("MaxPool", [b.conv(b.node("Resize", [x, "", scales]), channels, width)], kernel_shape=[2, 2],
                       strides=[2, 2])
            channels = width
        else:
            side = b.conv(x, channels, width, k=1)
            x, channels = b.node("Concat", [x, side], axis=1), channels + width
    flat = b.node("ReduceMean", [x], axes=[2, 3], keepdims=0) if seed % 2 else \
        b.node("Flatten", [b.node("GlobalAveragePool", [x])])  # x.mean((2, 3)) or a global pool
    y = b.node("Gemm", [flat, b.weight((5, channels), channels), b.bias(5)], transB=1)
    b.nodes[-1].output[0] = "y"
    return _model(b, ["N", 3, 6, 6], ["N", 5], y)


def mlp(widths: list[int], seed: int) -> onnx.ModelProto:
    b = Builder(seed)
    x, n = "x", 12
    for width in widths:
        x = b.node("Relu", [b.node("Add", [b.node("MatMul", [x, b.weight((n, width), n)]), b.bias(width)])])
        n = width
    b.node("MatMul", [x, b.weight((n, 4), n)])
    b.nodes[-1].output[0] = "y"
    return _model(b, ["N", 12], ["N", 4], "y")


def _model(b: Builder, x_shape, y_shape, _y) -> onnx.ModelProto:
    graph = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def weight_count(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT)


widths = st.sampled_from([4, 8, 12, 16])
graphs = st.one_of(
    st.builds(cnn, st.lists(st.tuples(st.sampled_from(BLOCKS), widths), min_size=1, max_size=4), st.integers(0, 99)),
    st.builds(mlp, st.lists(widths, min_size=1, max_size=3), st.integers(0, 99)),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=graphs, ratio=st.floats(0.0, 0.9), with_data=st.booleans())
def test_any_ratio_on_any_small_graph_keeps_it_valid(model, ratio, with_data):
    shape = [4, 3, 6, 6] if model.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 3 else [4, 12]
    data = {"x": np.random.default_rng(1).standard_normal([32, *shape[1:]]).astype(np.float32)}
    spec = f"prune:ratio={ratio},round_to=1,keep_if_slower=false"
    pruned, _ = onnxopt.optimize(model, spec, calib=data if with_data else None, compare=False, runs=0)
    onnx.checker.check_model(pruned, full_check=True)
    feeds = {"x": data["x"][:shape[0]]}
    assert [o.shape for o in ort_run(pruned, feeds)] == [o.shape for o in ort_run(model, feeds)]
    assert weight_count(pruned) <= weight_count(model)
