"""Pattern rewrites: a rule matches a small subgraph, checks it can be rewritten, and builds a replacement.

Matching and checking only read the graph (through a GraphView); all edits happen afterwards in
`apply_rules`, so one match can never see the graph half-rewritten. Overlapping matches are resolved
first come, first served, in graph order.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Protocol

import onnx

from .graph import GraphView, NameGenerator, scopes


@dataclasses.dataclass
class Match:
    nodes: list[onnx.NodeProto]
    values: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Replacement:
    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto] = dataclasses.field(default_factory=list)


class Rule(Protocol):
    name: str

    def match(self, node: onnx.NodeProto, view: GraphView) -> Match | None:
        """The subgraph rooted at `node` if it has the rule's shape (no semantic checks)."""

    def check(self, match: Match, view: GraphView) -> str | None:
        """Why the match cannot be rewritten, or None when it can."""

    def replace(self, match: Match, view: GraphView, names: NameGenerator) -> Replacement:
        """The nodes (and new initializers) that compute the same outputs."""


@dataclasses.dataclass
class RewriteOutcome:
    counts: Counter = dataclasses.field(default_factory=Counter)
    skipped: Counter = dataclasses.field(default_factory=Counter)

    def skip_lines(self) -> list[str]:
        return [f"{rule}: {reason} (x{n})" for (rule, reason), n in sorted(self.skipped.items())]


def apply_rules_everywhere(model: onnx.ModelProto, rules: list[Rule],
                           value_info: dict[str, onnx.ValueInfoProto] | None = None) -> RewriteOutcome:
    """`apply_rules` on the main graph and in every subgraph, innermost first: a subgraph's rewrite
    edits only the subgraph, so the enclosing graphs its view reads constants from are still as they
    were when it was built."""
    outcome = RewriteOutcome()
    names = NameGenerator(model.graph)
    for graph, view in reversed(scopes(model)):
        step = apply_rules(graph, rules, value_info, outer=view.outer, names=names)
        outcome.counts.update(step.counts)
        outcome.skipped.update(step.skipped)
    return outcome


def apply_rules(graph: onnx.GraphProto, rules: list[Rule],
                value_info: dict[str, onnx.ValueInfoProto] | None = None, outer: GraphView | None = None,
                names: NameGenerator | None = None) -> RewriteOutcome:
    view = GraphView(graph, outer=outer)
    if value_info:
        view.value_info.update(value_info)
    names = names or NameGenerator(graph)
    outcome = RewriteOutcome()
    claimed: set[int] = set()
    planned: list[tuple[Match, Replacement]] = []
    for node in graph.node:
        for rule in rules:
            match = rule.match(node, view)
            if match is None or any(id(n) in claimed for n in match.nodes):
                continue
            reason = rule.check(match, view)
            if reason:
                outcome.skipped[(rule.name, reason)] += 1
                continue
            claimed.update(id(n) for n in match.nodes)
            planned.append((match, rule.replace(match, view, names)))
            outcome.counts[rule.name] += 1
            break
    _apply(graph, planned)
    return outcome


def _apply(graph: onnx.GraphProto, planned: list[tuple[Match, Replacement]]) -> None:
    """Replacements go where the last matched node was, which keeps the node list topologically sorted."""
    if not planned:
        return
    position = {id(n): i for i, n in enumerate(graph.node)}
    insert_at = {max(position[id(n)] for n in m.nodes): r for m, r in planned}
    removed = {id(n) for m, _ in planned for n in m.nodes}
    new_nodes = []
    for i, node in enumerate(graph.node):
        if i in insert_at:
            new_nodes.extend(insert_at[i].nodes)
        if id(node) not in removed:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    for _, replacement in planned:
        graph.initializer.extend(replacement.initializers)
