"""com.microsoft Attention written as ONNX ops (a `fuse` rule), for models ONNX Runtime's transformer
optimizer fused (`model_optimized.onnx`).

Attention(x, W_qkv, b_qkv, mask_index) packs the Q, K and V projections into one weight and runs
softmax(Q K^T * scale + mask) V per head in one kernel. On the CPU EP that kernel keeps the masked
Softmax's underflow (see fuse_softmax.py) and hides Q, K and V from `quant` and `prune`. Written out:

    q, k, v = x @ W_q * scale + b_q * scale, x @ W_k + b_k, x @ W_v + b_v   (3 MatMul + Add)
    heads   = Transpose(Reshape(., [0, 0, heads, head_size]))                 (K: [0, 2, 3, 1])
    probs   = Softmax(q @ k + mask)                                          (the floor then applies)
    output  = Reshape(Transpose(probs @ v, [0, 2, 1, 3]), [0, 0, hidden])

Measured on all-MiniLM-L6-v2 as ORT's optimizer fuses it (8 x 128 tokens, 1 thread, Intel Xeon):
fp32 249 -> 213 ms with `fuse`'s other rules, int8 (`quant`) 162 -> 86 ms with SkipLayerNormalization
written out too (fuse_layernorm.py); the unfused export's int8 runs at 75 ms.

Masks taken: none; the 1-D mask_index that EmbedLayerNormalization computes (each sequence's length:
keys at or past it are masked); a raw 2-D [batch, keys] mask (0 masks). Left alone, with the reason:
past state, attention bias, causal (unidirectional), rotary, other mask forms.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxopt.graph import GraphView, NameGenerator, attribute
from onnxopt.rewrite import Match, Replacement

MASK_FILTER_VALUE = -10000.0  # the op's default for mask_filter_value


class OrtAttentionToOnnx:
    name = "com.microsoft Attention -> ONNX ops"

    def __init__(self, opset: int):
        self.opset = opset

    def match(self, node: onnx.NodeProto, view: GraphView) -> Match | None:
        if node.op_type != "Attention" or node.domain != "com.microsoft":
            return None
        return Match([node], {"node": node})

    def check(self, match: Match, view: GraphView) -> str | None:
        node = match.values["node"]
        if self.opset < 11:
            return f"needs opset 11 (Range) or later (the model has {self.opset})"
        if any(node.input[4:]):
            return "past state or attention bias inputs (decoder attention)"
        if any(name and (view.consumers.get(name) or name in view.graph_outputs) for name in node.output[1:]):
            return "its present (key/value cache) output is read"
        if attribute(node, "unidirectional", 0) or attribute(node, "do_rotary", 0):
            return "causal or rotary attention"
        weight = view.constant(node.input[1])
        bias = view.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if weight is None or weight.ndim != 2 or (len(node.input) > 2 and node.input[2] and bias is None):
            return "Q/K/V weight or bias is not a constant"
        widths = _widths(node, weight)
        heads = attribute(node, "num_heads", 0)
        if widths is None or heads <= 0 or any(w % heads for w in widths):
            return "qkv_hidden_sizes do not split the weight into whole heads"
        return None if len(node.input) < 4 or not node.input[3] else _mask_kind(node.input[3], view)[1]

    def replace(self, match: Match, view: GraphView, names: NameGenerator) -> Replacement:
        node = match.values["node"]
        x, base = node.input[0], node.name or node.output[0]
        weight = view.constant(node.input[1])
        bias = view.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        heads = attribute(node, "num_heads")
        widths = _widths(node, weight)
        scale = attribute(node, "scale", 0.0) or 1.0 / np.sqrt(widths[0] // heads)
        initializers: list[onnx.TensorProto] = []

        def constant(value: np.ndarray, stem: str) -> str:
            tensor = numpy_helper.from_array(np.asarray(value), names(f"{base}/{stem}"))
            initializers.append(tensor)
            return tensor.name

        nodes, projected, start = [], {}, 0
        for tag, width, factor, perm in (("q", widths[0], scale, [0, 2, 1, 3]), ("k", widths[1], 1.0, [0, 2, 3, 1]),
                                         ("v", widths[2], 1.0, [0, 2, 1, 3])):
            columns = slice(start, start + width)
            start += width
            w = (weight[:, columns] * factor).astype(weight.dtype)  # the scale folded into Q's weight and bias
            out = names(f"{base}/{tag}")
            nodes.append(helper.make_node("MatMul", [x, constant(w, f"{tag}_weight")], [out], name=names(f"{base}/{tag}_matmul")))
            if bias is not None:
                b = (bias[columns] * factor).astype(bias.dtype)
                nodes.append(helper.make_node("Add", [out, constant(b, f"{tag}_bias")], [names(out + "_biased")],
                                              name=names(f"{base}/{tag}_bias")))
                out = nodes[-1].output[0]
            split = constant(np.array([0, 0, heads, width // heads], np.int64), f"{tag}_heads_shape")
            heads_out, transposed = names(out + "_heads"), names(out + "_t")
            nodes += [helper.make_node("Reshape", [out, split], [heads_out], name=names(f"{base}/{tag}_split_heads")),
                      helper.make_node("Transpose", [heads_out], [transposed], name=names(f"{base}/{tag}_transpose"),
                                       perm=perm)]
            projected[tag] = transposed
        scores = names(f"{base}/scores")
        nodes.append(helper.make_node("MatMul", [projected["q"], projected["k"]], [scores], name=names(f"{base}/scores")))
        if len(node.input) > 3 and node.input[3]:
            addend = self._mask_addend(node, view, names, constant, nodes, weight.dtype)
            masked = names(f"{base}/masked_scores")
            nodes.append(helper.make_node("Add", [scores, addend], [masked], name=names(f"{base}/mask")))
            scores = masked
        probs, context, merged = names(f"{base}/probs"), names(f"{base}/context"), names(f"{base}/context_t")
        nodes += [helper.make_node("Softmax", [scores], [probs], name=names(f"{base}/softmax"), axis=3),
                  helper.make_node("MatMul", [probs, projected["v"]], [context], name=names(f"{base}/context")),
                  helper.make_node("Transpose", [context], [merged], name=names(f"{base}/merge_transpose"),
                                   perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", [merged, constant(np.array([0, 0, widths[2]], np.int64), "merge_shape")],
                                   [node.output[0]], name=names(f"{base}/merge_heads"))]
        return Replacement(nodes, initializers)

    def _mask_addend(self, node, view, names, constant, nodes, dtype) -> str:
        """Appends to `nodes` the ops computing the [batch, 1, 1, keys] addend of the scores (in `dtype`,
        the weights' float type): 0 where a key is kept, mask_filter_value where it is masked; returns
        its name."""
        base = node.name or node.output[0]
        mask = node.input[3]
        kind, _ = _mask_kind(mask, view)
        keep = names(f"{base}/keep")
        if kind == "lengths":  # key j of sequence b is kept where j < length[b]
            shape, keys, positions = names(f"{base}/shape"), names(f"{base}/keys"), names(f"{base}/positions")
            lengths, lengths64 = names(f"{base}/lengths"), names(f"{base}/lengths64")
            # the keys' count from EmbedLayerNormalization's [batch, sequence] ids: the same tensor for
            # every layer, so `fold` merges the layers' copies of this subgraph into one
            ids = view.producer[mask].input[0]
            nodes += [helper.make_node("Shape", [ids], [shape], name=names(f"{base}/shape")),
                      helper.make_node("Gather", [shape, constant(np.array(1, np.int64), "keys_axis")], [keys],
                                       name=names(f"{base}/keys"), axis=0),
                      helper.make_node("Range", [constant(np.array(0, np.int64), "zero"), keys,
                                                 constant(np.array(1, np.int64), "one")], [positions],
                                       name=names(f"{base}/positions")),
                      self._unsqueeze(mask, [1], lengths, names(f"{base}/lengths"), constant),
                      helper.make_node("Cast", [lengths], [lengths64], name=names(f"{base}/lengths64"),
                                       to=TensorProto.INT64),
                      helper.make_node("Less", [positions, lengths64], [keep], name=names(f"{base}/keep"))]
        else:  # a raw [batch, keys] mask: 0 masks
            zero = np.zeros((), helper.tensor_dtype_to_np_dtype(view.elem_type(mask)))
            nodes.append(helper.make_node("Greater", [mask, constant(zero, "mask_zero")], [keep], name=names(f"{base}/keep")))
        flat, addend = names(f"{base}/mask_addend_2d"), names(f"{base}/mask_addend")
        filter_value = attribute(node, "mask_filter_value", MASK_FILTER_VALUE)
        nodes += [helper.make_node("Where", [keep, constant(np.array(0.0, dtype), "kept"),
                                             constant(np.array(filter_value, dtype), "masked")], [flat],
                                   name=names(f"{base}/mask_addend_2d")),
                  self._unsqueeze(flat, [1, 2], addend, names(f"{base}/mask_addend"), constant)]
        return addend

    def _unsqueeze(self, x: str, axes: list[int], out: str, name: str, constant) -> onnx.NodeProto:
        if self.opset >= 13:
            return helper.make_node("Unsqueeze", [x, constant(np.array(axes, np.int64), "axes")], [out], name=name)
        return helper.make_node("Unsqueeze", [x], [out], name=name, axes=axes)


def _widths(node: onnx.NodeProto, weight: np.ndarray) -> tuple[int, int, int] | None:
    """The Q, K and V widths of the packed weight's columns."""
    sizes = attribute(node, "qkv_hidden_sizes", None)
    if sizes is None:
        return (weight.shape[1] // 3,) * 3 if weight.shape[1] % 3 == 0 else None
    if len(sizes) != 3 or sizes[0] != sizes[1] or sum(sizes) != weight.shape[1]:
        return None
    return tuple(int(s) for s in sizes)


def _mask_kind(mask: str, view: GraphView) -> tuple[str, str | None]:
    """("lengths" | "raw", None) for the mask forms written out, or ("", why not)."""
    producer = view.producer.get(mask)
    if producer is not None and producer.op_type == "EmbedLayerNormalization" and list(producer.output[1:2]) == [mask]:
        return "lengths", None
    if view.rank(mask) == 2 and view.elem_type(mask) in (TensorProto.INT32, TensorProto.INT64):
        return "raw", None
    return "", ("mask_index is neither EmbedLayerNormalization's lengths nor a raw 2-D integer mask "
                "(1-D start and end positions, 3-D and 4-D masks are left fused)")
