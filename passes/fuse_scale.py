"""Folding a multiplication by a scalar constant into the constants of the linear ops before it.

Attention exports scale the scores: Mul(MatMul(Q, K^T), 1/sqrt(d)) (or Div by sqrt(d)). Every op on
the way back from the scores to a weight is linear in the tensor that carries the scale, so the
scalar moves into the weight: with Q = Transpose(Reshape(MatMul(h, Wq) + bq)),
    MatMul(Q, K^T) * c = MatMul(Transpose(Reshape(MatMul(h, Wq c) + bq c)), K^T).
ORT fuses such a Mul into its float MatMul kernel but cannot once the MatMul is quantized; there the
Mul costs a pass over [batch, heads, seq, seq] floats (3.2 ms a layer on MiniLM at batch 8, seq 128).

Walking back from the scaled tensor (each tensor on the way must have no other reader):
  Transpose, Reshape, Squeeze, Unsqueeze, Flatten   carry the scale to their input
  MatMul        absorbs it in a constant operand, else carries it to one operand
  Add, Sub      scale a constant operand and carry it to the other (or to both)
  Mul           absorbs it in a constant operand
  Gemm          absorbs it in alpha and beta
  Conv, ConvTranspose  absorb it in the constant weight and bias
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxopt.graph import GraphView, NameGenerator
from onnxopt.rewrite import Match, Replacement

CARRIERS = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}
MAX_DEPTH = 12
# (node, what changes): a tuple of input indices whose constants are scaled, or "alpha" for Gemm
Edit = tuple[onnx.NodeProto, object]


def _float_constant(view: GraphView, name: str) -> np.ndarray | None:
    value = view.constant(name) if name else None
    return value if value is not None and np.issubdtype(value.dtype, np.floating) else None


class ScalarIntoLinear:
    """Mul/Div by a scalar constant, folded into the linear ops producing the other operand."""

    def __init__(self, op: str):
        self.op = op
        self.name = f"{op}(scalar)->linear constants"

    def match(self, node, view: GraphView) -> Match | None:
        if node.op_type != self.op or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            return None
        sides = (1,) if self.op == "Div" else (1, 0)
        index = next((i for i in sides if (v := _float_constant(view, node.input[i])) is not None and v.size == 1), None)
        if index is None or node.input[0] == node.input[1]:
            return None
        scalar = float(view.constant(node.input[index]).reshape(()))
        factor = 1.0 / scalar if self.op == "Div" else scalar
        edits = _absorb(view, node.input[1 - index], node, 0)
        if isinstance(edits, str):
            return Match([node], {"reason": edits})
        order = {id(n): i for i, n in enumerate(view.graph.node)}
        chain = sorted({id(n): n for n, _ in edits}.values(), key=lambda n: order[id(n)])
        return Match(chain + [node], {"edits": edits, "factor": factor, "scaled": node, "input": node.input[1 - index]})

    def check(self, match: Match, view: GraphView) -> str | None:
        if "reason" in match.values:
            return match.values["reason"]
        factor = match.values["factor"]
        return None if np.isfinite(factor) and factor != 0 else "the scalar is 0 or not finite"

    def replace(self, match: Match, view: GraphView, names: NameGenerator) -> Replacement:
        factor, scaled_node = match.values["factor"], match.values["scaled"]
        copies = {}
        for node in match.nodes[:-1]:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copies[id(node)] = copy
        initializers = []
        for node, what in match.values["edits"]:
            copy = copies[id(node)]
            if what == "alpha":
                for name in ("alpha", "beta"):
                    old = next((a.f for a in copy.attribute if a.name == name), 1.0)
                    kept = [a for a in copy.attribute if a.name != name]
                    del copy.attribute[:]
                    copy.attribute.extend(kept + [helper.make_attribute(name, old * factor)])
                continue
            for index in what:
                value = view.constant(node.input[index])
                new_name = names(node.input[index] + "_scaled")
                initializers.append(numpy_helper.from_array((value * factor).astype(value.dtype), new_name))
                copy.input[index] = new_name
        producer = copies[id(view.producer[match.values["input"]])]
        producer.output[list(producer.output).index(match.values["input"])] = scaled_node.output[0]
        return Replacement([copies[id(n)] for n in match.nodes[:-1]], initializers)


def _absorb(view: GraphView, tensor: str, reader: onnx.NodeProto, depth: int) -> list[Edit] | str:
    """Edits that multiply `tensor` by the scalar through constants upstream, or why there are none."""
    if depth > MAX_DEPTH:
        return "no linear op with constants close enough"
    if view.single_consumer(tensor) is not reader:
        return "a tensor on the way has other readers"
    node = view.producer.get(tensor)
    if node is None or node.domain not in ("", "ai.onnx"):
        return "no linear op with constants before it"
    op = node.op_type
    if op in CARRIERS:
        return _carry(view, node, [0], depth)
    if op == "MatMul":
        constant = next((i for i in (1, 0) if _float_constant(view, node.input[i]) is not None), None)
        if constant is not None:
            return [(node, (constant,))]
        for side in (0, 1):
            edits = _carry(view, node, [side], depth)
            if not isinstance(edits, str):
                return edits
        return edits
    if op in ("Add", "Sub"):
        constants = tuple(i for i in (0, 1) if _float_constant(view, node.input[i]) is not None)
        if len(constants) == 2:
            return [(node, constants)]
        return _carry(view, node, [i for i in (0, 1) if i not in constants], depth, constants)
    if op == "Mul":
        constant = next((i for i in (1, 0) if _float_constant(view, node.input[i]) is not None), None)
        return [(node, (constant,))] if constant is not None else "Mul of two computed tensors"
    if op == "Gemm":
        return [(node, "alpha")]
    if op in ("Conv", "ConvTranspose"):
        indices = tuple(i for i in (1, 2) if i < len(node.input) and node.input[i])
        if all(_float_constant(view, node.input[i]) is not None for i in indices):
            return [(node, indices)]
        return f"{op} weight or bias is not constant"
    return f"{op} is not linear"


def _carry(view: GraphView, node: onnx.NodeProto, inputs: list[int], depth: int,
           scaled: tuple[int, ...] = ()) -> list[Edit] | str:
    """The scale moved to each of `inputs`; the constants at `scaled` multiplied by it."""
    edits: list[Edit] = [(node, scaled)]
    for i in inputs:
        upstream = _absorb(view, node.input[i], node, depth + 1)
        if isinstance(upstream, str):
            return upstream
        edits = upstream + edits
    return edits
