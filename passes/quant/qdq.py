"""Inserting QuantizeLinear/DequantizeLinear for a quantization plan (the only step that edits the graph).

Each quantized activation gets one QuantizeLinear right after it is produced and one dedicated
DequantizeLinear per quantized reader, placed just before that reader: ORT's QDQ fusions want a DQ
that feeds a single node. Weights become int8 initializers behind a DequantizeLinear (per-channel
`axis` where the plan says so), biases int32 with scale = s_input * s_weight and zero point 0. Float
readers of a quantized tensor keep reading the float tensor.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxopt.graph import GraphView, NameGenerator

from onnxopt.surgery import remove_unused_initializers
from .plan import Plan, QuantParams


def quantize_weight(weight: np.ndarray, params: QuantParams) -> np.ndarray:
    scale = _broadcast(params.scale, params.axis, weight.ndim)
    info = np.iinfo(params.dtype)
    # symmetric: use [-127, 127] so that negating a weight never overflows
    low = info.min + 1 if info.min < 0 else info.min
    return np.clip(np.round(weight / scale), low, info.max).astype(params.dtype)


def dequantize_weight(quantized: np.ndarray, params: QuantParams) -> np.ndarray:
    """The float64 values a DequantizeLinear of `quantized` yields (symmetric: zero point 0)."""
    return quantized.astype(np.float64) * _broadcast(params.scale.astype(np.float64), params.axis, quantized.ndim)


def _broadcast(values: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    if axis is None or values.ndim == 0:
        return values
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


class QDQInserter:
    """Inserts the plan's Q/DQ into `graph` (the main graph or a subgraph: `view` sees the weights of
    the enclosing graphs, and the int8 copies of those go into this graph)."""

    def __init__(self, graph: onnx.GraphProto, view: GraphView, names: NameGenerator):
        self.graph = graph
        self.view = view
        self.names = names
        self.new_initializers: list[onnx.TensorProto] = []

    def _param_tensors(self, base: str, params: QuantParams) -> tuple[str, str]:
        scale, zero = self.names(base + "_scale"), self.names(base + "_zero_point")
        self.new_initializers.append(numpy_helper.from_array(params.scale.astype(np.float32), scale))
        self.new_initializers.append(numpy_helper.from_array(params.zero_point, zero))
        return scale, zero

    def _dq(self, source: str, scale: str, zero: str, axis: int | None, base: str) -> tuple[onnx.NodeProto, str]:
        out = self.names(base + "_dq")
        attrs = {"axis": axis} if axis is not None else {}
        return helper.make_node("DequantizeLinear", [source, scale, zero], [out], name=self.names(out), **attrs), out

    def _feed_readers(self, readers, source: str, scale: str, zero: str, axis: int | None, base: str,
                      before: dict[int, list[onnx.NodeProto]]) -> None:
        """A dedicated DequantizeLinear of `source` in front of each (node, input index) reader."""
        for node, index in readers:
            dq, out = self._dq(source, scale, zero, axis, base)
            before.setdefault(id(node), []).append(dq)
            node.input[index] = out

    def apply(self, plan: Plan) -> dict[str, int]:
        before: dict[int, list[onnx.NodeProto]] = {}  # DQs to place before node id
        after: dict[str, list[onnx.NodeProto]] = {}   # Qs to place after the producer of a tensor
        produced = {o for n in self.graph.node for o in n.output}
        counts = {"activations quantized": 0, "weights quantized": 0, "biases quantized": 0}

        for tensor, params in plan.activations.items():
            readers = plan.consumers.get(tensor)
            if not readers:
                continue
            scale, zero = self._param_tensors(tensor, params)
            quantized = self.names(tensor + "_q")
            if params.smooth is None:
                q = helper.make_node("QuantizeLinear", [tensor, scale, zero], [quantized], name=self.names(quantized))
            else:
                # x / s as a broadcast Mul before a per-tensor Q: ORT's per-axis QuantizeLinear is several
                # times slower than Mul + QuantizeLinear on CPU
                inv = self.names(tensor + "_smooth_inv")
                self.new_initializers.append(numpy_helper.from_array((1.0 / params.smooth).astype(np.float32), inv))
                smoothed = self.names(tensor + "_smoothed")
                after.setdefault(tensor if tensor in produced else "", []).append(
                    helper.make_node("Mul", [tensor, inv], [smoothed], name=self.names(smoothed)))
                q = helper.make_node("QuantizeLinear", [smoothed, scale, zero], [quantized], name=self.names(quantized))
            after.setdefault(tensor if tensor in produced else "", []).append(q)
            self._feed_readers(readers, quantized, scale, zero, None, tensor, before)
            counts["activations quantized"] += 1

        for tensor, params in plan.weights.items():
            weight = self.view.constant(tensor, keep=False)
            if weight is None:
                continue
            q_name = self.names(tensor + "_quantized")
            self.new_initializers.append(numpy_helper.from_array(quantize_weight(weight, params), q_name))
            scale, zero = self._param_tensors(tensor, params)
            self._feed_readers(plan.consumers[tensor], q_name, scale, zero, params.axis, tensor, before)
            counts["weights quantized"] += 1

        for tensor, (activation, weight_name) in plan.biases.items():
            bias = self.view.constant(tensor, keep=False)
            if bias is None or activation not in plan.activations:
                continue
            bias = bias.astype(np.float64)
            w_params = plan.weights[weight_name]
            scale = (plan.activations[activation].scale.astype(np.float64) * w_params.scale.astype(np.float64))
            scale = np.broadcast_to(scale, bias.shape) if scale.ndim else scale
            q_bias = np.clip(np.round(bias / scale), -2**31, 2**31 - 1).astype(np.int32)
            q_name = self.names(tensor + "_quantized")
            self.new_initializers.append(numpy_helper.from_array(q_bias, q_name))
            params = QuantParams(scale.astype(np.float32), np.zeros(scale.shape, np.int32), 0 if scale.ndim else None)
            scale_name, zero_name = self._param_tensors(tensor, params)
            self._feed_readers(plan.consumers[tensor], q_name, scale_name, zero_name, params.axis, tensor, before)
            counts["biases quantized"] += 1

        self._rebuild(before, after)
        return counts

    def _rebuild(self, before, after) -> None:
        nodes = list(after.get("", []))
        for node in self.graph.node:
            nodes.extend(before.get(id(node), []))
            nodes.append(node)
            for out in node.output:
                nodes.extend(after.get(out, []))
        # graph inputs quantized before any node: their Q nodes were put first
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        self.graph.initializer.extend(self.new_initializers)
        remove_unused_initializers(self.graph)
