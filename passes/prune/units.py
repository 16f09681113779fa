"""What a channel group is made of: slots of (tensor, axis, index range), members with their width
per unit, and the shape constants that shrink with it (see groups.py)."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from onnxopt.graph import GraphView


class Blocked(Exception):
    """Why a group cannot be pruned."""


class SplitAcross(Blocked):
    """The walk reached a Split that cuts the seed's whole axis into parts (a fused Q/K/V or gate/up
    projection): the parts are seeds of their own. `cuts`: where, from the axis' start."""

    def __init__(self, cuts: list[int]):
        super().__init__("Split along the channel axis cuts it into parts")
        self.cuts = cuts


@dataclasses.dataclass(frozen=True)
class Slot:
    tensor: str
    axis: int
    lo: int
    hi: int


@dataclasses.dataclass
class Member:
    slot: Slot
    width: int  # indices per unit on this axis
    role: str  # "out" (a weight's output channels), "in" (a weight's input channels), "param", "act"
    layer: onnx.NodeProto | None = None  # the Conv/MatMul/Gemm whose weight this is ("in" and "out")

    def indices(self, units: list[int]) -> np.ndarray:
        """The indices of this member's axis that `units` cover."""
        lo, w = self.slot.lo, self.width
        return np.concatenate([np.arange(lo + u * w, lo + (u + 1) * w) for u in units]) if units else np.zeros(0, int)


@dataclasses.dataclass
class ReshapeTarget:
    """A Reshape whose constant target shape names the group's axis: it must shrink with it."""

    node: onnx.NodeProto
    axis: int
    width: int  # target units per group unit on that axis


@dataclasses.dataclass
class SplitPart:
    """An output of a Split along the group's axis: its size in the Split's sizes shrinks with the group."""

    node: onnx.NodeProto
    output: int
    width: int  # indices of that output per group unit
    sizes: tuple[int, ...]  # the Split's output sizes before pruning


@dataclasses.dataclass
class SliceBounds:
    """A Slice along the group's axis, with its bounds as they were: they move by the channels removed
    before them."""

    node: onnx.NodeProto
    axis: int  # of its input
    start: int
    end: int
    size: int  # the input's axis before pruning


@dataclasses.dataclass
class Group:
    units: int
    members: list[Member]
    reshapes: list[ReshapeTarget]
    sources: list[str]  # names of the layers whose output channels the group removes
    # grouped Convs (depthwise ones too) and how many of their conv groups one unit holds: `group` shrinks
    grouped: list[tuple[onnx.NodeProto, int]] = dataclasses.field(default_factory=list)
    reshaped: bool = False  # a Reshape splits or merges the axis on the way (heads: [.., H * D] -> [.., H, D])
    splits: list[SplitPart] = dataclasses.field(default_factory=list)  # their sizes shrink too
    slices: list[SliceBounds] = dataclasses.field(default_factory=list)  # Slices of the axis: their bounds move

    def weights(self, view: GraphView, role: str) -> list[Member]:
        return [m for m in self.members if m.role == role and view.constant(m.slot.tensor) is not None]

    def describe(self) -> str:
        return f"{', '.join(self.sources[:3])}{' ...' if len(self.sources) > 3 else ''} ({self.units} units)"
