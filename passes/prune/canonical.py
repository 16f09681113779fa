"""Rewrites, before the walk, of patterns that hide a unit's axis from it without moving any value.

torch's dynamo exporter decomposes `scaled_dot_product_attention` (transformers' default attention)
with the keys transposed as Reshape [batch, heads, seq, dim] -> [batch * heads, seq, dim], Transpose
[0, 2, 1], Reshape -> [batch, heads, dim, seq]. The first Reshape merges the heads with the batch, which
no group can cross, so every head group of the model blocked there. The three nodes are one Transpose
[0, 1, 3, 2]; with it the heads pass through.
"""
from __future__ import annotations

import onnx
from onnx import helper

from onnxopt.graph import GraphView, attribute, infer_dims
from onnxopt.surgery import outer_scope_names, remove_nodes


def merged_axis_transposes(model: onnx.ModelProto, shapes: dict[str, tuple]) -> int:
    """Replaces each Reshape-Transpose-Reshape that transposes the last two axes of a rank-4 tensor
    through its first two axes merged by one Transpose; returns how many. `shapes`: tensors' shapes
    on a sample, where inference does not know them."""
    graph = model.graph
    if not any(n.op_type == "Transpose" and attribute(n, "perm", None) == [0, 2, 1] for n in graph.node):
        return 0
    dims = infer_dims(model)
    dims.update(shapes)
    view = GraphView(graph, model.ir_version)
    pinned = outer_scope_names(graph) | view.graph_outputs
    doomed, rewritten = [], 0
    for first in list(graph.node):
        chain = _chain(first, view, dims, pinned)
        if chain is None:
            continue
        transpose, last = chain
        replacement = helper.make_node("Transpose", [first.input[0]], [last.output[0]], perm=[0, 1, 3, 2],
                                       name=(last.name or last.output[0]) + "_transpose")
        graph.node.insert(list(graph.node).index(last), replacement)
        doomed += [first, transpose, last]
        rewritten += 1
    if doomed:
        targets = [n.input[1] for n in doomed if n.op_type == "Reshape"]
        remove_nodes(graph, doomed)
        _remove_unread(graph, targets)
    return rewritten


def _chain(first: onnx.NodeProto, view: GraphView, dims: dict, pinned: set):
    """(the Transpose, the last Reshape) when `first` starts the pattern, else None."""
    if first.op_type != "Reshape" or first.domain not in ("", "ai.onnx"):
        return None
    source, merged = _known(dims, first.input[0], 4), _known(dims, first.output[0], 3)
    if source is None or merged != (source[0] * source[1], source[2], source[3]):
        return None
    transpose = _only_reader(first.output[0], view, pinned)
    if transpose is None or transpose.op_type != "Transpose" or attribute(transpose, "perm", None) != [0, 2, 1]:
        return None
    last = _only_reader(transpose.output[0], view, pinned)
    if last is None or last.op_type != "Reshape" or \
            _known(dims, last.output[0], 4) != (source[0], source[1], source[3], source[2]):
        return None
    return transpose, last


def _known(dims: dict, name: str, rank: int) -> tuple[int, ...] | None:
    shape = dims.get(name)
    return tuple(shape) if shape is not None and len(shape) == rank and all(isinstance(d, int) for d in shape) \
        else None


def _only_reader(name: str, view: GraphView, pinned: set) -> onnx.NodeProto | None:
    readers = view.consumers.get(name, [])
    return readers[0] if len(readers) == 1 and name not in pinned else None


def _remove_unread(graph: onnx.GraphProto, names: list[str]) -> None:
    """Removes the nodes and initializers that held `names` (the Reshapes' targets) and are read by
    nothing now."""
    while names:
        view = GraphView(graph)
        pinned = outer_scope_names(graph) | view.graph_outputs
        for tensor in [t for t in graph.initializer if t.name in names and not view.consumers.get(t.name)
                       and t.name not in pinned]:
            graph.initializer.remove(tensor)
        producers = {id(view.producer[n]): view.producer[n] for n in names if n in view.producer}
        unread = [n for n in producers.values() if all(not view.consumers.get(o) and o not in pinned
                                                       for o in n.output)]
        remove_nodes(graph, unread)
        names = [i for n in unread for i in n.input if i]
