"""Operator fusion (`fuse`): BatchNormalization and per-channel affine Mul/Add into the op before them,
MatMul+Add into Gemm, a scalar Mul/Div into the weights of the linear ops before it (`fuse_scale`),
a floor under masked Softmax inputs, so that ONNX Runtime's CPU Softmax stays fast (`fuse_softmax`), an
erf GELU in the order ONNX Runtime fuses into one kernel (`fuse_gelu`), and, for the CPU EP, residual
Adds and ORT's own SkipLayerNormalization and Attention written so that ORT runs its faster kernels
(`fuse_layernorm`, `fuse_attention`).

Conv+BN: with s = scale / sqrt(var + eps), BN(Conv(x, W, b)) = Conv(x, W * s, (b - mean) * s + B),
s broadcast over the output-channel axis of W: axis 0 for Conv; for ConvTranspose W is
[C_in, C_out / group, k...], so output channel g * (C_out / group) + j sits at group g, axis-1 index j.
MatMul+Add: MatMul(A, B) + C = Gemm(A, B, C) when A is 2-D, B a constant 2-D weight and C a constant
broadcastable to one row ([N] or [1, N]); Gemm accepts exactly that, so nothing else is rewritten.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx
from onnx import numpy_helper

from onnxopt import Pass, PassContext, PassResult, option
from onnxopt.graph import GraphView, NameGenerator, attribute, infer_value_info, scopes
from onnxopt.opsets import default_opset
from onnxopt.rewrite import Match, Replacement, apply_rules_everywhere
from onnxopt.surgery import remove_unused_initializers

from .fuse_attention import OrtAttentionToOnnx
from .fuse_gelu import GeluOrder
from .fuse_layernorm import ResidualSum, SkipLayerNormToOnnx
from .fuse_scale import ScalarIntoLinear
from .fuse_softmax import SoftmaxFloor


class ConvBatchNorm:
    """Conv or ConvTranspose followed by an inference-mode BatchNormalization."""

    def __init__(self, conv_op: str):
        self.conv_op = conv_op
        self.name = f"{conv_op}+BatchNormalization"

    def match(self, node, view: GraphView) -> Match | None:
        if node.op_type != self.conv_op or node.domain not in ("", "ai.onnx"):
            return None
        bn = view.single_consumer(node.output[0])
        if bn is None or bn.op_type != "BatchNormalization" or bn.input[0] != node.output[0]:
            return None
        return Match([node, bn], {"conv": node, "bn": bn})

    def check(self, match: Match, view: GraphView) -> str | None:
        conv, bn = match.values["conv"], match.values["bn"]
        if attribute(bn, "training_mode", 0) or (len(bn.output) > 1 and any(bn.output[1:])):
            return "BatchNormalization is in training mode"
        if view.constant(conv.input[1]) is None:
            return "weight is not constant"
        if len(conv.input) > 2 and conv.input[2] and view.constant(conv.input[2]) is None:
            return "bias is not constant"
        if any(view.constant(n) is None for n in bn.input[1:5]):
            return "BatchNormalization statistics are not constant"
        if not np.issubdtype(view.constant(conv.input[1]).dtype, np.floating):
            return "weight is not floating point"
        return None

    def replace(self, match: Match, view: GraphView, names: NameGenerator) -> Replacement:
        conv, bn = match.values["conv"], match.values["bn"]
        weight = view.constant(conv.input[1])
        scale, shift, mean, var = (view.constant(n).astype(np.float64) for n in bn.input[1:5])
        s = scale / np.sqrt(var + attribute(bn, "epsilon", 1e-5))
        bias = view.constant(conv.input[2]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] else 0.0
        if self.conv_op == "Conv":
            new_weight = weight * s.reshape((-1,) + (1,) * (weight.ndim - 1))
        else:
            group = attribute(conv, "group", 1)
            per_group = weight.reshape((group, weight.shape[0] // group) + weight.shape[1:])
            factor = s.reshape((group, 1, weight.shape[1]) + (1,) * (weight.ndim - 2))
            new_weight = (per_group * factor).reshape(weight.shape)
        new_bias = (bias - mean) * s + shift
        w_name, b_name = names(conv.input[1] + "_bn"), names(bn.output[0] + "_bias")
        fused = onnx.NodeProto()
        fused.CopyFrom(conv)
        fused.input[:] = [conv.input[0], w_name, b_name]
        fused.output[:] = [bn.output[0]]
        return Replacement([fused], [numpy_helper.from_array(new_weight.astype(weight.dtype), w_name),
                                     numpy_helper.from_array(new_bias.astype(weight.dtype), b_name)])


def _per_channel(value: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """`value` as one number per channel (axis 1 of a rank-`rank` NC... tensor), if it broadcasts so."""
    if value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if shape[0] != 1 or shape[1] not in (1, channels) or any(d != 1 for d in shape[2:]):
        return None
    return np.broadcast_to(value.reshape(-1) if value.size > 1 else value.reshape(1), (channels,))


class ChannelAffine:
    """Conv or BatchNormalization followed by Mul/Add with a per-channel constant (e.g. caffe2 affine layers).

    Conv: (x * W + b) * a = x * (W a) + b a and (x * W + b) + a = x * W + (b + a), per output channel.
    BN: (s n + B) * a = (s a) n + B a and (s n + B) + a = s n + (B + a), with n the normalized input.
    """

    def __init__(self, producer: str, op: str):
        self.producer, self.op = producer, op
        self.name = f"{producer}+{op}"

    def match(self, node, view: GraphView) -> Match | None:
        if node.op_type != self.producer or node.domain not in ("", "ai.onnx"):
            return None
        user = view.single_consumer(node.output[0])
        if user is None or user.op_type != self.op or user.domain not in ("", "ai.onnx"):
            return None
        other = user.input[1] if user.input[0] == node.output[0] else user.input[0]
        return Match([node, user], {"node": node, "user": user, "other": other})

    def check(self, match: Match, view: GraphView) -> str | None:
        node = match.values["node"]
        value = view.constant(match.values["other"])
        if value is None or not np.issubdtype(value.dtype, np.floating):
            return "the other operand is not a float constant"
        if self.producer == "Conv":
            weight = view.constant(node.input[1])
            if weight is None or (len(node.input) > 2 and node.input[2] and view.constant(node.input[2]) is None):
                return "weight or bias is not constant"
            channels, rank = weight.shape[0], weight.ndim
        else:
            if any(view.constant(n) is None for n in node.input[1:5]) or attribute(node, "training_mode", 0):
                return "BatchNormalization parameters are not constant"
            channels, rank = view.constant(node.input[1]).shape[0], view.rank(node.input[0])
            if rank is None:
                return "input rank unknown"
        if _per_channel(value, rank, channels) is None:
            return "constant is not per channel"
        return None

    def replace(self, match: Match, view: GraphView, names: NameGenerator) -> Replacement:
        node, user = match.values["node"], match.values["user"]
        fused = onnx.NodeProto()
        fused.CopyFrom(node)
        fused.output[:] = [user.output[0]]
        new = []
        if self.producer == "Conv":
            weight = view.constant(node.input[1])
            channels = weight.shape[0]
            a = _per_channel(view.constant(match.values["other"]), weight.ndim, channels).astype(np.float64)
            has_bias = len(node.input) > 2 and bool(node.input[2])
            bias = view.constant(node.input[2]).astype(np.float64) if has_bias else np.zeros(channels)
            if self.op == "Mul":
                weight = weight * a.reshape((-1,) + (1,) * (weight.ndim - 1))
                bias = bias * a
            else:
                bias = bias + a
            w_name, b_name = names(node.input[1] + "_affine"), names(user.output[0] + "_bias")
            new = [numpy_helper.from_array(weight.astype(view.constant(node.input[1]).dtype), w_name),
                   numpy_helper.from_array(bias.astype(view.constant(node.input[1]).dtype), b_name)]
            fused.input[:] = [node.input[0], w_name, b_name]
        else:
            scale, shift = view.constant(node.input[1]), view.constant(node.input[2])
            a = _per_channel(view.constant(match.values["other"]), view.rank(node.input[0]), scale.shape[0])
            if self.op == "Mul":
                scale, shift = scale * a, shift * a
            else:
                shift = shift + a
            s_name, b_name = names(node.input[1] + "_affine"), names(node.input[2] + "_affine")
            new = [numpy_helper.from_array(scale.astype(view.constant(node.input[1]).dtype), s_name),
                   numpy_helper.from_array(shift.astype(view.constant(node.input[2]).dtype), b_name)]
            fused.input[:] = [node.input[0], s_name, b_name] + list(node.input[3:5])
        return Replacement([fused], new)


class MatMulAddToGemm:
    name = "MatMul+Add->Gemm"

    def match(self, node, view: GraphView) -> Match | None:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            return None
        add = view.single_consumer(node.output[0])
        if add is None or add.op_type != "Add":
            return None
        bias = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        return Match([node, add], {"matmul": node, "add": add, "bias": bias})

    def check(self, match: Match, view: GraphView) -> str | None:
        a, b = match.values["matmul"].input
        weight, bias = view.constant(b), view.constant(match.values["bias"])
        if weight is None or bias is None:
            return "weight or bias is not constant"
        if view.rank(a) != 2:
            return "input is not 2-D (Gemm needs 2-D)"
        if weight.ndim != 2 or weight.dtype not in (np.float32, np.float64, np.float16):
            return "weight is not a 2-D float matrix"
        if bias.shape not in ((weight.shape[1],), (1, weight.shape[1])):
            return "bias does not broadcast as one row"
        return None

    def replace(self, match: Match, view: GraphView, names: NameGenerator) -> Replacement:
        matmul, add = match.values["matmul"], match.values["add"]
        gemm = onnx.helper.make_node("Gemm", [matmul.input[0], matmul.input[1], match.values["bias"]],
                                     [add.output[0]], name=names(matmul.name or "gemm"))
        return Replacement([gemm])


@dataclasses.dataclass(frozen=True)
class FuseOptions:
    conv_bn: bool = option(True, "fold BatchNormalization into the preceding Conv/ConvTranspose")
    affine: bool = option(True, "fold per-channel constant Mul/Add into the preceding Conv or BatchNormalization")
    gemm: bool = option(True, "turn MatMul+Add with a constant 2-D weight into Gemm")
    scalar: bool = option(True, "fold Mul/Div by a scalar constant (attention's 1/sqrt(d)) into the weights "
                                "of the linear ops before it")
    softmax_floor: bool = option(True, "raise a masked Softmax's inputs (a Softmax reading an Add or Where) to at "
                                       "least the row's max - 80: ORT's CPU Softmax is ~10x slower where exp "
                                       "underflows; outputs change by < 2e-35 (see fuse_softmax.py)")
    gelu_order: bool = option(True, "write an erf GELU as (x * (1 + erf(x/sqrt2))) * 0.5, the order ORT fuses into "
                                    "one Gelu kernel (torch's dynamo exporter writes x * (0.5 * (1 + erf)), which "
                                    "ORT leaves as 5 ops); exact (see fuse_gelu.py)")
    skip_layernorm: Literal["auto", "avoid", "keep"] = option(
        "auto", "avoid: a residual Add before LayerNormalization becomes Sum and com.microsoft "
                "SkipLayerNormalization is written as Add, Sum, LayerNormalization, so that ORT does not run its "
                "SkipLayerNormalization kernel (4-6x slower than those ops on CPU; see fuse_layernorm.py); "
                "auto: avoid for the CPU EP, keep for others")
    ort_attention: Literal["auto", "onnx", "keep"] = option(
        "auto", "onnx: write com.microsoft Attention (from ORT's transformer optimizer) as ONNX ops, so that the "
                "Softmax floor applies and quant/prune see Q, K and V (see fuse_attention.py); auto: onnx for the "
                "CPU EP, keep for others (their fused kernels are fast)")


class FuseOps(Pass):
    """Fold BatchNormalization into the Conv/ConvTranspose before it (grouped ConvTranspose included)
    and per-channel constant Mul/Add into the Conv/BN before them; MatMul+Add into Gemm where Gemm can
    express it (2-D input, constant weight, row bias); a Mul/Div by a scalar constant (attention's
    1/sqrt(d)) into the weights of the linear ops before it; a floor under masked Softmax inputs; an
    erf GELU reordered so that ONNX Runtime fuses it; for the CPU EP, residual Adds before
    LayerNormalization as Sum, and ORT's SkipLayerNormalization and Attention as ONNX ops."""

    name = "fuse"
    Options = FuseOptions
    fixed_point = True

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        rules = []
        if self.options.conv_bn:
            rules += [ConvBatchNorm("Conv"), ConvBatchNorm("ConvTranspose")]
        if self.options.affine:
            rules += [ChannelAffine(p, op) for p in ("Conv", "BatchNormalization") for op in ("Mul", "Add")]
        if self.options.gemm:
            rules.append(MatMulAddToGemm())
        if self.options.scalar:
            rules += [ScalarIntoLinear("Mul"), ScalarIntoLinear("Div")]
        if self.options.softmax_floor:
            rules.append(SoftmaxFloor(default_opset(model)))
        if self.options.gelu_order:
            rules.append(GeluOrder())
        cpu = ctx.ep == "cpu"
        if self.options.skip_layernorm == "avoid" or (self.options.skip_layernorm == "auto" and cpu):
            rules += [ResidualSum(), SkipLayerNormToOnnx(default_opset(model))]
        if self.options.ort_attention == "onnx" or (self.options.ort_attention == "auto" and cpu):
            rules.append(OrtAttentionToOnnx(default_opset(model)))
        value_info = infer_value_info(model) if self.options.gemm or self.options.affine or \
            self.options.softmax_floor or self.options.ort_attention != "keep" else None
        outcome = apply_rules_everywhere(model, rules, value_info)
        if outcome.counts:
            for graph, _ in scopes(model):
                remove_unused_initializers(graph)
        return PassResult(model, changed=bool(outcome.counts), counts=dict(outcome.counts),
                          skipped=outcome.skip_lines())
