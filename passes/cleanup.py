"""Graph cleanup steps of the folding pass: dead code, identities, duplicates, chains.

Each step takes a GraphProto, edits it in place and returns how many things it removed. Tensors that
a subgraph (If/Loop/Scan body) reads from the outer scope are never renamed: the body would lose them.
"""
from __future__ import annotations

import hashlib
from collections import Counter

import networkx as nx
import numpy as np
import onnx

from onnxopt.graph import NONDETERMINISTIC_OPS, GraphView, NameGenerator, has_subgraph, subgraph_inputs
from onnxopt.surgery import outer_scope_names, remove_nodes

SINK = "__graph_outputs__"




def remove_dead_nodes(graph: onnx.GraphProto) -> int:
    """Removes nodes that no graph output depends on (reachability in the dataflow graph)."""
    view = GraphView(graph)
    flow = nx.DiGraph()
    flow.add_node(SINK)
    for index, node in enumerate(graph.node):
        flow.add_node(index)
        for name in list(node.input) + sorted(subgraph_inputs(node)):
            producer = view.producer.get(name)
            if producer is not None:
                flow.add_edge(_index(view, producer), index)
    for out in graph.output:
        producer = view.producer.get(out.name)
        if producer is not None:
            flow.add_edge(_index(view, producer), SINK)
    live = nx.ancestors(flow, SINK)
    dead = [node for index, node in enumerate(graph.node) if index not in live]
    remove_nodes(graph, dead)
    return len(dead)


def _index(view: GraphView, node: onnx.NodeProto) -> int:
    if not hasattr(view, "_node_index"):
        view._node_index = {id(n): i for i, n in enumerate(view.graph.node)}
    return view._node_index[id(node)]




def remove_identities(graph: onnx.GraphProto, elem_types: dict[str, int] | None = None) -> int:
    """Bypasses Identity, inference-mode Dropout (when its mask is unused) and Cast to the type it already has."""
    view = GraphView(graph)
    view.elem_types = elem_types or {}
    pinned = outer_scope_names(graph) | view.graph_inputs | set(view.initializers)
    removed = []
    for node in graph.node:
        if not _is_passthrough(node, view):
            continue
        src, dst = node.input[0], node.output[0]
        if dst in pinned or src in outer_scope_names(graph):
            continue
        if dst in view.graph_outputs:
            # Keep the output's name: rename the source to it, if the source is an ordinary tensor.
            if src in pinned or src in view.graph_outputs or src not in view.producer:
                continue
            _rename(graph, {src: dst}, producers=True)
        else:
            _rename(graph, {dst: src})
        removed.append(node)
    remove_nodes(graph, removed)
    return len(removed)


def _is_passthrough(node: onnx.NodeProto, view: GraphView) -> bool:
    if node.domain not in ("", "ai.onnx") or not node.input or not node.input[0]:
        return False
    if node.op_type == "Identity":
        return True
    if node.op_type == "Cast":
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        return to is not None and view.elem_types.get(node.input[0]) == to
    if node.op_type != "Dropout":
        return False
    if len(node.output) > 1 and node.output[1] and view.consumers.get(node.output[1]):
        return False
    if len(node.output) > 1 and node.output[1] in view.graph_outputs:
        return False
    training = node.input[2] if len(node.input) > 2 else ""
    if not training:
        return True
    value = view.constant(training)
    return value is not None and not bool(value)


