"""The int4 blockwise weight layout ORT's MatMulNBits (com.microsoft) reads, shared by `quant:bits=4`
(which writes it) and `lowrank:compensate=true` (which corrects its error).

For W [K, N] and block size B, every column n and block b of B consecutive k gets one scale
s = max|W[b*B:(b+1)*B, n]| / 7 and values q = clip(round(W / s), -8, 7) + 8 stored as unsigned nibbles
(zero point 8), two per byte, low nibble first: B as uint8 [N, K / B, B / 2], scales [N, K / B].
"""
from __future__ import annotations

import numpy as np


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
