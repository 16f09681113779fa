"""int4 weight-only quantization of MatMul weights, blockwise along the reduction axis.

For W [K, N] and block size B, every column n and block b of B consecutive k gets one scale
s = max|W[b*B:(b+1)*B, n]| / 7 and values q = clip(round(W / s), -8, 7) + 8 stored as unsigned nibbles
(zero point 8), two per byte, low nibble first. ORT's MatMulNBits (com.microsoft) takes exactly that
layout: B as uint8 [N, K / B, B / 2], scales [N, K / B]; it dequantizes inside the kernel, and with
accuracy_level 4 runs the product on int8 (activations quantized per block on the fly).

The alternative, a blocked int4 DequantizeLinear (opset 21) in front of MatMul, needs opset 21; ORT
turns it into the same MatMulNBits where it can. Models below opset 21 get MatMulNBits directly.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxopt.graph import GraphView, NameGenerator

from onnxopt.surgery import replace_nodes

MS_DOMAIN = "com.microsoft"


def quantize_blockwise(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(packed uint8 [N, blocks, block_size / 2], scales float32 [N, blocks]) for W [K, N]."""
    k, n = weight.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), np.float32)
    padded[:k] = weight
    per_block = padded.T.reshape(n, blocks, block_size)
    scales = np.maximum(np.abs(per_block).max(axis=2), 1e-12) / 7.0
    q = np.clip(np.round(per_block / scales[:, :, None]), -8, 7).astype(np.int16) + 8
    packed = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).astype(np.uint8)
    return packed, scales.astype(np.float32)


def dequantize_blockwise(packed: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """The weights MatMulNBits computes with (for tests and error reports)."""
    low, high = packed & 0x0F, packed >> 4
    q = np.empty(packed.shape[:2] + (packed.shape[2] * 2,), np.int16)
    q[:, :, 0::2], q[:, :, 1::2] = low, high
    w = (q - 8) * scales[:, :, None]
    return w.reshape(w.shape[0], -1)[:, :k].T.astype(np.float32)


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
