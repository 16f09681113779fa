"""Which layers read a group's channels: the consumers whose input statistics pruning collects
(`onnxopt.layer_inputs`)."""
from __future__ import annotations

import onnx

from onnxopt.graph import GraphView

from .groups import Group


def consumers(groups: list[Group], view: GraphView) -> dict[str, onnx.NodeProto]:
    """The Conv/MatMul/Gemm layers whose input channels some group prunes, by weight name."""
    found = {}
    for group in groups:
        for member in group.members:
            if member.role == "in" and member.layer is not None and view.constant(member.slot.tensor) is not None:
                found[member.slot.tensor] = member.layer
    return found
