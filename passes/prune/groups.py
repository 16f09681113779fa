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

Here: the walk and the rules for ops that compute on channels (elementwise, normalizations, Conv,
MatMul/Gemm). `layout.py`: the rules for ops that only move them (Reshape, Expand, Concat, Split,
Slice, Gather...); `units.py`: what a group is made of; `targets.py`: where shape constants keep the
sizes that shrink with a group.
"""
from __future__ import annotations

import math
from fractions import Fraction

import onnx

from onnxopt.graph import CONTRIB_ACTIVATIONS, GraphView, attribute, infer_dims, subgraph_inputs

from .layout import LayoutRules
from .targets import size_targets
from .units import Blocked, Group, Member, ReshapeTarget, SliceBounds, Slot, SplitAcross, SplitPart

UNARY = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Erf", "Gelu", "Elu", "Selu", "HardSigmoid", "HardSwish",
         "Softplus", "Softsign", "Cast", "Identity", "Dropout", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal",
         "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Mish", "Celu", "ThresholdedRelu", "Clip", "Not",
         "IsNaN", "IsInf"}  # IsNaN: TorchScript's scaled_dot_product_attention zeroes fully masked rows
BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "PRelu", "Equal", "Greater", "Less",
             "And", "Or", "Xor", "Mod", "Sum", "Mean", "BitShift"}
REDUCE = {"ReduceMax", "ReduceMin", "ReduceSum", "ReduceMean"}
POOLS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
SHAPE_READERS = {"Shape", "Size"}  # read a tensor's dims, not its values: they follow the new size


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


class _Finder(LayoutRules):
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
        """The groups of each part of a seed axis a Split or Slices cut (Q, K and V of a fused projection
        come out as one group of heads, tied by the attention between them)."""
        bounds = [0, *cuts, seed.hi - seed.lo]
        todo = [Slot(seed.tensor, seed.axis, seed.lo + lo, seed.lo + hi) for lo, hi in zip(bounds, bounds[1:])]
        groups = []
        while todo:
            part = todo.pop(0)
            if part in seen:
                continue
            try:
                group = self.walk(part, layer)
            except SplitAcross as exc:  # Slices cut Q, K and V one at a time: a part may be cut again
                inner = [0, *exc.cuts, part.hi - part.lo]
                todo[:0] = [Slot(part.tensor, part.axis, part.lo + lo, part.lo + hi) for lo, hi in zip(inner, inner[1:])]
                continue
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
        self._grouped: dict[int, tuple[onnx.NodeProto, Fraction]] = {}  # Conv -> (it, its conv groups a width holds)
        self._size_reads: list[tuple[str, int]] = []  # (tensor, axis) whose run-time size a target takes
        self._size_targets: list[tuple[str, str]] = []  # (node, the tensor it shapes or cuts) by a size of ours
        self._reshaped = False
        self._seed = seed
        self._splits: list[tuple[onnx.NodeProto, int, Fraction, tuple[int, ...]]] = []
        self._slices: dict[int, SliceBounds] = {}
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
        tensors = {s.tensor for s in widths}
        for where, tensor in self._size_targets:
            if tensor not in tensors:
                raise Blocked(f"{where} shapes {tensor} with a size read from the group, and {tensor} does not shrink "
                              "with it")
        # each target edit once per output range: the parts of a fused projection through one Reshape add up
        reshapes = list({(id(n), a, lo, hi): (n, a, w) for n, a, w, lo, hi in reshapes}.values())
        scale = math.lcm(*(w.denominator for w in widths.values()), *(w.denominator for _, _, w in reshapes),
                         *(w.denominator for _, _, w, _ in self._splits),
                         *(w.denominator for _, w in self._grouped.values()))  # a unit is whole conv groups
        units = Fraction(seed.hi - seed.lo) / (widths[seed] * scale)
        if units.denominator != 1 or units < 2:
            raise Blocked("its channels do not split into whole units")
        members = [Member(s, int(w * scale), *roles[s]) if isinstance(roles[s], tuple) else
                   Member(s, int(w * scale), roles[s]) for s, w in widths.items()]
        if not sources:
            sources = [layer.name or layer.output[0]]
        splits = {(id(n), i): SplitPart(n, i, int(w * scale), sizes) for n, i, w, sizes in self._splits}
        return Group(int(units), members, [ReshapeTarget(n, a, int(w * scale)) for n, a, w in reshapes],
                     list(dict.fromkeys(sources)), [(n, int(w * scale)) for n, w in self._grouped.values()],
                     self._reshaped,
                     list(splits.values()), list(self._slices.values()))

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
        if node.domain == "com.microsoft" and op in CONTRIB_ACTIVATIONS:
            return self._broadcast(node, slot, width)
        if node.domain not in ("", "ai.onnx"):
            raise Blocked(f"{op} (domain {node.domain}) has no pruning rule")
        if op in SHAPE_READERS:
            try:
                self._size_targets += size_targets(node, slot.axis, self.view, self._rank(slot.tensor))
            except ValueError as exc:
                raise Blocked(f"the size of {slot.tensor} at the channel axis reaches {exc}, which has no rule") from None
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
        if op in ("Resize", "Upsample"):
            return self._resize(node, slot, position, same)
        if op == "Conv":
            return self._conv(node, slot, width, roles, sources)
        if op == "ConvTranspose":
            return self._conv_transpose(node, slot, width)
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
            return self._slice(node, slot, width, position, same)
        if op == "Gather":
            return self._gather(node, slot, width, is_output)
        if op in ("Squeeze", "Unsqueeze"):
            return self._squeeze(node, slot, width, is_output)
        if op == "Concat":
            return self._concat(node, slot, width, is_output)
        if op == "Split":
            return self._split(node, slot, width, is_output)
        return self._block(op, "has no pruning rule")

    def _resize(self, node, slot: Slot, position, same) -> list:
        """Resizing by constant scales (a U-Net's or an FPN's upsampling) passes the channel axis
        through where its scale is 1; sizes computed at run time block it."""
        if position and position[0] > 0:
            raise Blocked(f"it reaches {node.op_type}'s scales or sizes")
        at = 1 if node.op_type == "Upsample" or len(node.input) == 2 else 2  # opset 10's Resize(X, scales)
        given = node.input[at] if len(node.input) > at else ""
        scales = self.view.constant(given) if given else None
        if (len(node.input) > 3 and node.input[3]) or scales is None or scales.size == 0:
            raise Blocked(f"{node.op_type} takes sizes, or scales computed at run time")
        rank = self._rank(node.input[0])
        axes = [int(a) % rank for a in attribute(node, "axes", list(range(rank)))]
        if slot.axis in axes and float(scales.reshape(-1)[axes.index(slot.axis)]) != 1.0:
            raise Blocked(f"{node.op_type} scales that axis of {node.input[0]}")
        return [same(node.input[0], slot.axis), same(node.output[0], slot.axis)]

    def _reduce(self, node, slot: Slot, position, same) -> list:
        """A reduction over axes other than the channel's: the channel axis passes through (`fuse`'s
        Softmax floor reduces each attention row this way), moved down by the axes dropped before it
        when keepdims=0 (a classifier's global mean written as x.mean((2, 3)))."""
        if position and position[0] > 0:
            raise Blocked(f"it reaches {node.op_type}'s axes")
        axes = attribute(node, "axes", None)
        if axes is None and len(node.input) > 1 and node.input[1]:
            constant = self.view.constant(node.input[1])
            axes = None if constant is None else constant.reshape(-1).tolist()
        if not axes:
            raise Blocked(f"{node.op_type} reduces all axes or computed axes")
        rank = self._rank(node.input[0])
        reduced = {int(a) % rank for a in axes}
        kept = [a for a in range(rank) if a not in reduced or attribute(node, "keepdims", 1)]  # output axis -> input
        axis_in = slot.axis if position else kept[slot.axis]
        if axis_in in reduced:
            raise Blocked(f"{node.op_type} reduces over that axis of {node.input[0]}")
        return [same(node.input[0], axis_in), same(node.output[0], kept.index(axis_in))]






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
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        on_output_axis = (slot.tensor == node.output[0] and slot.axis == 1) or \
            (slot.tensor == node.input[1] and slot.axis == 0) or slot.tensor == bias
        if group > 1:
            return self._grouped_conv(node, slot, width, roles, weight.shape, on_output_axis, bias)
        out = [(Slot(node.output[0], 1, slot.lo, slot.hi), width), (Slot(node.input[1], 0, slot.lo, slot.hi), width)]
        if bias:
            out.append((Slot(bias, 0, slot.lo, slot.hi), width))
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

    def _grouped_conv(self, node, slot: Slot, width: Fraction, roles, shape, on_output_axis: bool, bias) -> list:
        """A grouped Conv (depthwise: one channel a group) computes each conv group's outputs from that
        group's inputs alone, so a unit is whole conv groups, input and output channels together
        (ResNeXt's and RegNet's 3x3s, MobileNet's depthwise ones, a depthwise multiplier's); its
        `group` shrinks with them. It is sliced as a parameter, not refit."""
        group, c_out = attribute(node, "group", 1), shape[0]
        c_in = shape[1] * group
        if slot.tensor in (node.input[0], node.output[0]) and slot.axis != 1 or \
                slot.tensor == node.input[1] and slot.axis != 0:
            raise Blocked("grouped Conv convolves over that axis")
        if slot.hi - slot.lo != (c_out if on_output_axis else c_in):
            raise Blocked("a grouped Conv's channels split across groups")
        w_out = width if on_output_axis else width * Fraction(c_out, c_in)
        w_in = w_out * Fraction(c_in, c_out)
        roles[Slot(node.input[1], 0, 0, c_out)] = "param"
        self._grouped[id(node)] = (node, w_out / (c_out // group))
        tied = [(Slot(node.output[0], 1, 0, c_out), w_out), (Slot(node.input[1], 0, 0, c_out), w_out),
                (Slot(node.input[0], 1, 0, c_in), w_in)]
        return tied + ([(Slot(bias, 0, 0, c_out), w_out)] if bias else [])

    def _conv_transpose(self, node, slot: Slot, width: Fraction) -> list:
        """A ConvTranspose without groups (a U-Net's or a generator's upsampling): its input channel c
        is its weight's row c, its output channel c the weight's column c and bias c. Its slices go as
        parameters: it neither starts a group nor is refit."""
        if self.view.constant(node.input[1]) is None or attribute(node, "group", 1) != 1:
            raise Blocked("ConvTranspose with groups or a computed weight")
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        tied = lambda name, axis: (Slot(name, axis, slot.lo, slot.hi), width)  # noqa: E731
        if (slot.tensor == node.input[0] and slot.axis == 1) or (slot.tensor == node.input[1] and slot.axis == 0):
            return [tied(node.input[0], 1), tied(node.input[1], 0)]
        if (slot.tensor == node.output[0] and slot.axis == 1) or (slot.tensor == node.input[1] and slot.axis == 1) \
                or slot.tensor == bias:
            return [tied(node.output[0], 1), tied(node.input[1], 1)] + ([tied(bias, 0)] if bias else [])
        raise Blocked("ConvTranspose convolves over that axis")

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
