"""Sparsity records: which layers hold N:M or unstructured zeros, kept in the model's metadata_props
under `onnxopt.sparsity` (JSON) so that deployment tools can find them, and checked against the
weights whenever asked (`onnxopt inspect`).

A record is keyed by the layer (the Conv/MatMul/Gemm node's name, else its first output): passes
rename weights (fuse writes a BatchNormalization into a new tensor, quant stores an int8 copy
behind a DequantizeLinear) but keep their layers, and a zero stays a zero through both. The weight
a record describes is found through the layer's weight input, following DequantizeLinear to its
int8 initializer. Each record holds the pattern ("2:4" or "unstructured"), the axis the pattern runs
along (the reduction axis) and the sparsity measured when it was written.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx

from .graph import GraphView

KEY = "onnxopt.sparsity"


def layer_key(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def read(model: onnx.ModelProto) -> dict[str, dict]:
    for prop in model.metadata_props:
        if prop.key == KEY:
            try:
                return json.loads(prop.value)
            except ValueError:
                return {}
    return {}


def write(model: onnx.ModelProto, records: dict[str, dict]) -> None:
    kept = [p for p in model.metadata_props if p.key != KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if records:
        model.metadata_props.add(key=KEY, value=json.dumps(records, sort_keys=True))


def weight_of(node: onnx.NodeProto, view: GraphView) -> np.ndarray | None:
    """The layer's weight values (through a DequantizeLinear, its integer tensor)."""
    name = node.input[1] if len(node.input) > 1 else ""
    producer = view.producer.get(name)
    if producer is not None and producer.op_type == "DequantizeLinear":
        name = producer.input[0]
    return view.constant(name)


def measure(weight: np.ndarray, pattern: str, axis: int) -> tuple[float, bool]:
    """(fraction of zeros, whether `pattern` holds along `axis`)."""
    sparsity = float(np.mean(weight == 0)) if weight.size else 0.0
    if pattern == "unstructured":
        return sparsity, True
    n, m = map(int, pattern.split(":"))
    moved = np.moveaxis(weight, axis, -1)
    if moved.shape[-1] % m:
        return sparsity, False
    groups = moved.reshape(-1, m)
    return sparsity, bool(np.all(np.sum(groups == 0, axis=1) >= n))


@dataclasses.dataclass
class Check:
    layer: str
    pattern: str
    recorded: float
    measured: float | None  # None: the layer is gone
    holds: bool


def verify(model: onnx.ModelProto) -> list[Check]:
    """Every record against the weights as they are now."""
    view = GraphView(model.graph, model.ir_version)
    layers = {layer_key(n): n for n in model.graph.node}
    checks = []
    for layer, record in read(model).items():
        node = layers.get(layer)
        weight = weight_of(node, view) if node is not None else None
        if weight is None:
            checks.append(Check(layer, record["pattern"], record["sparsity"], None, False))
            continue
        sparsity, holds = measure(weight, record["pattern"], record["axis"])
        checks.append(Check(layer, record["pattern"], record["sparsity"], sparsity, holds))
    return checks
