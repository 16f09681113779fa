"""ONNX Runtime's own ops (domain com.microsoft) in torch, for models its transformer optimizer fused
(`model_optimized.onnx`), with the same calling convention as `torch_ops.OPS`. Semantics follow ORT's
contrib operator docs for the forms those models use:

- EmbedLayerNormalization: LayerNorm(word[ids] + position[position_ids or 0..S-1] + segment[segment_ids]);
  its mask_index output is each sequence's mask sum (int32, [batch]); output 2 the sum before the norm.
- SkipLayerNormalization: LayerNorm(input + skip + bias); output 3 that sum.
- BiasGelu, Gelu (erf), FastGelu (tanh), each after an optional bias.
- Attention (no past state, not causal): the packed Q, K, V projection, per-head softmax(Q K^T * scale +
  mask) V, with mask_index as each sequence's length ([batch]) or a raw [batch, keys] 0/1 mask.
`fuse` writes Attention and SkipLayerNormalization as ONNX ops for the CPU EP; these let `distill` run
a fused model either way.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .torch_ops import Attrs

MASK_FILTER_VALUE = -10000.0


def _embed_layer_norm(a: Attrs, opset, ids, segment_ids, words, positions, segments, gamma, beta, mask=None,
                      position_ids=None):
    if position_ids is None:
        position_ids = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape)
    total = words[ids.long()] + positions[position_ids.long()]
    if segments is not None and segment_ids is not None:
        total = total + segments[segment_ids.long()]
    out = F.layer_norm(total, total.shape[-1:], gamma, beta, a("epsilon", 1e-12))
    lengths = (mask.sum(dim=1) if mask is not None else torch.full(ids.shape[:1], ids.shape[1])).to(torch.int32)
    return [out, lengths, total]


def _skip_layer_norm(a: Attrs, opset, x, skip, gamma, beta=None, bias=None):
    total = x + skip if bias is None else x + skip + bias
    out = F.layer_norm(total, total.shape[-1:], gamma, beta, a("epsilon", 1e-12))
    return [out, None, None, total]


def _biased(fn):
    return lambda a, opset, x, bias=None: fn(x if bias is None else x + bias)


def _attention(a: Attrs, opset, x, weight, bias=None, mask=None, *rest):
    if any(r is not None for r in rest) or a("unidirectional", 0) or a("do_rotary", 0):
        raise NotImplementedError("Attention with past state, attention bias, causal or rotary")
    heads = a("num_heads")
    widths = a("qkv_hidden_sizes") or [weight.shape[1] // 3] * 3
    qkv = x @ weight if bias is None else x @ weight + bias
    q, k, v = torch.split(qkv, list(widths), dim=-1)
    batch, seq = x.shape[:2]
    q, k, v = (t.reshape(batch, seq, heads, -1).transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) * (a("scale", 0.0) or 1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        if mask.dim() == 1:  # each sequence's length: keys from it on are masked
            keep = torch.arange(k.shape[2], device=x.device)[None, :] < mask.long()[:, None]
        elif mask.dim() == 2:
            keep = mask > 0
        else:
            raise NotImplementedError(f"Attention with a {mask.dim()}-D mask_index")
        filler = torch.tensor(a("mask_filter_value", MASK_FILTER_VALUE), dtype=scores.dtype)
        scores = scores + torch.where(keep, torch.zeros((), dtype=scores.dtype), filler)[:, None, None, :]
    context = torch.softmax(scores, dim=-1) @ v
    return [context.transpose(1, 2).reshape(batch, seq, -1), None]


CONTRIB_OPS = {
    "EmbedLayerNormalization": _embed_layer_norm,
    "SkipLayerNormalization": _skip_layer_norm,
    "BiasGelu": lambda a, opset, x, bias: F.gelu(x + bias),
    "Gelu": _biased(F.gelu),
    "FastGelu": _biased(lambda x: F.gelu(x, approximate="tanh")),
    "Attention": _attention,
}
