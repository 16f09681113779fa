"""What removing a unit saves: multiply-adds per call, for `min_speedup`'s cost model.

A Conv/Gemm/MatMul costs one multiply-add per weight per output position (a Conv's output pixels
times the batch, a MatMul's rows), so a unit of a group saves, in each layer whose weight it slices,
the weights it holds there times that layer's output positions. The positions are read off the
layers' outputs on one batch of representative data, which also settles shapes inference leaves
symbolic. Products of two activations (attention scores) are not counted: the cost is an estimate
that the speed goal corrects by timing (`onnxopt.budget.to_speedup`).
"""
from __future__ import annotations

import numpy as np
import onnx

from onnxopt.fetch import fetching_session
from onnxopt.graph import GraphView
from onnxopt.validation import run

from .units import Group

LAYERS = ("Conv", "Gemm", "MatMul")


def multiply_adds(model: onnx.ModelProto, view: GraphView, groups: list[Group],
                  feeds: dict[str, np.ndarray]) -> tuple[list[int], int]:
    """Per group, the multiply-adds one of its units costs per call on `feeds`; and the model's total
    in the layers with a constant weight."""
    weighted = []  # (layer, which input is its weight): B first; a MatMul may hold it as A (W @ x)
    for node in model.graph.node:
        candidates = (1, 0) if node.op_type == "MatMul" else (1,) if node.op_type in LAYERS else ()
        index = next((i for i in candidates if len(node.input) > i and _matrix(view, node.input[i]) is not None), None)
        if index is not None:
            weighted.append((node, index))
    session, fetch = fetching_session(model, [node.output[0] for node, _ in weighted])
    values = dict(zip([o.name for o in session.get_outputs()], run(session, feeds)))
    positions: dict[str, int] = {}  # weight -> multiply-adds per weight element (summed over the layers reading it)
    total = 0
    for node, index in weighted:
        out = values.get(fetch.get(node.output[0]))
        if out is None or np.ndim(out) < 2:
            continue
        # the axis of the output the weight's own output channels make: a Conv's channels, the
        # columns of x @ W, the rows of W @ x
        axis = 1 if node.op_type == "Conv" else (-1 if index == 1 else -2)
        weight = node.input[index]
        positions[weight] = positions.get(weight, 0) + out.size // max(out.shape[axis], 1)
        total += out.size // max(out.shape[axis], 1) * _matrix(view, weight).size
    per_unit = []
    for group in groups:
        cost = 0
        for member in group.members:  # weights of layers: "in", "out", and a depthwise Conv's ("param")
            weight = _matrix(view, member.slot.tensor) if member.slot.tensor in positions else None
            if weight is not None:
                cost += positions[member.slot.tensor] * member.width * (weight.size // weight.shape[member.slot.axis])
        per_unit.append(cost)
    return per_unit, total


def _matrix(view: GraphView, name: str) -> np.ndarray | None:
    value = view.constant(name)
    return value if value is not None and value.ndim >= 2 else None
