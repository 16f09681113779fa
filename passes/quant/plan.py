"""Quantization planning: which tensors get QuantizeLinear/DequantizeLinear, with which parameters.

Pure functions of the graph, the calibrated ranges and the options; nothing is inserted here.

Placement reads `OP_TABLE`, one row per op type: which inputs are activations, which is a weight
(quantized per channel along `weight_axis`), which is a bias (int32, scale = s_input * s_weight,
zero point 0), and how the output is treated:
- "own": the output gets its own calibrated parameters when a quantized op reads it (so ORT can fuse
  DQ -> op -> Q into one integer kernel, e.g. QLinearConv);
- "float": the output stays float (e.g. MatMul feeding a float bias Add: ORT then runs
  MatMulIntegerToFloat, which dequantizes inside the kernel), except for a MatMul whose output is
  added to another linear layer's (see `_summed_linear_outputs`);
- "shared": data-movement ops (Reshape, Transpose, MaxPool...) carry the input's parameters through,
  so int8 flows through them unchanged; they are quantized only when their input already is.
Add and Mul are quantized only when both inputs are quantized tensors. Everything else (LayerNorm,
Softmax, Erf/GELU, Div, Pow, Sqrt...) stays float unless named in `include`.

Scales: for a range [lo, hi] (always containing 0) uint8 asymmetric uses s = (hi - lo) / 255,
zp = round(-lo / s); symmetric int8 uses s = max(|lo|, |hi|) / 127, zp = 0. Weights are symmetric
int8, per channel by default: one scale per slice along the output-channel axis; with
`weight_bits=7` (reduced range) they use [-63, 63], so that a pair of u8 x s8 products stays inside
int16 (2 x 255 x 63 < 32767) on x86 CPUs whose int8 instructions saturate there.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Literal

import numpy as np
import onnx

from onnxopt.graph import GraphView

Output = Literal["own", "float", "shared"]


@dataclasses.dataclass(frozen=True)
class OpRule:
    activations: tuple[int, ...]
    output: Output
    weight: int | None = None
    weight_axis: int | None = None
    bias: int | None = None


OP_TABLE: dict[str, OpRule] = {
    "Conv": OpRule(activations=(0,), weight=1, weight_axis=0, bias=2, output="own"),
    "ConvTranspose": OpRule(activations=(0,), weight=1, weight_axis=1, bias=2, output="own"),
    "Gemm": OpRule(activations=(0,), weight=1, weight_axis=None, bias=2, output="own"),
    # MatMul inputs are activations unless constant; a constant B is a weight, per channel on its last axis.
    "MatMul": OpRule(activations=(0, 1), weight=1, weight_axis=-1, output="float"),
    "Add": OpRule(activations=(0, 1), output="own"),
    "Mul": OpRule(activations=(0, 1), output="own"),
    # Relu/Clip read their input unquantized: ORT folds them into the Q that follows (zero point = 0).
    "Relu": OpRule(activations=(), output="own"),
    "Clip": OpRule(activations=(), output="own"),
    "AveragePool": OpRule(activations=(0,), output="own"),
    "GlobalAveragePool": OpRule(activations=(0,), output="own"),
    "Concat": OpRule(activations=(), output="own"),  # every input, see _activation_inputs
    "MaxPool": OpRule(activations=(0,), output="shared"),
    "Reshape": OpRule(activations=(0,), output="shared"),
    "Transpose": OpRule(activations=(0,), output="shared"),
    "Flatten": OpRule(activations=(0,), output="shared"),
    "Squeeze": OpRule(activations=(0,), output="shared"),
    "Unsqueeze": OpRule(activations=(0,), output="shared"),
    "Resize": OpRule(activations=(0,), output="shared"),
    "Slice": OpRule(activations=(0,), output="shared"),
    "Gather": OpRule(activations=(0,), output="shared"),
    "Split": OpRule(activations=(0,), output="shared"),
}
# Ops that do the arithmetic: they start quantized regions; the rest join one only from a quantized input.
COMPUTE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
JOINING_OPS = {"Add", "Mul"}
FUSED_ACTIVATIONS = {"Relu", "Clip"}


@dataclasses.dataclass(frozen=True)
class QuantParams:
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None
    # Smoothing: QuantizeLinear divides channel j by smooth[j] * scale while DequantizeLinear multiplies
    # by scale alone, so readers see x / smooth (their weights were multiplied by smooth).
    smooth: np.ndarray | None = None

    @property
    def dtype(self):
        return self.zero_point.dtype


@dataclasses.dataclass
class Plan:
    nodes: list[onnx.NodeProto]
    activations: dict[str, QuantParams]
    weights: dict[str, QuantParams]
    biases: dict[str, tuple[str, str]]  # bias tensor -> (activation input, weight) its scale derives from
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]]  # tensor -> quantized (node, input index) reading it
    skipped: list[str]


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    per_channel: bool = True
    symmetric_activations: bool = False
    exclude: str = ""
    include: tuple[str, ...] = ()
    keep_float: frozenset[str] = frozenset()  # nodes (by first output) that auto mode keeps float
    weight_bits: int = 8  # 7: reduced range, so u8 x s8 pair sums fit int16 on CPUs without VNNI


def excluded(node: onnx.NodeProto, pattern: str) -> bool:
    """`exclude` matches node names or op types, as plain names or a regular expression."""
    if not pattern:
        return False
    names = {p for p in pattern.split(";") if p}
    if node.name in names or node.op_type in names:
        return True
    return any(re.fullmatch(p, node.name or "") or re.fullmatch(p, node.op_type) for p in names if _is_regex(p))


def _is_regex(text: str) -> bool:
    try:
        re.compile(text)
        return True
    except re.error:
        return False


def _activation_inputs(node: onnx.NodeProto, rule: OpRule, view: GraphView) -> list[int]:
    if node.op_type == "Concat":
        return list(range(len(node.input)))
    indices = [i for i in rule.activations if i < len(node.input) and node.input[i]]
    if rule.weight is not None and rule.weight < len(node.input) and view.constant(node.input[rule.weight]) is not None:
        indices = [i for i in indices if i != rule.weight]
    return indices


def _is_float(view: GraphView, name: str, float_tensors: set[str]) -> bool:
    return name in float_tensors or (view.constant(name) is not None and view.constant(name).dtype == np.float32)


def place(graph: onnx.GraphProto, view: GraphView, options: PlanOptions, float_tensors: set[str],
          unquantizable: dict[str, str] | None = None) -> tuple[list[onnx.NodeProto], set[str], list[str]]:
    """Chooses the nodes of `graph` (the main graph or a subgraph, `view` its view) to quantize and
    the activation tensors that need calibrated ranges.

    `float_tensors` are the tensors known to be float32 (from shape inference); `unquantizable` maps
    tensors calibration found unfit to why (an additive attention mask of -1e9, a branch the data never
    took): nodes reading them stay float.
    """
    skipped: list[str] = []
    chosen: list[onnx.NodeProto] = []
    quantized: set[str] = set()
    wanted = set(options.include)
    summed = _summed_linear_outputs(graph, view)
    for node in graph.node:  # topological order: a node's inputs are decided before it
        rule = OP_TABLE.get(node.op_type)
        if rule is None or node.domain not in ("", "ai.onnx"):
            continue
        if excluded(node, options.exclude):
            skipped.append(f"{node.op_type} '{node.name}': excluded by option")
            continue
        if node.output[0] in options.keep_float:
            skipped.append(f"{node.op_type} '{node.name}': kept float by auto (sensitive)")
            continue
        if node.op_type in FUSED_ACTIVATIONS:
            if node.input[0] in quantized:
                chosen.append(node)
                quantized.add(node.output[0])
            continue
        acts = _activation_inputs(node, rule, view)
        names = [node.input[i] for i in acts]
        if not names or not all(_is_float(view, n, float_tensors) for n in names):
            continue
        if node.op_type not in COMPUTE_OPS and node.op_type not in wanted and not all(n in quantized for n in names):
            continue  # joins a quantized region only
        if any(view.constant(n) is not None for n in names) and node.op_type in JOINING_OPS:
            continue  # Add/Mul with a constant: cheaper in float than as QLinearAdd
        bad = [n for n in names if n in (unquantizable or {})]
        if bad:
            skipped.append(f"{node.op_type} '{node.name}': input {bad[0]} {unquantizable[bad[0]]}; kept float")
            continue
        if rule.weight is not None and node.op_type in ("Conv", "ConvTranspose", "Gemm"):
            if view.constant(node.input[rule.weight]) is None:
                skipped.append(f"{node.op_type} '{node.name}': weight is not constant")
                continue
        chosen.append(node)
        quantized.update(names)
        if rule.output in ("own", "shared") or node.output[0] in summed:
            quantized.update(o for o in node.output[:1] if o)
    return chosen, quantized, skipped


def _summed_linear_outputs(graph: onnx.GraphProto, view: GraphView) -> set[str]:
    """MatMul outputs added to another MatMul's or Gemm's output (an RNN cell's W x + U h). Left float,
    ORT fuses the MatMul with that Add into a float Gemm over dequantized weights, every call; with
    their own parameters the two products run as QLinearMatMul and their sum as QLinearAdd."""
    linear = {n.output[0] for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.output}
    summed = set()
    for node in graph.node:
        if node.op_type == "Add" and len(node.input) == 2 and all(i in linear for i in node.input):
            summed.update(i for i in node.input if view.single_consumer(i) is node
                          and view.producer[i].op_type == "MatMul")
    return summed


def quant_params(lo: float, hi: float, symmetric: bool) -> QuantParams:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        bound = max(abs(lo), abs(hi), 1e-8)
        return QuantParams(np.array(bound / 127, np.float32), np.array(0, np.int8))
    scale = max(hi - lo, 1e-8) / 255
    zero_point = int(np.clip(round(-lo / scale), 0, 255))
    return QuantParams(np.array(scale, np.float32), np.array(zero_point, np.uint8))


def weight_params(weight: np.ndarray, axis: int | None, bits: int = 8) -> QuantParams:
    """Symmetric signed parameters, one scale per slice along `axis` (or one for the whole tensor)."""
    qmax = 2 ** (bits - 1) - 1
    if axis is None:
        bound = float(np.max(np.abs(weight))) if weight.size else 0.0
        return QuantParams(np.array(max(bound, 1e-12) / qmax, np.float32), np.array(0, np.int8))
    axis = axis % weight.ndim
    reduce = tuple(i for i in range(weight.ndim) if i != axis)
    bound = np.max(np.abs(weight), axis=reduce)
    scale = (np.maximum(bound, 1e-12) / qmax).astype(np.float32)
    return QuantParams(scale, np.zeros(scale.shape, np.int8), axis)


def weight_axis(node: onnx.NodeProto, rule: OpRule, weight: np.ndarray, per_channel: bool) -> int | None:
    if not per_channel:
        return None
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul" and weight.ndim != 2:
        return None  # batched constant B: ORT's integer MatMul kernels take per-column scales for 2-D B only
    return rule.weight_axis


def smoothing_groups(view: GraphView, nodes: list[onnx.NodeProto]) -> dict[str, list[onnx.NodeProto]]:
    """Activations whose every quantized reader is a MatMul with a constant 2-D weight on input 1.

    Only those can be smoothed: each reader's weight absorbs the per-channel factor.
    """
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for i in _activation_inputs(node, OP_TABLE[node.op_type], view):
            readers.setdefault(node.input[i], []).append(node)
    groups = {}
    for tensor, users in readers.items():
        if all(u.op_type == "MatMul" and u.input[0] == tensor and u.input[1] != tensor
               and view.constant(u.input[1]) is not None and view.constant(u.input[1]).ndim == 2 for u in users):
            groups[tensor] = users
    return groups


def smoothing_factors(channel_absmax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """SmoothQuant: s_j = max|x_j|^alpha / max|W_j,:|^(1 - alpha), shared by every reader's weight.

    Dividing channel j of the activation by s_j and multiplying row j of each weight by s_j leaves
    x @ W unchanged while moving outlier channels' range into the (per-channel quantized) weights.
    """
    weight_absmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    s = np.maximum(channel_absmax, 1e-5) ** alpha / np.maximum(weight_absmax, 1e-5) ** (1 - alpha)
    return np.clip(s, 1e-2, 1e2).astype(np.float32)


def _matmul_bias(node: onnx.NodeProto, weight: np.ndarray, view: GraphView) -> tuple[onnx.NodeProto, int] | None:
    """(the bias Add, the bias's input index) of a MatMul with a [K, N] weight and a float32 [N] bias.

    Its bias is quantized as Gemm's is (int32, scale = input scale x weight scale): with a float bias,
    ONNX Runtime fuses MatMul + Add into Gemm where the input's shape is static (its MatMulAddFusion,
    which runs before the QDQ fusions) and then runs the int8 weights dequantized to float on every
    call: all-MiniLM-L6-v2 exported at a fixed [1, 128] ran int8 at 0.70x of fp32, and at 2.2x with
    the bias quantized (24 of its 36 layers had lost their QDQ fusion). With dynamic shapes either form
    fuses into MatMulIntegerToFloat."""
    held = view.bias_add(node.output[0])
    if held is None or weight.ndim != 2 or len(view.consumers.get(held[0].input[held[1]], [])) != 1:
        return None  # a bias shared by two layers (fold merges equal ones) cannot take both scales
    bias = view.constant(held[0].input[held[1]])
    return held if bias.dtype == np.float32 and bias.shape == (weight.shape[1],) else None


def build_plan(view: GraphView, nodes: list[onnx.NodeProto], tensors: set[str],
               ranges: dict[str, tuple[float, float]], options: PlanOptions,
               smooth: dict[str, np.ndarray] | None = None) -> Plan:
    """Turns placement plus calibrated ranges into parameters for every quantized tensor."""
    activations: dict[str, QuantParams] = {}
    weights: dict[str, QuantParams] = {}
    biases: dict[str, tuple[str, str]] = {}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    skipped: list[str] = []
    for node in nodes:  # shared outputs take their input's parameters, in topological order
        rule = OP_TABLE[node.op_type]
        for i in _activation_inputs(node, rule, view):
            name = node.input[i]
            if name not in activations:
                if name not in ranges:
                    raise KeyError(f"no calibrated range for {name}")
                params = quant_params(*ranges[name], options.symmetric_activations)
                if smooth and name in smooth:
                    params = dataclasses.replace(params, smooth=smooth[name])
                activations[name] = params
            consumers.setdefault(name, []).append((node, i))
        if rule.output == "shared" and node.output[0] in tensors:
            activations[node.output[0]] = activations[node.input[0]]
        if rule.weight is not None and rule.weight < len(node.input):
            weight = view.constant(node.input[rule.weight])
            if weight is not None:
                axis = weight_axis(node, rule, weight, options.per_channel)
                weights[node.input[rule.weight]] = weight_params(weight, axis, options.weight_bits)
                consumers.setdefault(node.input[rule.weight], []).append((node, rule.weight))
                if rule.bias is not None and rule.bias < len(node.input) and node.input[rule.bias]:
                    biases[node.input[rule.bias]] = (node.input[0], node.input[rule.weight])
                    consumers.setdefault(node.input[rule.bias], []).append((node, rule.bias))
                elif node.op_type == "MatMul" and (held := _matmul_bias(node, weight, view)) is not None:
                    add, index = held
                    biases[add.input[index]] = (node.input[0], node.input[1])
                    consumers.setdefault(add.input[index], []).append((add, index))
    # "own" outputs read by quantized nodes were calibrated and got parameters above as inputs.
    return Plan(nodes, activations, weights, biases, consumers, skipped)
