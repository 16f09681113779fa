"""Whether a factorization pays: the layer alone, dense against factored, timed on the run's EP.

Fewer weights are not always less time: two thin GEMMs each pay their own memory traffic and
launch, and a rank near the break-even K * N / (K + N) saves little. Each distinct (op, K, N, rank)
is timed once, as a one-layer model fed each of `ROWS` rows (one short sentence, and a batch of 8
short sentences or a 16x16 feature map) at 1 and 2 threads, with the speed guard's alternating
best-of timing: the factors must pay in every one of these, as the speed guard later asks of the
whole model at batch 1 and 8 (thin GEMMs on a few rows are overhead-bound, and split worse over
threads, in a way 256 rows on 1 thread do not show).
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxopt.guard import SpeedGuard

from .factor import Layer, factor_in_place

ROWS = (8, 256)
THREADS = (1, 2)


def _one_layer(layer: Layer, rows: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A model holding only `layer`'s first node, on random weights of its shapes, and a feed."""
    node = layer.nodes[0]
    k, n = layer.matrix.shape
    rng = np.random.default_rng(0)
    weight = rng.standard_normal(layer.matrix.shape).astype(np.float32)
    if node.op_type == "Conv":  # output positions near `rows`: a 16x16 map for 256, larger for strided Convs
        ints = {a.name: list(a.ints) for a in node.attribute}
        strides, dilations = ints.get("strides") or [1, 1], ints.get("dilations") or [1, 1]
        spans = [d * (k - 1) + 1 for d, k in zip(dilations, layer.kernel)]  # an unpadded map must hold the kernel
        side = max(int(math.ceil(math.sqrt(rows))) * max(strides), *spans)
        x = rng.standard_normal((1, layer.conv_shape[1], side, side)).astype(np.float32)
        weight = weight.T.reshape(layer.conv_shape)
        out_shape = None
    else:
        x = rng.standard_normal((rows, k)).astype(np.float32)
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            weight = weight.T
        out_shape = [rows, n]
    inputs = ["x", node.input[1], *node.input[2:3]]
    inits = [numpy_helper.from_array(weight, node.input[1])]
    if len(node.input) > 2 and node.input[2]:
        inits.append(numpy_helper.from_array(np.zeros(n, np.float32), node.input[2]))
    copy = helper.make_node(node.op_type, inputs, ["y"], name=node.name or "layer")
    copy.attribute.extend(node.attribute)
    graph = helper.make_graph([copy], "one_layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, {"x": x}


class BreakEven:
    """Memoized per-layer timings: `speedup(layer, rank)` is dense time / factored time, the least
    over the rows and threads timed."""

    def __init__(self, guard: SpeedGuard):
        self.guard = guard
        self.measured: dict[tuple, float] = {}

    def speedup(self, layer: Layer, rank: int) -> float:
        conv = [(a.name, tuple(a.ints)) for a in layer.nodes[0].attribute] if layer.nodes[0].op_type == "Conv" else []
        key = (layer.nodes[0].op_type, *layer.matrix.shape, layer.kernel, *conv, rank)
        if key not in self.measured:
            speedups = []
            for rows in ROWS:
                dense, feeds = _one_layer(layer, rows)
                factored = onnx.ModelProto()
                factored.CopyFrom(dense)
                single = Layer(layer.weight, [dense.graph.node[0]], layer.matrix, layer.kernel)
                k, n = layer.matrix.shape
                factor_in_place(factored, single, rank, np.zeros((k, rank), np.float32),
                                np.zeros((rank, n), np.float32))
                factored.graph.initializer.remove(next(t for t in factored.graph.initializer if t.name == layer.weight))
                verdict = self.guard.check(dense, factored, feeds, batches=None, threads=THREADS, min_seconds=0.05,
                                           clear_win=None, decisive=1.3)
                speedups += [check.speedup for check in verdict.checks]
            self.measured[key] = min(speedups)
        return self.measured[key]
