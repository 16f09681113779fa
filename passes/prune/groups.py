"""Channel groups: which (tensor, axis) slices of an ONNX graph must shrink together.

Removing output channel c of a Conv removes channel c of its bias, of the BatchNormalization after
it, of every elementwise op on the way, of an `Add` that sums it with another branch (and so of
that branch's source too), and input channel c of every Conv or MatMul that reads it. As
Torch-Pruning's DepGraph does for torch modules, we walk the graph from each layer's output-channel
axis, op by op, and collect every slice tied to it into a `Group`; a group shrinks by whole units.

A member is a `Slot` (tensor, axis, lo, hi: the indices [lo, hi) of that axis the group covers)
with a `width`: unit u is indices [lo + u * width, lo + (u + 1) * width). Widths change where a
reshape splits or merges the axis (a Flatten after a conv: one channel is H * W columns; an
attention projection reshaped to [batch, seq, heads, head_dim]: a unit becomes a whole head), and
`lo` where a Concat or Split shifts channels. Widths are kept as fractions while walking and scaled
to integers at the end, which makes the unit as coarse as the coarsest member needs (a head).

A group is blocked, and never pruned, when its walk reaches a graph input or output (their shapes
are the model's contract), an axis an op normalizes or reduces over (LayerNormalization of a
transformer's residual stream, Softmax), a subgraph, or an op without a rule here; the reason is kept
for the report.
"""
from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np
import onnx

from onnxopt.graph import GraphView, attribute, infer_dims, subgraph_inputs

from .targets import size_read, split_sizes, target_entry, target_piece

UNARY = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Erf", "Gelu", "Elu", "Selu", "HardSigmoid", "HardSwish",
         "Softplus", "Softsign", "Cast", "Identity", "Dropout", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal",
         "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Mish", "Celu", "ThresholdedRelu", "Clip", "Not"}
BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "PRelu", "Equal", "Greater", "Less",
             "And", "Or", "Xor", "Mod", "Sum", "Mean", "BitShift"}
REDUCE = {"ReduceMax", "ReduceMin", "ReduceSum", "ReduceMean"}
POOLS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
SHAPE_READERS = {"Shape", "Size"}  # read a tensor's dims, not its values: they follow the new size
# ONNX Runtime's activations (com.microsoft, as its transformer optimizer fuses them): x, and an optional
# bias broadcast over x's last axis, added before the activation; elementwise in every other way
ORT_ACTIVATIONS = {"BiasGelu", "FastGelu", "Gelu", "QuickGelu"}


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
class Group:
    units: int
    members: list[Member]
    reshapes: list[ReshapeTarget]
    sources: list[str]  # names of the layers whose output channels the group removes
    depthwise: list[onnx.NodeProto] = dataclasses.field(default_factory=list)  # their `group` shrinks too
    reshaped: bool = False  # a Reshape splits or merges the axis on the way (heads: [.., H * D] -> [.., H, D])
    splits: list[SplitPart] = dataclasses.field(default_factory=list)  # their sizes shrink too

    def weights(self, view: GraphView, role: str) -> list[Member]:
        return [m for m in self.members if m.role == role and view.constant(m.slot.tensor) is not None]

    def describe(self) -> str:
        return f"{', '.join(self.sources[:3])}{' ...' if len(self.sources) > 3 else ''} ({self.units} units)"


def find_groups(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None
                ) -> tuple[list[Group], list[str]]:
    """Every prunable group of the main graph, and why the other candidates are blocked. `shapes`:
    tensors' shapes as ONNX Runtime computed them on a sample (see `reshape_probes`), where shape
    inference loses track of dynamic dims across a Reshape."""
    finder = _Finder(model, shapes or {})
    groups, blocked, seen, parts_seen = [], [], set(), set()
    for node in model.graph.node:
        seed = finder.seed(node)
        if seed is None or (seed.tensor, seed.axis) in seen:
            continue
        try:
            found = [finder.walk(seed, node)]
        except SplitAcross as exc:  # a fused projection: each part of the Split is a seed
            found = finder.parts(seed, node, exc.cuts, parts_seen, blocked)
        except Blocked as exc:
            blocked.append(f"{node.op_type} '{node.name or node.output[0]}': {exc}")
            seen.add((seed.tensor, seed.axis))
            continue
        for group in found:
            seen.update((m.slot.tensor, m.slot.axis) for m in group.members)  # a depthwise Conv's seed is in it too
            groups.append(group)
        seen.add((seed.tensor, seed.axis))
    return groups, blocked


