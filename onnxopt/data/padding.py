"""Cutting right-padding off batches of representative data for sequence models.

Tokenized calibration sets are usually padded to one length (all-MiniLM's 160 sentences: 14 real
tokens on average, padded to 128). Under a 0/1 attention mask, real tokens never attend to padding,
so their activations do not depend on how many padding positions follow them: a batch cut to its
longest real sequence gives the same activations at every real position, for a fraction of the
inference. Padding positions compute values nobody reads; leaving most of them out of the
statistics is a gain, not a loss. One padding position is kept in every batch that had padding, so
that tensors carrying the additive mask (-1e9, -3.4e38) still show those values and stay float.

Only trailing columns where every sample's mask is 0 are cut (left padding is left alone: cutting
it would shift positions), and only on a sequence axis the model leaves dynamic.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx

from ..inputs import real_inputs

Feeds = dict[str, np.ndarray]
_MASK_NAME = re.compile(r"mask", re.IGNORECASE)  # attention_mask, input_mask, src_key_padding_mask...
_INTEGER_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL}


@dataclasses.dataclass(frozen=True)
class PaddingLayout:
    mask: str  # a [batch, sequence] input of 0/1 (or bool) values
    padded: tuple[str, ...]  # the inputs whose axis 1 is that sequence axis, the mask included


def padding_layout(model: onnx.ModelProto) -> PaddingLayout | None:
    """The attention-mask input and the inputs sharing its dynamic sequence axis, if the model has one."""
    inputs = real_inputs(model)
    for vi in inputs:
        dims = vi.type.tensor_type.shape.dim
        if (not _MASK_NAME.search(vi.name) or vi.type.tensor_type.elem_type not in _INTEGER_TYPES
                or len(dims) != 2 or not dims[1].dim_param):
            continue
        symbol = dims[1].dim_param
        padded = tuple(other.name for other in inputs
                       if len(other.type.tensor_type.shape.dim) >= 2
                       and other.type.tensor_type.shape.dim[1].dim_param == symbol)
        return PaddingLayout(vi.name, padded)
    return None


def real_lengths(feeds: Feeds, layout: PaddingLayout) -> np.ndarray | None:
    """Each sample's position after its last real token, or None when the mask is not 0/1."""
    mask = feeds[layout.mask]
    if mask.ndim != 2 or not np.isin(mask, (0, 1)).all():
        return None
    used = mask.astype(bool)
    return np.where(used.any(axis=1), mask.shape[1] - np.argmax(used[:, ::-1], axis=1), 0)


def trim(feeds: Feeds, layout: PaddingLayout, spare: int = 1) -> Feeds:
    """The batch cut after its longest real sequence plus `spare` padding positions."""
    lengths = real_lengths(feeds, layout)
    width = feeds[layout.mask].shape[1]
    if lengths is None or not lengths.size:
        return feeds
    keep = min(width, int(lengths.max()) + spare)
    if keep >= width:
        return feeds
    return {name: np.ascontiguousarray(array[:, :keep]) if name in layout.padded else array
            for name, array in feeds.items()}


def longest_sample(feeds: Feeds, layout: PaddingLayout) -> Feeds:
    """The batch's longest sample alone, cut to its real length: no padding position at all.

    For per-tensor error reports: padding positions are not calibrated (see above) and their values
    are not used, so errors there would drown the errors that matter."""
    lengths = real_lengths(feeds, layout)
    if lengths is None or not lengths.size:
        return feeds
    row = int(lengths.argmax())
    return trim({name: array[row:row + 1] if array.ndim else array for name, array in feeds.items()}, layout, spare=0)
