"""Where a quantized model holds the float tensors (for the SQNR table and `onnxopt compare`).

T quantized by QuantizeLinear(T) -> DequantizeLinear is compared through the DequantizeLinear's
output: the error measured is the one its readers see. A smoothed activation is quantized as
QuantizeLinear(Mul(T, 1/s)): its DequantizeLinear yields T / s, so the view carries the Mul's
constant as a divisor that multiplies it back by s.
"""
from __future__ import annotations

import numpy as np
import onnx

from onnxopt.graph import GraphView
from onnxopt.tensor_compare import TensorView


def dequantized_views(model: onnx.ModelProto) -> dict[str, TensorView]:
    """T -> (the output of a DequantizeLinear fed by QuantizeLinear(T), the divisor to undo)."""
    view = GraphView(model.graph, model.ir_version)
    q_of: dict[str, tuple[str, np.ndarray | None]] = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        source, divisor = node.input[0], None
        mul = view.producer.get(source)
        if mul is not None and mul.op_type == "Mul" and view.single_consumer(source) is node:
            constant = next((i for i in (1, 0) if view.constant(mul.input[i]) is not None), None)
            if constant is not None:
                source, divisor = mul.input[1 - constant], view.constant(mul.input[constant])
        q_of[node.output[0]] = (source, divisor)
    views = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in q_of:
            source, divisor = q_of[node.input[0]]
            views.setdefault(source, (node.output[0], divisor))
    return views