def eliminate_duplicates(graph: onnx.GraphProto) -> int:
    """Merges initializers with equal contents, then nodes with equal op, inputs and attributes."""
    view = GraphView(graph)
    pinned = outer_scope_names(graph) | view.graph_inputs | view.graph_outputs
    mapping: dict[str, str] = {}
    seen_tensors: dict[tuple, str] = {}
    # Only tensors sharing a type and shape with another can be equal: hash just those (reading a
    # tensor's bytes copies them).
    by_shape = Counter((t.data_type, tuple(t.dims)) for t in graph.initializer)
    for tensor in graph.initializer:
        if (tensor.name in pinned or tensor.data_location == onnx.TensorProto.EXTERNAL
                or by_shape[(tensor.data_type, tuple(tensor.dims))] < 2):
            continue
        payload = tensor.raw_data or _without_name(tensor)
        key = (tensor.data_type, tuple(tensor.dims), hashlib.sha1(payload).hexdigest())
        if key in seen_tensors:
            mapping[tensor.name] = seen_tensors[key]
        else:
            seen_tensors[key] = tensor.name
    merged_tensors = len(mapping)
    _rename(graph, mapping)

    seen_nodes: dict[tuple, onnx.NodeProto] = {}
    duplicates = []
    node_mapping: dict[str, str] = {}
    for node in graph.node:
        node.input[:] = [node_mapping.get(n, n) for n in node.input]
        if node.op_type in NONDETERMINISTIC_OPS or has_subgraph(node) or pinned & set(node.output):
            continue
        key = (node.domain, node.op_type, tuple(node.input), tuple(a.SerializeToString() for a in node.attribute))
        first = seen_nodes.get(key)
        if first is None:
            seen_nodes[key] = node
            continue
        node_mapping.update(zip(node.output, first.output))
        duplicates.append(node)
    remove_nodes(graph, duplicates)
    return merged_tensors + len(duplicates)


def _without_name(tensor: onnx.TensorProto) -> bytes:
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    copy.name = ""
    return copy.SerializeToString()


def _rename(graph: onnx.GraphProto, mapping: dict[str, str], producers: bool = False) -> None:
    if not mapping:
        return
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        if producers:
            node.output[:] = [mapping.get(n, n) for n in node.output]
    for vi in graph.value_info:
        if producers and vi.name in mapping:
            vi.name = mapping[vi.name]




def merge_reshape_chains(graph: onnx.GraphProto) -> int:
    """Reshape(Reshape(x, a), b) -> Reshape(x, b) when b is constant without 0s (only the element
    count carries over, and 0 would copy a dim of the intermediate) and nothing else reads Reshape(x, a)."""
    view = GraphView(graph)
    merged = 0
    for node in graph.node:
        if node.op_type != "Reshape":
            continue
        inner = view.producer.get(node.input[0])
        target = view.constant(node.input[1])
        if (inner is None or inner.op_type != "Reshape" or target is None or 0 in target
                or view.single_consumer(inner.output[0]) is not node):
            continue
        node.input[0] = inner.input[0]
        merged += 1
    return merged


def merge_unsqueeze_chains(graph: onnx.GraphProto, ranks: dict[str, int]) -> int:
    """Unsqueeze(Unsqueeze(x, a), b) -> Unsqueeze(x, c), c the positions of every inserted axis.

    Only for opset >= 13 graphs (axes as a constant input) and when x's rank is known.
    """
    view = GraphView(graph)
    names = NameGenerator(graph)
    new_axes: dict[str, np.ndarray] = {}  # merged axes added in this run (a chain merges in one go)
    merged = 0
    for node in graph.node:
        if node.op_type != "Unsqueeze" or len(node.input) < 2:
            continue
        inner = view.producer.get(node.input[0])
        if inner is None or inner.op_type != "Unsqueeze" or len(inner.input) < 2:
            continue
        first = new_axes[inner.input[1]] if inner.input[1] in new_axes else view.constant(inner.input[1])
        second = view.constant(node.input[1])
        rank = ranks.get(inner.input[0])
        if first is None or second is None or rank is None or view.single_consumer(inner.output[0]) is not node:
            continue
        layout = _insert_axes(["x"] * rank, first)
        layout = _insert_axes(layout, second)
        axes = np.array([i for i, d in enumerate(layout) if d == "new"], dtype=np.int64)
        name = names(node.input[1] + "_merged")
        graph.initializer.append(onnx.numpy_helper.from_array(axes, name))
        new_axes[name] = axes
        node.input[:] = [inner.input[0], name]
        merged += 1
    return merged


def _insert_axes(layout: list[str], axes: np.ndarray) -> list[str]:
    rank = len(layout) + axes.size
    positions = sorted(int(a) % rank for a in np.atleast_1d(axes))
    out, source = [], iter(layout)
    for i in range(rank):
        out.append("new" if i in positions else next(source))
    return out
