"""Which units of a group to remove: scores, and the order in which to remove them.

- magnitude: the squared norm of each unit's slice of every weight of the group (output channels of
  the layers it shrinks, input channels of the layers that read it), each weight's share normalized
  so that a large layer does not drown a small one. Needs no data.
- activation (Wanda-style, structured): for each consumer, ||x_c|| * ||W_c|| summed over the unit's
  input channels c: a channel is as important as the signal it carries times the weight it meets.
- obs (Optimal Brain Surgeon, structured): greedy over the consumers' Gram matrices H = X^T X. With
  H^-1 over the features still kept, removing unit u and refitting the rest costs
  tr(W_u^T [(H^-1)_uu]^-1 W_u) (W_u the consumer's weight rows of u's features); the cheapest units
  go first, H^-1 shrinking by the Schur complement after each step, a few units at a time.
A score is "higher is more important"; `removal_order` returns the units to drop, first first.
"""
from __future__ import annotations

import numpy as np

from onnxopt.graph import GraphView, attribute
from onnxopt.layer_inputs import LayerInputStats

from .groups import Group

RIDGE = 1e-2  # H + RIDGE * mean(diag H) * I: inputs with dead or constant channels stay invertible


def weight_matrix(layer, weight: np.ndarray) -> np.ndarray:
    """A consumer's weight as [features, outputs]: MatMul's as is, Gemm's (transB) transposed, a
    Conv's [O, C, kh, kw] as [C * kh * kw, O]."""
    if layer.op_type == "Conv":
        return weight.reshape(weight.shape[0], -1).T
    if layer.op_type == "Gemm" and attribute(layer, "transB", 0):
        return weight.T
    return weight


def unit_features(group: Group, weight: str, kernel: int) -> list[np.ndarray]:
    """For each unit, the consumer's feature indices it covers."""
    member = next(m for m in group.members if m.slot.tensor == weight and m.role == "in")
    return [(member.indices([u])[:, None] * kernel + np.arange(kernel)).reshape(-1) for u in range(group.units)]


def magnitude(group: Group, view: GraphView) -> np.ndarray:
    scores = np.zeros(group.units)
    for member in group.members:
        if member.role not in ("in", "out"):
            continue
        value = view.constant(member.slot.tensor).astype(np.float64)
        moved = np.moveaxis(value, member.slot.axis, 0)
        per_index = np.square(moved.reshape(moved.shape[0], -1)).sum(axis=1)
        total = per_index.sum() or 1.0
        scores += [per_index[member.indices([u])].sum() / total for u in range(group.units)]
    return scores


def activation(group: Group, view: GraphView, stats: dict[str, LayerInputStats]) -> np.ndarray | None:
    """None when no consumer of the group has statistics."""
    scores, used = np.zeros(group.units), False
    for member in group.members:
        st = stats.get(member.slot.tensor) if member.role == "in" else None
        if st is None:
            continue
        used = True
        matrix = weight_matrix(st.layer, view.constant(member.slot.tensor)).astype(np.float64)
        row_norms = np.sqrt(np.square(matrix).sum(axis=1)).reshape(-1, st.kernel).sum(axis=1)  # per channel
        signal = np.sqrt(st.channel_sumsq / max(st.count, 1))
        per_channel = signal * row_norms
        total = per_channel.sum() or 1.0
        scores += [per_channel[member.indices([u])].sum() / total for u in range(group.units)]
    return scores if used else None


def removal_order(group: Group, view: GraphView, stats: dict[str, LayerInputStats], count: int,
                  method: str) -> list[int]:
    """`count` units to remove, by `method` (magnitude | activation | obs); obs and activation fall
    back to what the data allows."""
    if count <= 0:
        return []
    if method == "obs":
        order = _obs(group, view, stats, count)
        if order is not None:
            return order
        method = "activation"
    scores = activation(group, view, stats) if method == "activation" else None
    if scores is None:
        scores = magnitude(group, view)
    return [int(u) for u in np.argsort(scores, kind="stable")[:count]]


def _obs(group: Group, view: GraphView, stats: dict[str, LayerInputStats], count: int) -> list[int] | None:
    problems = []
    for member in group.members:
        st = stats.get(member.slot.tensor) if member.role == "in" else None
        if st is None or st.gram is None:
            continue
        h = st.gram / max(st.count, 1)
        h = h + RIDGE * max(float(np.mean(np.diag(h))), 1e-12) * np.eye(len(h))
        weights = weight_matrix(st.layer, view.constant(member.slot.tensor)).astype(np.float64)
        problems.append([np.linalg.inv(h), weights, unit_features(group, member.slot.tensor, st.kernel)])
    if not problems:
        return None
    removed: list[int] = []
    alive = list(range(group.units))
    step = max(1, count // 16)
    while len(removed) < count:
        costs = np.zeros(len(alive))
        for hinv, weights, features in problems:
            if all(len(features[u]) == 1 for u in alive):  # one feature a unit: the blocks are diagonal entries
                f = np.array([features[u][0] for u in alive])
                costs += np.square(weights[f]).sum(axis=1) / np.diag(hinv)[f]
                continue
            for i, u in enumerate(alive):
                f = features[u]
                costs[i] += float(np.sum(weights[f] * np.linalg.solve(hinv[np.ix_(f, f)], weights[f])))
        take = [alive[i] for i in np.argsort(costs, kind="stable")[:min(step, count - len(removed))]]
        for problem in problems:
            hinv, weights, features = problem
            f = np.concatenate([features[u] for u in take])
            block = hinv[np.ix_(f, f)]
            correction = np.linalg.solve(block, hinv[f])  # [|f|, F]
            weights -= hinv[:, f] @ np.linalg.solve(block, weights[f])  # the rest absorbs what f did
            hinv -= hinv[:, f] @ correction
            hinv[f] = 0.0
            hinv[:, f] = 0.0
            weights[f] = 0.0
        removed += take
        alive = [u for u in alive if u not in take]
    return removed
