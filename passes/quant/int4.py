"""int4 weight-only quantization of MatMul weights, blockwise along the reduction axis.

The layout (`onnxopt.blockwise`: one scale per column and block of consecutive k, zero point 8,
two nibbles per byte) is exactly what ORT's MatMulNBits (com.microsoft) takes; it dequantizes inside
the kernel, and with accuracy_level 4 runs the product on int8 (activations quantized per block on
the fly).

The alternative, a blocked int4 DequantizeLinear (opset 21) in front of MatMul, needs opset 21; ORT
turns it into the same MatMulNBits where it can. Models below opset 21 get MatMulNBits directly.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxopt.blockwise import quantize_blockwise
from onnxopt.graph import GraphView, NameGenerator
from onnxopt.surgery import replace_nodes

MS_DOMAIN = "com.microsoft"


def int4_candidates(model: onnx.ModelProto, block_size: int) -> list[onnx.NodeProto]:
    """MatMuls with a constant float 2-D weight whose K allows at least one full block."""
    view = GraphView(model.graph, model.ir_version)
    found = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            weight = view.constant(node.input[1])
            if weight is not None and weight.ndim == 2 and weight.dtype == np.float32 and weight.shape[0] >= block_size:
                found.append(node)
    return found


def quantize_int4(model: onnx.ModelProto, nodes: list[onnx.NodeProto], block_size: int,
                  accuracy_level: int = 4) -> int:
    """Replaces each MatMul in `nodes` with MatMulNBits; returns how many."""
    view = GraphView(model.graph, model.ir_version)
    names = NameGenerator(model.graph)
    replaced = {}
    for node in nodes:
        weight = view.constant(node.input[1])
        k, n = weight.shape
        packed, scales = quantize_blockwise(weight, block_size)
        q_name, s_name = names(node.input[1] + "_int4"), names(node.input[1] + "_int4_scales")
        model.graph.initializer.extend([numpy_helper.from_array(packed, q_name), numpy_helper.from_array(scales, s_name)])
        replaced[id(node)] = helper.make_node(
            "MatMulNBits", [node.input[0], q_name, s_name], list(node.output), name=names(node.name or "matmul_nbits"),
            domain=MS_DOMAIN, K=k, N=n, bits=4, block_size=block_size, accuracy_level=accuracy_level)
    replace_nodes(model, replaced, MS_DOMAIN)
    return len(replaced)
