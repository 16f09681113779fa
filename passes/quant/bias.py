"""Bias correction for quantized weights (`quant:bias_correction=true`).

A weight quantized per channel is off by dW = DQ(Q(W)) - W. Rounding noise in the products x @ dW
averages out over many inputs except for its mean, E[x] @ dW: a fixed shift of every output
channel, largest where activations have a large mean (LayerNorm outputs with their beta, GELU
outputs, which are mostly positive). Subtracting that shift from the bias that follows the MatMul
(Add of a constant, Gemm's C, or the bias input of ORT's BiasGelu, FastGelu and SkipLayerNormalization
in models its transformer optimizer fused) removes it at no run-time cost; E[x] comes from the calibration
statistics (per-channel sums), divided by the smoothing factor where the activation is smoothed.
This is the empirical-mean form of the bias correction in Nagel et al., "Data-Free Quantization
Through Weight Equalization and Bias Correction" (2019). Conv is left alone: a mean over the input
channels ignores padding at the borders.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxopt.graph import GraphView, NameGenerator

from .plan import Plan
from .qdq import dequantize_weight, quantize_weight


# ONNX Runtime's fused ops that add a bias to a MatMul's output before anything else, as its transformer
# optimizer writes them: op -> (how many leading inputs may be that output, the bias's input index)
_FUSED_BIAS = {"BiasGelu": (1, 1), "FastGelu": (1, 1), "SkipLayerNormalization": (2, 4)}


def _fused_bias(node: onnx.NodeProto, view: GraphView) -> tuple[onnx.NodeProto, int] | None:
    """(the ORT fused op that alone reads `node`'s output and adds a bias, the bias's input index)."""
    fused = view.single_consumer(node.output[0])
    if fused is None or fused.domain != "com.microsoft" or fused.op_type not in _FUSED_BIAS:
        return None
    reads, index = _FUSED_BIAS[fused.op_type]
    if node.output[0] not in fused.input[:reads] or len(fused.input) <= index or not fused.input[index]:
        return None
    return fused, index


def correctable(view: GraphView, nodes: list[onnx.NodeProto]) -> dict[str, list[onnx.NodeProto]]:
    """Activation -> the quantized nodes reading it whose bias can absorb a correction: MatMul with a
    constant 2-D weight followed by a lone Add of a constant (or an ORT op adding a bias), or Gemm (no
    transA, alpha = beta = 1) with constant B and C."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        if _bias_of(node, view) is not None:
            readers.setdefault(node.input[0], []).append(node)
    return readers


def _bias_of(node: onnx.NodeProto, view: GraphView) -> tuple[onnx.NodeProto, int] | None:
    """(the node holding the bias, its input index), or None when there is no bias to correct."""
    if node.op_type == "MatMul":
        weight = view.constant(node.input[1])
        if weight is None or weight.ndim != 2:
            return None
        held = view.bias_add(node.output[0]) or _fused_bias(node, view)
        if held is None:
            return None
        add, index = held
        bias = view.constant(add.input[index])
        if bias is None or bias.shape[-1:] != (weight.shape[1],) or bias.size != weight.shape[1]:
            return None
        return add, index
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return None
        weight, bias = view.constant(node.input[1]), view.constant(node.input[2])
        if weight is None or bias is None or weight.ndim != 2:
            return None
        out_channels = weight.shape[0] if attrs.get("transB", 0) else weight.shape[1]
        if bias.size != out_channels:
            return None
        return node, 2
    return None


def correct_biases(graph: onnx.GraphProto, view: GraphView, names: NameGenerator, plan: Plan,
                   means: dict[str, np.ndarray], smooth: dict[str, np.ndarray]) -> int:
    """Subtracts E[x] @ dW from each correctable bias of the plan's nodes (in `graph`, in place, before
    the QDQ rewrite, which may quantize Gemm's bias afterwards); returns how many biases changed."""
    corrected = 0
    for node in plan.nodes:
        params = plan.weights.get(node.input[1]) if len(node.input) > 1 else None
        mean = means.get(node.input[0])
        holder = _bias_of(node, view)
        if params is None or mean is None or holder is None:
            continue
        weight = view.constant(node.input[1])
        error = dequantize_weight(quantize_weight(weight, params), params) - weight.astype(np.float64)
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            error = error.T  # [K, N] like MatMul's
        if mean.shape != (error.shape[0],):
            continue
        if node.input[0] in smooth:
            mean = mean / smooth[node.input[0]]
        shift = mean @ error
        holder_node, index = holder
        bias = view.constant(holder_node.input[index])
        name = names(holder_node.input[index] + "_corrected")
        graph.initializer.append(numpy_helper.from_array((bias - shift.reshape(bias.shape)).astype(bias.dtype), name))
        _rename_input(plan, holder_node, index, name)
        corrected += 1
    return corrected


def _rename_input(plan: Plan, node: onnx.NodeProto, index: int, name: str) -> None:
    """Points `node`'s input at `name`; a bias the plan quantizes (Gemm's C) moves with it, and stays
    planned under its old name for any other reader."""
    old = node.input[index]
    node.input[index] = name
    if old not in plan.biases:
        return
    plan.biases[name] = plan.biases[old]
    plan.consumers[name] = [(node, index)]
    others = [(n, i) for n, i in plan.consumers.get(old, []) if n is not node]
    if others:
        plan.consumers[old] = others
    else:
        del plan.biases[old]
        plan.consumers.pop(old, None)