def shape_probes(model: onnx.ModelProto) -> list[str]:
    """Tensors whose shapes shape inference does not fully know (a dynamic dim it lost track of, an
    Expand's computed size): their shapes on a sample tell how a Reshape maps the channel axis and
    whether a broadcast input has size 1 there."""
    dims = infer_dims(model)
    produced = [o for node in model.graph.node for o in node.output if o]
    return [n for n in produced if n not in dims or any(d is None for d in dims[n])]


class _Finder:
    def __init__(self, model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]):
        self.graph = model.graph
        self.view = GraphView(model.graph, model.ir_version)
        self.dims = infer_dims(model, symbolic=True)
        self.dims.update(shapes)
        for tensor in model.graph.initializer:
            self.dims[tensor.name] = tuple(tensor.dims)
        self.outer = set()
        for node in model.graph.node:
            self.outer |= subgraph_inputs(node)
        self.inputs = {i.name for i in model.graph.input} - set(self.view.initializers)

    # ------------------------------------------------------------------ seeds and the walk

    def seed(self, node: onnx.NodeProto) -> Slot | None:
        """The output-channel axis of a layer's constant weight."""
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            return None
        weight = self.view.constant(node.input[1])
        if weight is None or weight.dtype.kind != "f":
            return None
        if node.op_type == "Conv":
            return Slot(node.input[1], 0, 0, weight.shape[0])
        if node.op_type == "MatMul" and weight.ndim == 2:
            return Slot(node.input[1], 1, 0, weight.shape[1])
        if node.op_type == "Gemm" and weight.ndim == 2:
            axis = 0 if attribute(node, "transB", 0) else 1
            return Slot(node.input[1], axis, 0, weight.shape[axis])
        return None

    def parts(self, seed: Slot, layer: onnx.NodeProto, cuts: list[int], seen: set, blocked: list) -> list[Group]:
        """The groups of each part of a seed axis a Split cuts (Q, K and V of a fused projection come
        out as one group of heads, tied by the attention between them)."""
        bounds = [0, *cuts, seed.hi - seed.lo]
        groups = []
        for lo, hi in zip(bounds, bounds[1:]):
            part = Slot(seed.tensor, seed.axis, seed.lo + lo, seed.lo + hi)
            if part in seen:
                continue
            try:
                group = self.walk(part, layer)
            except Blocked as exc:
                blocked.append(f"{layer.op_type} '{layer.name or layer.output[0]}' [{part.lo}:{part.hi}]: {exc}")
                seen.add(part)
                continue
            seen.update(m.slot for m in group.members)
            groups.append(group)
        return groups

    def walk(self, seed: Slot, layer: onnx.NodeProto) -> Group:
        widths: dict[Slot, Fraction] = {}
        roles: dict[Slot, str] = {}
        self._depthwise: dict[int, onnx.NodeProto] = {}
        self._size_reads: list[tuple[str, int]] = []  # (tensor, axis) whose run-time size a target takes
        self._reshaped = False
        self._seed = seed
        self._splits: list[tuple[onnx.NodeProto, int, Fraction, tuple[int, ...]]] = []
        reshapes: list[tuple[onnx.NodeProto, int, Fraction, int, int]] = []  # (node, axis, width, output range)
        sources: list[str] = []
        todo = [(seed, Fraction(1))]
        while todo:
            slot, width = todo.pop()
            known = widths.get(slot)
            if known is not None:
                if known != width:
                    raise Blocked(f"{slot.tensor} is reached with two different channel layouts")
                continue
            widths[slot] = width
            if slot.tensor in self.inputs or slot.tensor in self.view.graph_outputs:
                raise Blocked(f"it reaches the graph's {'input' if slot.tensor in self.inputs else 'output'} "
                              f"{slot.tensor}, whose shape cannot change")
            if slot.tensor in self.outer:
                raise Blocked(f"{slot.tensor} is read inside a subgraph")
            if self.view.constant(slot.tensor) is not None:  # a weight or parameter: it ends here
                roles.setdefault(slot, "param")
                for node in self.view.consumers.get(slot.tensor, []):
                    todo += self._through(node, slot, width, roles, reshapes, sources)
                continue
            roles[slot] = "act"
            producer = self.view.producer.get(slot.tensor)
            if producer is not None:
                todo += self._through(producer, slot, width, roles, reshapes, sources)
            for node in self.view.consumers.get(slot.tensor, []):
                todo += self._through(node, slot, width, roles, reshapes, sources)
        whole = {(s.tensor, s.axis) for s in widths if s.lo == 0 and s.hi == self._dim(s.tensor, s.axis)}
        for tensor, axis in self._size_reads:  # a target's size read from a tensor must shrink as the group does
            if (tensor, axis) not in whole:
                raise Blocked(f"a Reshape or Expand takes its size at the channel axis from {tensor}, which does "
                              "not shrink with the group")
        # each target edit once per output range: the parts of a fused projection through one Reshape add up
        reshapes = list({(id(n), a, lo, hi): (n, a, w) for n, a, w, lo, hi in reshapes}.values())
        scale = math.lcm(*(w.denominator for w in widths.values()), *(w.denominator for _, _, w in reshapes),
                         *(w.denominator for _, _, w, _ in self._splits))
        units = Fraction(seed.hi - seed.lo) / (widths[seed] * scale)
        if units.denominator != 1 or units < 2:
            raise Blocked("its channels do not split into whole units")
        members = [Member(s, int(w * scale), *roles[s]) if isinstance(roles[s], tuple) else
                   Member(s, int(w * scale), roles[s]) for s, w in widths.items()]
        if not sources:
            sources = [layer.name or layer.output[0]]
        splits = {(id(n), i): SplitPart(n, i, int(w * scale), sizes) for n, i, w, sizes in self._splits}
        return Group(int(units), members, [ReshapeTarget(n, a, int(w * scale)) for n, a, w in reshapes],
                     list(dict.fromkeys(sources)), list(self._depthwise.values()), self._reshaped,
                     list(splits.values()))

    # ------------------------------------------------------------------ op rules

    def _rank(self, name: str) -> int:
        dims = self.dims.get(name)
        if dims is None:
            raise Blocked(f"the rank of {name} is unknown")
        return len(dims)

    def _dim(self, name: str, axis: int):
        dims = self.dims.get(name)
        return dims[axis] if dims is not None and axis < len(dims) else None

    def _through(self, node: onnx.NodeProto, slot: Slot, width: Fraction, roles, reshapes, sources) -> list:
        """The slots tied to `slot` by `node`, with their widths."""
        op = node.op_type
        if node.domain == "com.microsoft" and op in ORT_ACTIVATIONS:
            return self._broadcast(node, slot, width)
        if node.domain not in ("", "ai.onnx"):
            raise Blocked(f"{op} (domain {node.domain}) has no pruning rule")
        if op in SHAPE_READERS:
            return []
        position = [i for i, n in enumerate(node.input) if n == slot.tensor]
        is_output = slot.tensor in node.output
        same = lambda name, axis: (Slot(name, axis, slot.lo, slot.hi), width)  # noqa: E731
        if op in UNARY:
            if position and position[0] > 0:  # Clip's min/max
                raise Blocked(f"{op}'s bounds would need slicing")
            out = [same(node.output[0], slot.axis)]
            return out + ([same(node.input[0], slot.axis)] if is_output else [])
        if op in BROADCAST:
            return self._broadcast(node, slot, width)
        if op == "BatchNormalization" or op == "InstanceNormalization":
            params = node.input[1:5] if op == "BatchNormalization" else node.input[1:3]
            if slot.tensor in params:
                axis = 1
            else:
                axis = slot.axis
            if axis != 1:
                return [same(node.input[0], axis), same(node.output[0], axis)] if op == "BatchNormalization" else \
                    self._block(op, "normalizes over the spatial axes")
            return [same(node.input[0], 1), same(node.output[0], 1)] + [same(p, 0) for p in params if p]
        if op in ("LayerNormalization", "Softmax", "LogSoftmax", "Hardmax"):
            rank = self._rank(node.input[0])
            axis = attribute(node, "axis", -1) % rank
            tensor_axis = slot.axis if slot.tensor in (node.input[0], node.output[0]) else None
            if tensor_axis is None or (op == "LayerNormalization" and tensor_axis >= axis) or \
                    (op != "LayerNormalization" and tensor_axis == axis):
                raise Blocked(f"{op} normalizes over that axis of {node.input[0]}")
            return [same(node.input[0], tensor_axis), same(node.output[0], tensor_axis)]
        if op in REDUCE:
            return self._reduce(node, slot, position, same)
        if op in POOLS:
            if slot.axis > 1:
                raise Blocked(f"{op} pools over that axis")
            return [same(node.input[0], slot.axis), same(node.output[0], slot.axis)]
        if op == "Conv":
            return self._conv(node, slot, width, roles, sources)
        if op in ("MatMul", "Gemm"):
            return self._matmul(node, slot, width, roles, sources)
        if op == "Transpose":
            rank = self._rank(node.input[0])
            perm = attribute(node, "perm", list(range(rank))[::-1])
            if is_output:
                return [same(node.input[0], perm[slot.axis])]
            return [same(node.output[0], perm.index(slot.axis))]
        if op == "Flatten":
            return self._flatten(node, slot, width, is_output)
        if op == "Reshape":
            if position and position[0] == 1:
                raise Blocked("it reaches a Reshape's shape")
            return self._reshape(node, slot, width, is_output, reshapes)
        if op == "Expand":
            if position and position[0] == 1:
                raise Blocked("it reaches an Expand's shape")
            return self._expand(node, slot, width, is_output, reshapes)
        if op == "Slice":
            return self._slice(node, slot, position, same)
        if op == "Gather":
            return self._gather(node, slot, width, is_output)
        if op in ("Squeeze", "Unsqueeze"):
            return self._squeeze(node, slot, width, is_output)
        if op == "Concat":
            return self._concat(node, slot, width, is_output)
        if op == "Split":
            return self._split(node, slot, width, is_output)
        return self._block(op, "has no pruning rule")

    def _reduce(self, node, slot: Slot, position, same) -> list:
        """A reduction that keeps its dims (keepdims=1) over axes other than the channel's: the
        channel axis passes through (`fuse`'s Softmax floor reduces each attention row this way)."""
        if position and position[0] > 0:
            raise Blocked(f"it reaches {node.op_type}'s axes")
        axes = attribute(node, "axes", None)
        if axes is None and len(node.input) > 1 and node.input[1]:
            constant = self.view.constant(node.input[1])
            axes = None if constant is None else constant.reshape(-1).tolist()
        if axes is None or not attribute(node, "keepdims", 1):
            raise Blocked(f"{node.op_type} reduces all axes, computed axes or drops them")
        rank = self._rank(node.input[0])
        if slot.axis in {int(a) % rank for a in axes}:
            raise Blocked(f"{node.op_type} reduces over that axis of {node.input[0]}")
        return [same(node.input[0], slot.axis), same(node.output[0], slot.axis)]

    def _slice(self, node, slot: Slot, position, same) -> list:
        """A Slice along other axes than the channel's (rotary embeddings split each head's dims in
        halves): the channel axis passes through."""
        if position and position[0] > 0:
            raise Blocked("it reaches a Slice's bounds")
        if len(node.input) > 1:  # opset >= 10: starts, ends, axes as inputs
            starts = self.view.constant(node.input[1])
            axes = self.view.constant(node.input[3]) if len(node.input) > 3 and node.input[3] else \
                None if starts is None else np.arange(starts.size)
        else:
            axes = attribute(node, "axes", None) or list(range(len(attribute(node, "starts", []))))
        if axes is None:
            raise Blocked("Slice with computed axes")
        rank = self._rank(node.input[0])
        if slot.axis in {int(a) % rank for a in np.atleast_1d(axes)}:
            raise Blocked("Slice cuts that axis")
        return [same(node.input[0], slot.axis), same(node.output[0], slot.axis)]

    def _gather(self, node, slot: Slot, width: Fraction, is_output: bool) -> list:
        """Gather(data, indices) along axis a: the output's axes are data's before a, then the indices',
        then data's after a. An axis of data other than a passes through (T5 looks up each head's
        relative position bias in a [buckets, heads] table); the gathered axis and the indices' axes
        hold rows, not channels."""
        data, indices, out = node.input[0], node.input[1], node.output[0]
        rank = self._rank(data)
        axis = attribute(node, "axis", 0) % rank
        added = self._rank(indices) - 1  # the output has this many more axes than data
        if slot.tensor == indices:
            raise Blocked("it reaches a Gather's indices")
        if is_output:
            data_axis = slot.axis if slot.axis < axis else slot.axis - added if slot.axis > axis + added else None
        else:
            data_axis = slot.axis if slot.axis != axis else None
        if data_axis is None or data_axis == axis:
            raise Blocked("Gather picks along that axis")
        out_axis = data_axis if data_axis < axis else data_axis + added
        return [(Slot(data, data_axis, slot.lo, slot.hi), width), (Slot(out, out_axis, slot.lo, slot.hi), width)]

    def _expand(self, node, slot: Slot, width: Fraction, is_output: bool, reshapes) -> list:
        """Expand broadcasts its input to a target shape; an axis on which the input holds the channels
        keeps them (grouped-query attention repeats each key/value head for its query heads this way).
        The target's entry there is 1 (the input's size), a constant that shrinks with the group, or
        the size of a tensor of the group read at run time (checked when the walk ends)."""
        x, out = node.input[0], node.output[0]
        rank_x, rank_out = self._rank(x), self._rank(out)
        out_axis = slot.axis if is_output else slot.axis + rank_out - rank_x
        in_axis = out_axis - (rank_out - rank_x)
        if in_axis < 0 or self._dim(x, in_axis) == 1:
            raise Blocked("Expand broadcasts the channel axis")
        target_dims = self.dims.get(node.input[1])
        length = target_dims[0] if target_dims and isinstance(target_dims[0], int) else rank_out
        b = out_axis - (rank_out - length)
        if b >= 0 and self._constant_target(node, b):  # met from either side: once per output range, in walk
            reshapes.append((node, b, width, slot.lo, slot.hi))
        return [(Slot(out, out_axis, slot.lo, slot.hi), width), (Slot(x, in_axis, slot.lo, slot.hi), width)]

    @staticmethod
    def _block(op: str, why: str):
        raise Blocked(f"{op} {why}")

    def _broadcast(self, node, slot: Slot, width: Fraction) -> list:
        out_rank = self._rank(node.output[0])
        if slot.tensor in node.output:
            out_axis = slot.axis
        else:
            out_axis = slot.axis + out_rank - self._rank(slot.tensor)
        tied = [(Slot(node.output[0], out_axis, slot.lo, slot.hi), width)]
        for name in node.input:
            if not name:
                continue
            axis = out_axis - (out_rank - self._rank(name))
            if axis < 0:
                continue  # broadcast along this axis
            dim = self._dim(name, axis)
            if dim == 1:
                continue
            if dim is None:
                raise Blocked(f"{node.op_type}: the size of {name} along the channel axis is unknown")
            tied.append((Slot(name, axis, slot.lo, slot.hi), width))
        return tied

    def _conv(self, node, slot: Slot, width: Fraction, roles, sources) -> list:
        weight = self.view.constant(node.input[1])
        if weight is None:
            raise Blocked("a Conv's weight is not constant")
        group = attribute(node, "group", 1)
        depthwise = group > 1 and weight.shape[1] == 1 and group == weight.shape[0]
        if group > 1 and not depthwise:
            raise Blocked("grouped Conv ties channels in ways not handled")
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        out = [(Slot(node.output[0], 1, slot.lo, slot.hi), width), (Slot(node.input[1], 0, slot.lo, slot.hi), width)]
        if bias:
            out.append((Slot(bias, 0, slot.lo, slot.hi), width))
        on_output_axis = (slot.tensor == node.output[0] and slot.axis == 1) or \
            (slot.tensor == node.input[1] and slot.axis == 0) or slot.tensor == bias
        if depthwise:  # a channel in is a channel out
            if slot.tensor in (node.input[0], node.output[0]) and slot.axis != 1:
                raise Blocked("depthwise Conv convolves over that axis")
            roles[Slot(node.input[1], 0, slot.lo, slot.hi)] = "param"
            self._depthwise[id(node)] = node
            if slot.hi - slot.lo != group:
                raise Blocked("a depthwise Conv's channels split across groups")
            return out + [(Slot(node.input[0], 1, slot.lo, slot.hi), width)]
        if on_output_axis:
            roles[Slot(node.input[1], 0, slot.lo, slot.hi)] = ("out", node)
            sources.append(node.name or node.output[0])
            return out
        if slot.tensor == node.input[0] and slot.axis == 1:
            in_slot = Slot(node.input[1], 1, slot.lo, slot.hi)
            roles[in_slot] = ("in", node)
            return [(in_slot, width)]
        if slot.tensor == node.input[1] and slot.axis == 1:  # the weight's input channels: back to its input
            return [(Slot(node.input[0], 1, slot.lo, slot.hi), width)]
        raise Blocked("Conv convolves over that axis")

    def _matmul(self, node, slot: Slot, width: Fraction, roles, sources) -> list:
        a, b = node.input[0], node.input[1]
        weight = self.view.constant(b)
        if weight is None:
            return self._matmul_activations(node, slot, width)
        if node.op_type == "Gemm":
            if attribute(node, "transA", 0):
                raise Blocked("Gemm with transA")
            out_axis_w, in_axis_w = (0, 1) if attribute(node, "transB", 0) else (1, 0)
            a_axis, out_rank = 1, 2
        else:
            if weight.ndim != 2:
                raise Blocked("MatMul with a batched weight")
            out_axis_w, in_axis_w = 1, 0
            a_axis, out_rank = self._rank(a) - 1, self._rank(node.output[0])
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        output_side = [(Slot(node.output[0], out_rank - 1, slot.lo, slot.hi), width),
                       (Slot(b, out_axis_w, slot.lo, slot.hi), width)]
        if bias:
            if self._rank(bias) >= 1 and self._dim(bias, self._rank(bias) - 1) not in (1, None):
                output_side.append((Slot(bias, self._rank(bias) - 1, slot.lo, slot.hi), width))
        if (slot.tensor == b and slot.axis == out_axis_w) or (slot.tensor == node.output[0] and
                                                              slot.axis == out_rank - 1) or slot.tensor == bias:
            roles[Slot(b, out_axis_w, slot.lo, slot.hi)] = ("out", node)
            sources.append(node.name or node.output[0])
            return output_side
        if slot.tensor == a and slot.axis == a_axis:
            in_slot = Slot(b, in_axis_w, slot.lo, slot.hi)
            roles[in_slot] = ("in", node)
            return [(in_slot, width)]
        if slot.tensor == b and slot.axis == in_axis_w:  # the weight's input rows: back to its input
            return [(Slot(a, a_axis, slot.lo, slot.hi), width)]
        if slot.tensor in (a, node.output[0]) and node.op_type == "MatMul":  # a batch or row axis
            rank_a = self._rank(a)
            out_axis = slot.axis + (out_rank - rank_a) if slot.tensor == a else slot.axis
            if out_axis >= out_rank - 1 or (slot.tensor == a and slot.axis == rank_a - 1):
                raise Blocked("MatMul contracts over that axis")
            return [(Slot(node.output[0], out_axis, slot.lo, slot.hi), width),
                    (Slot(a, out_axis - (out_rank - rank_a), slot.lo, slot.hi), width)]
        raise Blocked(f"{node.op_type} contracts over that axis")

    def _matmul_activations(self, node, slot: Slot, width: Fraction) -> list:
        """MatMul of two computed tensors (attention): batch axes tie both operands to the output; the
        other axes of one operand are rows or columns of the result."""
        if node.op_type != "MatMul":
            raise Blocked("Gemm of two computed tensors")
        a, b, out = node.input[0], node.input[1], node.output[0]
        ra, rb, ro = self._rank(a), self._rank(b), self._rank(out)
        out_axis = {a: slot.axis + ro - ra, b: slot.axis + ro - rb, out: slot.axis}[slot.tensor]
        if slot.tensor == a and slot.axis == ra - 1 or slot.tensor == b and slot.axis == rb - 2:
            raise Blocked("MatMul contracts over that axis")
        if out_axis < ro - 2:  # a batch axis: shared by both operands
            tied = [(Slot(out, out_axis, slot.lo, slot.hi), width)]
            for name, rank in ((a, ra), (b, rb)):
                axis = out_axis - (ro - rank)
                if axis >= 0 and self._dim(name, axis) != 1:
                    tied.append((Slot(name, axis, slot.lo, slot.hi), width))
            return tied
        if out_axis == ro - 2 and slot.tensor != b:  # rows of the result come from a
            return [(Slot(out, ro - 2, slot.lo, slot.hi), width), (Slot(a, ra - 2, slot.lo, slot.hi), width)]
        if out_axis == ro - 1 and slot.tensor != a:  # columns from b
            return [(Slot(out, ro - 1, slot.lo, slot.hi), width), (Slot(b, rb - 1, slot.lo, slot.hi), width)]
        raise Blocked("MatMul mixes that axis")

    def _flatten(self, node, slot: Slot, width: Fraction, is_output: bool) -> list:
        if attribute(node, "axis", 1) != 1:
            raise Blocked("Flatten at another axis than 1")
        dims = self.dims.get(node.input[0])
        if dims is None or any(not isinstance(d, int) or d <= 0 for d in dims[2:]):
            raise Blocked("Flatten of a tensor whose spatial size is unknown")
        spatial = int(np.prod(dims[2:])) if len(dims) > 2 else 1
        if is_output:
            if slot.axis != 1 or slot.lo % spatial or slot.hi % spatial:
                raise Blocked("Flatten's output is cut inside a channel")
            return [(Slot(node.input[0], 1, slot.lo // spatial, slot.hi // spatial), width / spatial)]
        if slot.axis != 1:
            raise Blocked("Flatten merges that axis")
        return [(Slot(node.output[0], 1, slot.lo * spatial, slot.hi * spatial), width * spatial)]

    def _reshape(self, node, slot: Slot, width: Fraction, is_output: bool, reshapes) -> list:
        """A reshape that keeps the axis, splits it into (outer, inner) or merges (outer, inner) into it,
        with every dim before it unchanged."""
        source, result = self.dims.get(node.input[0]), self.dims.get(node.output[0])
        if source is None or result is None:
            raise Blocked("Reshape whose shapes are unknown")
        if is_output:
            return self._reshape_back(node, slot, width, source, result)
        a = slot.axis
        for b in range(len(result) + 1):
            if b < len(result) and result[b] == 1:
                continue  # an axis of size 1 holds no group (dims of 1 make the products below ambiguous)
            if list(result[:b]) != list(source[:a]) and not _same_product(result[:b], source[:a]):
                continue
            rest_in, rest_out = source[a + 1:], result[b + 1:] if b < len(result) else ()
            d = source[a]
            if b < len(result) and result[b] == d and _same_product(rest_in, rest_out):
                if self._constant_target(node, b):
                    reshapes.append((node, b, width, slot.lo, slot.hi))
                return [(Slot(node.output[0], b, slot.lo, slot.hi), width)]
            if b + 1 < len(result) and isinstance(d, int) and isinstance(result[b], int) and \
                    isinstance(result[b + 1], int) and result[b] * result[b + 1] == d and \
                    _same_product(rest_in, result[b + 2:]):  # split: [.., H * D] -> [.., H, D]
                inner = result[b + 1]
                if slot.lo % inner or slot.hi % inner:
                    raise Blocked("Reshape splits the axis inside a unit")
                self._reshaped = True
                if self._constant_target(node, b):
                    reshapes.append((node, b, width / inner, slot.lo // inner, slot.hi // inner))
                return [(Slot(node.output[0], b, slot.lo // inner, slot.hi // inner), width / inner)]
            inner = _merged(source, a, d, result[b] if b < len(result) else None, rest_out)
            if inner:  # merge: [.., H, D...] -> [.., H * D...] (a flatten written as a Reshape, too)
                self._reshaped = True
                if self._constant_target(node, b):
                    reshapes.append((node, b, width * inner, slot.lo * inner, slot.hi * inner))
                return [(Slot(node.output[0], b, slot.lo * inner, slot.hi * inner), width * inner)]
        raise Blocked("Reshape mixes the channel axis with others")

    def _constant_target(self, node, b: int) -> bool:
        """Whether the Reshape's (or Expand's) target entry at the channel axis is a constant that must
        shrink with the group (-1 and 0, an Expand's 1, and the run-time size of a tensor of the group,
        checked when the walk ends, follow by themselves)."""
        entry = target_entry(node, b, self.view)
        if entry is not None:
            return entry[2] > 1
        read = size_read(target_piece(node, b, self.view), self.view, self.dims)
        if read is None:
            raise Blocked(f"{node.op_type}'s target size at the channel axis is computed")
        self._size_reads.append(read)
        return False

    def _reshape_back(self, node, slot: Slot, width: Fraction, source, result) -> list:
        b = slot.axis
        for a in range(len(source)):
            if source[a] == 1:
                continue  # an axis of size 1 holds no group: [2, 1, 4, 32] -> [2, 1, 128] merges axis 2, not 1
            if not (list(source[:a]) == list(result[:b]) or _same_product(source[:a], result[:b])):
                continue
            d = result[b]
            if source[a] == d and _same_product(source[a + 1:], result[b + 1:]):
                return [(Slot(node.input[0], a, slot.lo, slot.hi), width)]
            inner = _merged(source, a, source[a], d, result[b + 1:])
            if inner:  # the output axis merges (H, D...): back to H
                if slot.lo % inner or slot.hi % inner:
                    raise Blocked("Reshape merges the axis inside a unit")
                return [(Slot(node.input[0], a, slot.lo // inner, slot.hi // inner), width / inner)]
            if b + 1 < len(result) and all(isinstance(x, int) for x in (d, source[a], result[b + 1])) and \
                    d * result[b + 1] == source[a]:  # the output splits the input's axis: H of (H, D)
                inner = result[b + 1]
                return [(Slot(node.input[0], a, slot.lo * inner, slot.hi * inner), width * inner)]
        raise Blocked("Reshape mixes the channel axis with others")

    def _squeeze(self, node, slot: Slot, width: Fraction, is_output: bool) -> list:
        axes = _axes(node, self.view)
        if axes is None:
            raise Blocked(f"{node.op_type} without constant axes")
        if node.op_type == "Squeeze":
            rank_in = self._rank(node.input[0])
            axes = sorted(a % rank_in for a in axes)
            kept = [i for i in range(rank_in) if i not in axes]
        else:
            rank_out = self._rank(node.output[0])
            axes = sorted(a % rank_out for a in axes)
            kept = [i for i in range(rank_out) if i not in axes]
        if node.op_type == "Squeeze":
            if is_output:
                return [(Slot(node.input[0], kept[slot.axis], slot.lo, slot.hi), width)]
            return [(Slot(node.output[0], kept.index(slot.axis), slot.lo, slot.hi), width)]
        if is_output:
            return [(Slot(node.input[0], kept.index(slot.axis), slot.lo, slot.hi), width)]
        return [(Slot(node.output[0], kept[slot.axis], slot.lo, slot.hi), width)]

    def _concat(self, node, slot: Slot, width: Fraction, is_output: bool) -> list:
        rank = self._rank(node.output[0])
        axis = attribute(node, "axis", 0) % rank
        if slot.axis != axis:
            return [(Slot(n, slot.axis, slot.lo, slot.hi), width) for n in [*node.input, *node.output]]
        offsets, start = [], 0
        for name in node.input:
            size = self._dim(name, axis)
            if not isinstance(size, int):
                raise Blocked("Concat of inputs whose size is unknown")
            offsets.append((name, start, start + size))
            start += size
        if is_output:
            for name, lo, hi in offsets:
                if lo <= slot.lo and slot.hi <= hi:
                    return [(Slot(name, axis, slot.lo - lo, slot.hi - lo), width)]
            raise Blocked("Concat's output is cut across its inputs")
        lo = next(lo for name, lo, _ in offsets if name == slot.tensor)
        return [(Slot(node.output[0], axis, lo + slot.lo, lo + slot.hi), width)]

    def _split(self, node, slot: Slot, width: Fraction, is_output: bool) -> list:
        """A Split along another axis passes the channels through; along theirs, each output is a range
        of the input's axis (as a Concat's inputs are of its output), and its size shrinks with the group."""
        rank = self._rank(node.input[0])
        axis = attribute(node, "axis", 0) % rank
        if slot.axis != axis:
            return [(Slot(n, slot.axis, slot.lo, slot.hi), width) for n in [node.input[0], *node.output]]
        sizes = split_sizes(node, self.view, self._dim(node.input[0], axis))
        if sizes is None:
            raise Blocked("Split of sizes unknown here")
        starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        if is_output:
            i = list(node.output).index(slot.tensor)
            self._splits.append((node, i, width, tuple(sizes)))
            return [(Slot(node.input[0], axis, starts[i] + slot.lo, starts[i] + slot.hi), width)]
        for i, (lo, hi) in enumerate(zip(starts, starts[1:])):
            if lo <= slot.lo and slot.hi <= hi:
                self._splits.append((node, i, width, tuple(sizes)))
                return [(Slot(node.output[i], axis, slot.lo - lo, slot.hi - lo), width)]
        seed = self._seed
        if (slot.lo, slot.hi) == (seed.lo, seed.hi) and width == 1:  # the seed's own axis, cut into parts
            raise SplitAcross([c - slot.lo for c in starts[1:-1] if slot.lo < c < slot.hi])
        raise Blocked("Split cuts a unit of the group")


def _axes(node: onnx.NodeProto, view: GraphView) -> list[int] | None:
    if len(node.input) > 1 and node.input[1]:
        value = view.constant(node.input[1])
        return None if value is None else [int(v) for v in np.atleast_1d(value)]
    axes = attribute(node, "axes", None)
    return list(axes) if axes is not None else None


def _merged(source, a: int, d, merged, rest_out) -> int | None:
    """The product of the axes after `a` that a Reshape merges into axis a (size `d`) to make one axis of
    size `merged`, followed by `rest_out`; None when it does not merge so. [N, C, H, W] -> [N, C * H * W]
    merges H * W: channel c becomes the columns c * H * W ... (c + 1) * H * W - 1."""
    if not isinstance(d, int) or not isinstance(merged, int):
        return None
    inner = 1
    for k in range(a + 1, len(source)):
        if not isinstance(source[k], int):
            return None
        inner *= source[k]
        if d * inner == merged and _same_product(source[k + 1:], rest_out):
            return inner
    return None


def _same_product(a, b) -> bool:
    """Whether two lists of dims (ints or symbols) hold the same elements: equal leading or trailing
    shapes across a reshape."""
    ints_a = int(np.prod([d for d in a if isinstance(d, int)])) if a else 1
    ints_b = int(np.prod([d for d in b if isinstance(d, int)])) if b else 1
    symbols_a = sorted(str(d) for d in a if not isinstance(d, int))
    symbols_b = sorted(str(d) for d in b if not isinstance(d, int))
    return ints_a == ints_b and symbols_a == symbols_b and None not in a and None not in b
