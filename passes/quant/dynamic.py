"""Dynamic int8 MatMul: weights quantized ahead of time, activations at run time.

MatMul(x, W) with a constant 2-D W becomes ORT's DynamicQuantizeMatMul (com.microsoft): the kernel
computes x's scale from its min/max on every call, quantizes it to uint8 and runs the int8 GEMM with
the per-column weight scales. No calibration is needed, and the scale adapts to each batch, which
keeps accuracy where one static scale cannot cover the activation's spread (e.g. after GELU).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxopt.graph import GraphView, NameGenerator

from onnxopt.surgery import replace_nodes
from .plan import weight_params
from .qdq import quantize_weight

MS_DOMAIN = "com.microsoft"


def dynamic_candidates(model: onnx.ModelProto, nodes: list[onnx.NodeProto] | None = None) -> list[onnx.NodeProto]:
    """MatMuls with a constant 2-D float weight."""
    view = GraphView(model.graph, model.ir_version)
    out = []
    for node in nodes if nodes is not None else model.graph.node:
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            weight = view.constant(node.input[1])
            if weight is not None and weight.ndim == 2 and weight.dtype == np.float32:
                out.append(node)
    return out


def quantize_dynamic(model: onnx.ModelProto, nodes: list[onnx.NodeProto], per_channel: bool = True,
                     weight_bits: int = 8) -> int:
    """Rewrites `nodes` (MatMuls from `dynamic_candidates`) in place; returns how many."""
    view = GraphView(model.graph, model.ir_version)
    names = NameGenerator(model.graph)
    replaced: dict[int, onnx.NodeProto] = {}
    for node in nodes:
        weight = view.constant(node.input[1])
        params = weight_params(weight, 1 if per_channel else None, weight_bits)
        base = node.input[1]
        q_name, s_name, z_name = names(base + "_quantized"), names(base + "_scale"), names(base + "_zero_point")
        model.graph.initializer.extend([
            numpy_helper.from_array(quantize_weight(weight, params), q_name),
            numpy_helper.from_array(params.scale, s_name),
            numpy_helper.from_array(params.zero_point, z_name),
        ])
        replaced[id(node)] = helper.make_node("DynamicQuantizeMatMul", [node.input[0], q_name, s_name, z_name],
                                              list(node.output), name=names(node.name or "dqmm"), domain=MS_DOMAIN)
    replace_nodes(model, replaced, MS_DOMAIN)
    return len(replaced)
