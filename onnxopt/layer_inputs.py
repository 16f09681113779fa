"""What the representative data says about the inputs of weight layers (Conv, MatMul, Gemm with a
constant weight): for each layer, the Gram matrix of its input features (and their sums and count,
for a bias), accumulated batch by batch in one ORT session, so memory stays flat in the number of
samples. Pruning scores and refits layers with them; low-rank factorization whitens by them.

A MatMul's, MatMulNBits' or Gemm's features are its input's last axis; a Conv's are its input channels times its
kernel positions (im2col), so that a refit of the Conv is the same least-squares problem as a
MatMul's. A Conv whose features would exceed `MAX_FEATURES` keeps per-channel sums of squares only
(enough to score channels, not to refit the layer).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from .fetch import fetching_session
from .graph import GraphView, attribute

MAX_FEATURES = 2304  # a [2304, 2304] float64 Gram is 42 MB


@dataclasses.dataclass
class LayerInputStats:
    layer: onnx.NodeProto
    kernel: int  # features per input channel: kh * kw for a Conv, 1 for MatMul/Gemm
    gram: np.ndarray | None  # [F, F] float64, F = channels * kernel
    sums: np.ndarray  # [F]
    channel_sumsq: np.ndarray  # [channels]
    count: int = 0

    def add(self, features: np.ndarray) -> None:
        """`features`: [samples, F] float32."""
        x = features.astype(np.float64)
        if self.gram is not None:
            self.gram += x.T @ x
        self.sums += x.sum(axis=0)
        sq = np.square(x).sum(axis=0)
        self.channel_sumsq += sq.reshape(-1, self.kernel).sum(axis=1)
        self.count += x.shape[0]


def collect(model: onnx.ModelProto, layers: dict[str, onnx.NodeProto], batches, progress,
            gram: bool = True, label: str = "layer statistics") -> dict[str, LayerInputStats]:
    """Statistics of each layer's input over `batches`, keyed as `layers` is (usually by weight name;
    the weight is always the layer's second input); `gram=False` keeps per-channel sums only."""
    view = GraphView(model.graph, model.ir_version)
    stats = {}
    for key, layer in layers.items():
        if attribute(layer, "group", 1) != 1:
            continue  # a grouped Conv's features are not its weight's rows
        if layer.op_type == "MatMulNBits":  # its packed weight's shape is not [K, N]: K is an attribute
            channels, kernel = attribute(layer, "K", 0), 1
        elif (value := view.constant(layer.input[1])) is None:
            continue
        elif layer.op_type == "Conv":
            if not _windows_known(layer, value):
                continue  # no statistics: a pass leaves the layer's refit out
            channels, kernel = value.shape[1], int(np.prod(value.shape[2:]))
        elif layer.op_type == "Gemm" and attribute(layer, "transB", 0):
            channels, kernel = value.shape[1], 1
        else:
            channels, kernel = value.shape[0], 1
        width = channels * kernel
        matrix = np.zeros((width, width)) if gram and width <= MAX_FEATURES else None
        stats[key] = LayerInputStats(layer, kernel, matrix, np.zeros(width), np.zeros(channels))
    inputs = list(dict.fromkeys(st.layer.input[0] for st in stats.values()))
    if not inputs:
        return stats
    session, fetch = fetching_session(model, inputs)
    names = [fetch[n] for n in inputs]
    wanted = {i.name for i in session.get_inputs()}
    for feeds in progress(batches, label, "batch", getattr(batches, "num_batches", None)):
        values = dict(zip(inputs, session.run(names, {k: v for k, v in feeds.items() if k in wanted})))
        for st in stats.values():
            st.add(features(st.layer, values[st.layer.input[0]]))
    return stats


def _windows_known(conv: onnx.NodeProto, weight: np.ndarray) -> bool:
    """Whether `features` can cut this Conv's input into its windows: 1-D or 2-D, with kernel_shape
    and explicit (or no) pads."""
    return weight.ndim in (3, 4) and attribute(conv, "kernel_shape", None) is not None and \
        attribute(conv, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET", b"VALID", "VALID")


def features(layer: onnx.NodeProto, x: np.ndarray) -> np.ndarray:
    """The layer's input as rows of features: [positions, channels * kernel]."""
    if layer.op_type != "Conv":
        return x.reshape(-1, x.shape[-1]) if layer.op_type in ("MatMul", "MatMulNBits") else x.reshape(x.shape[0], -1)
    kernel = attribute(layer, "kernel_shape", None)
    auto_pad = attribute(layer, "auto_pad", b"NOTSET")
    if x.ndim == 3 and kernel is not None and len(kernel) == 1:  # a 1-D Conv (audio front ends) as 2-D, height 1
        x, kernel = x[:, :, None, :], [1, kernel[0]]
        strides = [1, *attribute(layer, "strides", [1])]
        dilations = [1, *attribute(layer, "dilations", [1])]
        begin, end = attribute(layer, "pads", [0, 0])
        pads = [0, 0, 0, 0] if auto_pad in (b"VALID", "VALID") else [0, begin, 0, end]
    else:
        strides = attribute(layer, "strides", [1, 1])
        dilations = attribute(layer, "dilations", [1, 1])
        pads = [0, 0, 0, 0] if auto_pad in (b"VALID", "VALID") else attribute(layer, "pads", [0, 0, 0, 0])
    if x.ndim != 4 or kernel is None or auto_pad not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise ValueError("only 1-D and 2-D Convs with kernel_shape and explicit pads are refit")
    kh, kw = kernel
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span_h, span_w = dilations[0] * (kh - 1) + 1, dilations[1] * (kw - 1) + 1
    windows = np.lib.stride_tricks.sliding_window_view(padded, (span_h, span_w), axis=(2, 3))
    windows = windows[:, :, ::strides[0], ::strides[1], ::dilations[0], ::dilations[1]]  # [N, C, H', W', kh, kw]
    n, c, h, w = windows.shape[:4]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * w, c * kh * kw)
