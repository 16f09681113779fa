"""Edits on a GraphProto that every pass makes: adding initializers, swapping and removing nodes,
dropping initializers nobody reads. Passes of every wing use these; each edits in place.

Tensors that a subgraph (If/Loop/Scan body) reads from the outer scope count as read: the body
would lose them otherwise.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .graph import GraphView, NameGenerator, subgraph_inputs


def outer_scope_names(graph: onnx.GraphProto) -> set[str]:
    """Names the graph's subgraphs read from it."""
    names: set[str] = set()
    for node in graph.node:
        names |= subgraph_inputs(node)
    return names


def add_initializer(graph: onnx.GraphProto, value: np.ndarray, name: str) -> None:
    """Appends `value` as an initializer, building it in place: appending a finished TensorProto
    copies it, which for folded weights of hundreds of MB is most of the cost."""
    value = np.asarray(value)
    if value.dtype.kind not in "fiub" or value.dtype.byteorder == ">" or value.dtype == np.float16:
        graph.initializer.append(numpy_helper.from_array(value, name))
        return
    tensor = graph.initializer.add()
    tensor.name = name
    tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
    tensor.dims.extend(value.shape)
    tensor.raw_data = np.ascontiguousarray(value).tobytes()


def remove_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    if not nodes:
        return
    doomed = {id(n) for n in nodes}
    kept = [n for n in graph.node if id(n) not in doomed]
    del graph.node[:]
    graph.node.extend(kept)


def remove_unused_initializers(graph: onnx.GraphProto) -> int:
    """Drops initializers (and their value_info) that no node, subgraph or graph output reads."""
    used = {name for node in graph.node for name in node.input} | outer_scope_names(graph)
    used |= {o.name for o in graph.output}
    unused = [t for t in graph.initializer if t.name not in used]
    for tensor in unused:
        graph.initializer.remove(tensor)
    inputs = {i.name for i in graph.input}
    for value in [v for v in graph.value_info if v.name in {t.name for t in unused} - inputs]:
        graph.value_info.remove(value)
    return len(unused)


def replace_nodes(model: onnx.ModelProto, replacements: dict[int, onnx.NodeProto], domain: str | None = None) -> None:
    """Swaps nodes (keyed by id() of the old node) in place, imports `domain` if the new nodes need it,
    and drops the initializers nothing reads any more."""
    rebuilt = [replacements.get(id(n), n) for n in model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(rebuilt)
    if replacements and domain and not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    remove_unused_initializers(model.graph)


def constants_to_initializers(graph: onnx.GraphProto) -> int:
    """Constant nodes become initializers (sparse values are left alone): some exporters keep every
    weight in a Constant node, and passes look for weights among the initializers."""
    view = GraphView(graph)
    moved = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = view.constant(node.output[0])
            if value is not None and value.dtype != object:
                graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
                moved.append(node)
    remove_nodes(graph, moved)
    return len(moved)


def unshare_vectors(graph: onnx.GraphProto) -> int:
    """Gives each reader of a shared float vector initializer (one axis longer than 1: a bias, a norm's
    scale) its own copy; returns how many copies were made. `fold` merges equal initializers, and
    equal vectors are common where nothing set them apart (zero biases, unit LayerNorm scales of a
    freshly initialized or never-trained layer): shared, they would tie channels that have nothing
    to do with each other. Matrices stay shared: a tie between two of them is real (tied embeddings)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in dict.fromkeys(node.input):
            readers.setdefault(name, []).append(node)
    names, copies = None, 0
    for tensor in list(graph.initializer):
        shared = readers.get(tensor.name, [])
        floating = tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                                        onnx.TensorProto.DOUBLE)
        if len(shared) < 2 or sum(d > 1 for d in tensor.dims) != 1 or not floating:
            continue
        names = names or NameGenerator(graph)
        for node in shared[1:]:
            copy = graph.initializer.add()
            copy.CopyFrom(tensor)
            copy.name = names(tensor.name)
            node.input[:] = [copy.name if n == tensor.name else n for n in node.input]
            copies += 1
    return copies
