"""Keep ONNX Runtime's CPU EP off its SkipLayerNormalization kernel (two `fuse` rules).

ORT's graph optimizer fuses a residual Add (and a bias Add before it) with the LayerNormalization that
reads it into com.microsoft SkipLayerNormalization wherever it knows both inputs' shapes, symbolic dims
included, and its transformer optimizer writes that op into the models it fuses. On the CPU EP that
kernel is 4 to 6 times slower than the ops it replaces (ORT 1.32, 1 thread, Intel Xeon with AVX-512;
`bench/lossless.py` has the model-level figures):

| [batch, sequence, 384]   | SkipLayerNormalization | Add, Sum, LayerNormalization |
|--------------------------|------------------------|------------------------------|
| 8 x 128                  | 1.95 ms                | 0.50 ms                      |
| 1 x 128                  | 0.24 ms                | 0.04 ms                      |

- `ResidualSum`: a LayerNormalization reading an Add of two computed tensors gets a Sum instead of
  the Add. Sum of two tensors is Add (both broadcast, opset 8 on), and ORT's fusion looks for Add only.
- `SkipLayerNormToOnnx`: com.microsoft SkipLayerNormalization(input, skip, gamma, beta, bias) becomes
  Sum(Add(input, bias), skip) and LayerNormalization: the bias Add right after the MatMul that
  computes `input`, as exporters write it, so `quant` folds it into its int32 bias.
"""
from __future__ import annotations

import onnx
from onnx import helper

from onnxopt.graph import GraphView, NameGenerator, attribute
from onnxopt.rewrite import Match, Replacement

SKIP_LAYERNORM_EPSILON = 1e-12  # ORT's default for SkipLayerNormalization without the attribute


class ResidualSum:
    name = "residual Add before LayerNormalization -> Sum"

    def match(self, node: onnx.NodeProto, view: GraphView) -> Match | None:
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx"):
            return None
        add = view.producer.get(node.input[0])
        if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
            return None
        return Match([add], {"add": add})

    def check(self, match: Match, view: GraphView) -> str | None:
        add = match.values["add"]
        if any(view.constant(name) is not None for name in add.input):
            return "adds a constant (a bias, not a residual)"
        return None

    def replace(self, match: Match, view: GraphView, names: NameGenerator) -> Replacement:
        add = match.values["add"]
        return Replacement([helper.make_node("Sum", list(add.input), list(add.output),
                                             name=names((add.name or add.output[0]) + "/sum"))])


class SkipLayerNormToOnnx:
    name = "com.microsoft SkipLayerNormalization -> Add, Sum, LayerNormalization"

    def __init__(self, opset: int):
        self.opset = opset

    def match(self, node: onnx.NodeProto, view: GraphView) -> Match | None:
        if node.op_type != "SkipLayerNormalization" or node.domain != "com.microsoft":
            return None
        return Match([node], {"node": node})

    def check(self, match: Match, view: GraphView) -> str | None:
        node = match.values["node"]
        if self.opset < 17:
            return f"LayerNormalization needs opset 17 (the model has {self.opset})"
        if any(name and (view.consumers.get(name) or name in view.graph_outputs) for name in node.output[1:3]):
            return "its mean or inverse standard deviation output is read"
        return None

    def replace(self, match: Match, view: GraphView, names: NameGenerator) -> Replacement:
        node = match.values["node"]
        x, skip, gamma = node.input[:3]
        beta = node.input[3] if len(node.input) > 3 else ""
        bias = node.input[4] if len(node.input) > 4 else ""
        base = node.name or node.output[0]
        # output 3, when present, is input + skip + bias: the residual stream the next layer adds to
        total = node.output[3] if len(node.output) > 3 and node.output[3] else names(base + "_sum")
        nodes = []
        if bias:
            biased = names(x + "_biased")
            nodes.append(helper.make_node("Add", [x, bias], [biased], name=names(base + "/bias")))
            x = biased
        nodes.append(helper.make_node("Sum", [x, skip], [total], name=names(base + "/residual")))
        nodes.append(helper.make_node("LayerNormalization", [total, gamma] + ([beta] if beta else []),
                                      [node.output[0]], name=names(base + "/layernorm"), axis=-1,
                                      epsilon=attribute(node, "epsilon", SKIP_LAYERNORM_EPSILON)))
        return Replacement(nodes)
