"""Removing a group's pruned units from the graph: every weight and parameter loses those indices
along its axis, and every Reshape target that names the axis shrinks with it.

Deletions are gathered per (tensor, axis) over all groups first and applied once, in the tensor's
original coordinates: groups that share an axis at different offsets (the inputs of a Concat) then
cannot shift each other's indices. Activations need nothing: their shapes follow. The shapes the
graph records for the changed tensors and everything computed from them are cleared, their types kept
(shape inference recomputes them; torch's dynamo exporter records a shape for every tensor, weights too).
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from onnxopt.graph import GraphView, NameGenerator
from onnxopt.opsets import default_opset

from .groups import Group, SliceBounds
from .targets import target_piece


def shrink(model: onnx.ModelProto, removals: list[tuple[Group, list[int]]],
           found_in: onnx.ModelProto | None = None) -> int:
    """Removes the listed units of each group; returns how many tensors changed. `found_in`: the model
    the groups were found in, when `model` is a copy of it (their nodes are found by position)."""
    graph = model.graph
    position = {id(n): i for i, n in enumerate((found_in or model).graph.node)}

    def here(node: onnx.NodeProto) -> onnx.NodeProto:
        return graph.node[position[id(node)]]

    view = GraphView(graph, model.ir_version)
    deletions: dict[tuple[str, int], set[int]] = defaultdict(set)
    target_edits: dict[tuple[int, int], list] = {}  # (Reshape or Expand, axis) -> [node, axis, how much smaller]
    changed_activations: set[str] = set()
    split_edits: dict[int, list] = {}  # Split -> [node, its new sizes]
    removed_channels: dict[tuple[str, int], set[int]] = defaultdict(set)  # of activations, for Slices' bounds
    slices: dict[int, SliceBounds] = {}
    for group, units in removals:
        if not units:
            continue
        for member in group.members:
            if view.constant(member.slot.tensor) is not None:
                deletions[(member.slot.tensor, member.slot.axis)].update(member.indices(units).tolist())
            else:
                changed_activations.add(member.slot.tensor)
                removed_channels[(member.slot.tensor, member.slot.axis)].update(member.indices(units).tolist())
        for bounds in group.slices:
            slices[id(here(bounds.node))] = dataclasses.replace(bounds, node=here(bounds.node))
        for target in group.reshapes:  # the groups of a Concat's inputs, or a fused projection's parts, add up
            key = (id(here(target.node)), target.axis)
            target_edits.setdefault(key, [here(target.node), target.axis, 0])[2] += len(units) * target.width
        for part in group.splits:
            edit = split_edits.setdefault(id(here(part.node)), [here(part.node), list(part.sizes)])
            edit[1][part.output] -= len(units) * part.width
        for node, per_unit in group.grouped:  # each unit is whole conv groups (one channel, when depthwise)
            attr = next(a for a in here(node).attribute if a.name == "group")
            attr.i -= len(units) * per_unit
    initializers = {t.name: t for t in graph.initializer}
    edited: dict[str, np.ndarray] = {}
    for (name, axis), indices in deletions.items():
        value = edited.get(name, view.constant(name))
        edited[name] = np.delete(value, sorted(indices), axis=axis)
    for name, value in edited.items():
        initializers[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))
    _shrink_splits(model, split_edits)
    _move_slice_bounds(graph, view, slices.values(), removed_channels)
    done: dict = {}  # the copies made so far: an entry two edits reach (through an expand guard) shrinks once
    for piece, fewer in _target_pieces(graph, view, list(target_edits.values())):
        _shrink_target(graph, view, piece, fewer, done)
    _forget_shapes(graph, view, set(edited) | changed_activations | {n.output[0] for n, _, _ in target_edits.values()})
    return len(edited)


def _target_pieces(graph: onnx.GraphProto, view: GraphView, edits: list) -> list[tuple[tuple, int]]:
    """Where each edited target entry lives (found before any edit renames the constants holding it),
    with how much it shrinks. A Reshape whose target Concat other nodes read too (fold merges equal
    Concats, and Q, K and V may share one) gets its own copy of it: the others may be in groups that
    shrink by other amounts, or not at all."""
    pieces, amounts = [], {}
    for node, axis, fewer in edits:
        piece = target_piece(node, axis, view)
        holder = piece[0]
        if holder.op_type == "Concat" and node.input[1] == holder.output[0] and \
                len(view.consumers.get(holder.output[0], [])) > 1:
            piece = _own_concat(graph, node, piece)
        entry = (id(piece[0]), piece[1], piece[3])
        if amounts.setdefault(entry, fewer) != fewer:  # shared behind TorchScript's expand guard
            raise ValueError(f"{node.name or node.output[0]}: its target is shared with a group that shrinks "
                             "differently")
        pieces.append((piece, fewer))
    return pieces


def _shrink_splits(model: onnx.ModelProto, edits: dict[int, list]) -> None:
    """Each edited Split gets its new sizes: in its `split` attribute (opset < 13), else as a `split`
    input of its own (where it split in equal parts, opset 18's num_outputs gives way to it)."""
    graph = model.graph
    names = NameGenerator(graph)
    for node, sizes in edits.values():
        attr = next((a for a in node.attribute if a.name == "split"), None)
        if attr is not None or default_opset(model) < 13:
            if attr is None:
                node.attribute.append(onnx.helper.make_attribute("split", sizes))
            else:
                attr.ints[:] = sizes
            continue
        name = names(f"{node.output[0]}_sizes")
        graph.initializer.append(numpy_helper.from_array(np.array(sizes, dtype=np.int64), name))
        if len(node.input) < 2:
            node.input.append(name)
        node.input[1] = name
        for extra in [a for a in node.attribute if a.name == "num_outputs"]:
            node.attribute.remove(extra)


def _move_slice_bounds(graph: onnx.GraphProto, view: GraphView, slices, removed: dict[tuple[str, int], set[int]]
                       ) -> None:
    """Each Slice of a pruned axis gets bounds of its own, moved by the channels removed before them
    (a constant end at or past the axis' end stays: it still means "to the end")."""
    names = NameGenerator(graph)
    for bounds in slices:
        node = bounds.node
        gone = np.array(sorted(removed.get((node.input[0], bounds.axis), ())), dtype=np.int64)
        moved = {1: bounds.start - int(np.sum(gone < bounds.start))}
        computed_end = view.constant(node.input[2]) is None  # computed bounds become constants too
        if bounds.end < bounds.size or computed_end:
            moved[2] = bounds.end - int(np.sum(gone < bounds.end))
        for index, value in moved.items():
            name = names(f"{node.input[index]}_moved")
            graph.initializer.append(numpy_helper.from_array(np.array([value], dtype=np.int64), name))
            node.input[index] = name


def _own_concat(graph: onnx.GraphProto, node: onnx.NodeProto, piece: tuple) -> tuple:
    """`node` reading a copy of its target Concat, placed right after the original."""
    concat = piece[0]
    clone = onnx.NodeProto()
    clone.CopyFrom(concat)
    clone.output[0] = NameGenerator(graph)(concat.output[0] + "_own")
    clone.name = clone.output[0]
    position = next(i for i, n in enumerate(graph.node) if n is concat or n == concat)
    graph.node.insert(position + 1, clone)
    node.input[1] = clone.output[0]
    return (graph.node[position + 1], *piece[1:])  # the graph holds a copy of `clone`


def _forget_shapes(graph: onnx.GraphProto, view: GraphView, changed: set[str]) -> None:
    """Clears the recorded shape of the `changed` tensors and of every tensor computed from them: a
    stale shape fails strict shape inference. (Downstream shapes mostly hold again, a down-projection's
    output for one; inference restores those. The element types stay, for ops inference cannot type.)"""
    pending, reached = list(changed), set(changed)
    while pending:
        for node in view.consumers.get(pending.pop(), []):
            for name in node.output:
                if name and name not in reached:
                    reached.add(name)
                    pending.append(name)
    for vi in graph.value_info:
        if vi.name in reached and vi.type.HasField("tensor_type"):
            vi.type.tensor_type.ClearField("shape")


def _shrink_target(graph: onnx.GraphProto, view: GraphView, piece: tuple, fewer: int, done: dict) -> None:
    """A Reshape's (or Expand's) target entry (`piece`: targets.target_piece) made `fewer` smaller, in a
    copy of the constant that holds it (constants are shared, by other layers' Reshapes too, and one may
    fill several entries of a Concat). -1 and 0 (and an Expand's 1) need nothing. `done`: the copies
    made so far, and which of their elements shrank, by (holder, input)."""
    holder, index, tensor, element = piece  # the Reshape, Expand or Concat reading the tensor
    if (id(holder), index) not in done:
        done[(id(holder), index)] = (view.constant(tensor).copy(), set(), tensor)
    copy, shrunk, original = done[(id(holder), index)]
    value = int(copy.reshape(-1)[element])
    if value <= 1 or element in shrunk:
        return
    shrunk.add(element)
    copy.reshape(-1)[element] = value - fewer
    name = f"{original}_pruned_{len(graph.initializer)}"
    graph.initializer.append(numpy_helper.from_array(copy, name))
    holder.input[index] = name  # this input only
