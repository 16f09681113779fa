"""Folding where control flow is: an If whose condition is constant, and the bodies of If, Loop and Scan.

An `If` whose condition folding proved constant becomes the branch it always takes.

ONNX Runtime inlines such an If itself when it loads the model, and its shape inference then sees
the branch's values where the If's outputs were: a `Split` of a shape yields [1]-shaped tensors that
a `Range` would have taken at run time (ORT's kernel accepts one-element vectors) but that static
inference refuses ("Input to 'Range' op should be scalars"). So fold inlines the branch first and
keeps scalars scalars: an input ONNX requires to be a scalar reads the branch value through a
Reshape to shape [] (exact for the one-element tensor the original model must have had
there), and the branch's values reach the If's outputs through Identity nodes that cleanup removes.

Two If nodes may use the same names inside their branches; a branch name that the enclosing graph
already uses is renamed as the branch is inlined, in the branch's nested subgraphs too.

Inside every subgraph (outermost first), Constant nodes become the subgraph's initializers, nodes
fed only by constants (the subgraph's, or the enclosing graphs' weights) are evaluated, and nodes
that no subgraph output needs are removed, as in the main graph.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from collections import Counter

from onnxopt.graph import GraphView, NameGenerator, scopes
from onnxopt.surgery import add_initializer, constants_to_initializers, remove_unused_initializers

from . import cleanup

# op -> input indices the op's schema requires to be scalars
SCALAR_INPUTS = {"Range": (0, 1, 2)}


def _branch(node: onnx.NodeProto, taken: bool) -> onnx.GraphProto:
    name = "then_branch" if taken else "else_branch"
    return next(a.g for a in node.attribute if a.name == name)


def _defined(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    for node in graph.node:
        names.update(node.output)
    return names


def inline_constant_ifs(model: onnx.ModelProto) -> int:
    """Inlines every top-level If with a constant condition; returns how many."""
    graph = model.graph
    view = GraphView(graph, model.ir_version)
    scalar_reads: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i in SCALAR_INPUTS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i]:
                scalar_reads.setdefault(node.input[i], []).append((node, i))
    used = _defined(graph)
    names = NameGenerator(graph)
    nodes: list[onnx.NodeProto] = []
    inlined = 0
    for node in graph.node:
        condition = view.constant(node.input[0]) if node.op_type == "If" and node.domain in ("", "ai.onnx") else None
        if condition is None or condition.size != 1:
            nodes.append(node)
            continue
        branch = onnx.GraphProto()
        branch.CopyFrom(_branch(node, bool(condition.reshape(-1)[0])))
        taken = {name: names(name) for name in sorted(_defined(branch) & used)}
        if taken:
            _rename(branch, taken)
        used |= _defined(branch)
        graph.initializer.extend(branch.initializer)
        nodes.extend(branch.node)
        for value, out in zip(branch.output, node.output):
            if not out:
                continue
            nodes.append(helper.make_node("Identity", [value.name], [out], name=names(f"{out}_inlined")))
            if out in scalar_reads:  # those readers get the value as a scalar; the others as it was
                empty, scalar = names(f"{out}_scalar_shape"), names(f"{out}_scalar")
                add_initializer(graph, np.zeros(0, np.int64), empty)
                nodes.append(helper.make_node("Reshape", [value.name, empty], [scalar], name=names(f"{out}_to_scalar")))
                for reader, index in scalar_reads[out]:
                    reader.input[index] = scalar
        inlined += 1
    if inlined:
        del graph.node[:]
        graph.node.extend(nodes)
    return inlined


def _rename(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Renames values everywhere in `graph`: its initializers, nodes, outputs and nested subgraphs
    (no name is shadowed in a valid model, so a name means the same value at every depth)."""
    for tensor in graph.initializer:
        tensor.name = mapping.get(tensor.name, tensor.name)
    for value in [*graph.output, *graph.value_info]:
        value.name = mapping.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                _rename(sub, mapping)


def fold_subgraphs(model: onnx.ModelProto, max_mb: float) -> Counter:
    """Constant folding and dead-node removal inside every subgraph; counts per kind of change."""
    from .fold import fold_constant_nodes  # fold calls this module: import when called

    counts: Counter[str] = Counter()
    index = 1
    while index < len(found := scopes(model)):  # views rebuilt after each subgraph's edits
        graph, view = found[index]
        counts["subgraph constant nodes to initializers"] += constants_to_initializers(graph)
        folded, _ = fold_constant_nodes(model, max_mb, graph, view.outer)
        counts["subgraph nodes folded"] += folded
        counts["subgraph dead nodes removed"] += cleanup.remove_dead_nodes(graph)
        counts["subgraph unused initializers removed"] += remove_unused_initializers(graph)
        index += 1
    return counts
