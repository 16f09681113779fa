"""Size facts about a model: node counts by op type, parameters, bytes on disk."""
from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import onnx

from .graph import GraphView
from .model_io import file_size


@dataclasses.dataclass
class ModelStats:
    nodes: int
    ops: dict[str, int]
    parameters: int
    size_bytes: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def count_parameters(model: onnx.ModelProto) -> int:
    """Elements of every weight: initializers, Constant nodes, and ConstantOfShape with a constant shape.

    Some real exports hold weights in Constant nodes, and the onnx package's light models build them
    with ConstantOfShape; counting all three keeps the number stable across constant folding.
    """
    graph = model.graph
    view = GraphView(graph, model.ir_version)
    total = sum(int(np.prod(t.dims)) for t in graph.initializer if t.name not in view.graph_inputs)
    for node in graph.node:
        if node.op_type == "Constant":
            value = view.constant(node.output[0])
            total += int(value.size) if value is not None else 0
        elif node.op_type == "ConstantOfShape" and node.input and view.is_constant(node.input[0]):
            total += int(np.prod(view.constant(node.input[0])))
    return total


def model_stats(model: onnx.ModelProto) -> ModelStats:
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in model.graph.node)
    return ModelStats(
        nodes=len(model.graph.node),
        ops=dict(sorted(ops.items())),
        parameters=count_parameters(model),
        size_bytes=file_size(model),
    )
