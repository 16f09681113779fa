"""LSTM layers as ONNX Runtime's DynamicQuantizeLSTM (com.microsoft), the int8 recurrent kernel ORT has.

ONNX's LSTM keeps W [directions, 4 * hidden, input] and R [directions, 4 * hidden, hidden];
DynamicQuantizeLSTM takes them int8 and transposed, W [directions, input, 4 * hidden] and
R [directions, hidden, 4 * hidden], with one symmetric scale per direction and gate row
([directions, 4 * hidden], zero points 0) or per direction, and quantizes X and the hidden state
per step at run time, as DynamicQuantizeMatMul does. Its other inputs (B, sequence_lens,
initial_h, initial_c, P) and attributes are the LSTM's. A layer is rewritten only where the layout
is the default one (layout=0) and W and R are constant float tensors.

GRU and plain RNN have no int8 kernel in ORT: they stay float, and the report says so.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxopt.graph import GraphView, NameGenerator
from onnxopt.surgery import replace_nodes

from .plan import QuantParams, weight_params
from .qdq import quantize_weight

MS_DOMAIN = "com.microsoft"


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def lstm_candidates(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    view = GraphView(model.graph, model.ir_version)
    found = []
    for node in model.graph.node:
        if node.op_type != "LSTM" or node.domain not in ("", "ai.onnx") or _attrs(node).get("layout", 0):
            continue
        weights = [view.constant(node.input[i]) for i in (1, 2)]
        if all(w is not None and w.ndim == 3 and w.dtype == np.float32 for w in weights):
            found.append(node)
    return found


def float_recurrent_layers(model: onnx.ModelProto) -> list[str]:
    """GRU and RNN layers, which ORT cannot run in int8."""
    return [f"{n.op_type} '{n.name}'" for n in model.graph.node if n.op_type in ("GRU", "RNN")
            and n.domain in ("", "ai.onnx")]


def _quantized(weight: np.ndarray, per_channel: bool, bits: int, base: str, names: NameGenerator):
    """(initializers, their names) of the int8 weight transposed to [D, K, 4H], its scale and zero
    point, for W or R [D, 4H, K]."""
    directions, rows, cols = weight.shape
    flat = weight.reshape(directions * rows, cols)
    if per_channel:
        scale = weight_params(flat, 0, bits).scale.reshape(directions, rows)
        row_scale = scale
    else:
        scale = np.array([weight_params(weight[d], None, bits).scale for d in range(directions)], np.float32)
        row_scale = np.repeat(scale[:, None], rows, axis=1)
    row_scale = row_scale.reshape(-1).astype(np.float32)
    q = quantize_weight(flat, QuantParams(row_scale, np.zeros(row_scale.shape, np.int8), 0))
    q = np.ascontiguousarray(q.reshape(directions, rows, cols).transpose(0, 2, 1))
    q_name, s_name, z_name = names(f"{base}_quantized"), names(f"{base}_scale"), names(f"{base}_zero_point")
    return [numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale.astype(np.float32), s_name),
            numpy_helper.from_array(np.zeros(scale.shape, np.int8), z_name)], (q_name, s_name, z_name)


def quantize_lstms(model: onnx.ModelProto, nodes: list[onnx.NodeProto], per_channel: bool = True,
                   weight_bits: int = 8) -> int:
    """Rewrites `nodes` (from `lstm_candidates`) in place as DynamicQuantizeLSTM; returns how many."""
    view = GraphView(model.graph, model.ir_version)
    names = NameGenerator(model.graph)
    replaced = {}
    for node in nodes:
        w_inits, (w_q, w_s, w_z) = _quantized(view.constant(node.input[1]), per_channel, weight_bits,
                                              node.input[1], names)
        r_inits, (r_q, r_s, r_z) = _quantized(view.constant(node.input[2]), per_channel, weight_bits,
                                              node.input[2], names)
        model.graph.initializer.extend(w_inits + r_inits)
        optional = [node.input[i] if i < len(node.input) else "" for i in range(3, 8)]  # B, lens, h, c, P
        quantized = helper.make_node("DynamicQuantizeLSTM", [node.input[0], w_q, r_q, *optional, w_s, w_z, r_s, r_z],
                                     list(node.output), name=names(node.name or "lstm") + "_int8", domain=MS_DOMAIN)
        quantized.attribute.extend(node.attribute)
        replaced[id(node)] = quantized
    replace_nodes(model, replaced, MS_DOMAIN)
    return len(replaced)
