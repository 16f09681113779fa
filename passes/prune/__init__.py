"""Pruning (`prune`): structured pruning that shrinks tensors (so CPUs get faster), and N:M or
unstructured sparsity recorded in the model for sparse runtimes.

Structured pruning removes whole units of a channel group (`groups.py`): Conv output channels,
FFN neurons, attention heads, with every tensor tied to them. Which units go is decided per group
(`importance.py`: magnitude without data; with representative data, an OBS-style greedy choice on
the consumers' Gram matrices by default), how many by `ratio` (the same in every group, or with
`allocation=measured` as many units in all, spread by measured sensitivity), by an error budget
(`onnxopt.budget`: per-group ratios from measured sensitivity, within `max_error`) or by a speed goal
(`min_speedup`: the least error whose model is timed that much faster, `cost.py`). The layers that
read a pruned group are then refit by least squares on the data (`recover.py`), and the tensors
shrink (`shrink.py`). The speed guard keeps the input where the result is not faster.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Literal, Optional

import numpy as np
import onnx
from onnx import numpy_helper

from onnxopt import OnnxoptError, Pass, PassContext, PassResult, Table, budget, option
from onnxopt.graph import GraphView, nested_layers_note
from onnxopt.layer_inputs import collect
from onnxopt.manager import copy_model
from onnxopt.surgery import constants_to_initializers, unshare_vectors

from . import importance as importance_
from .cost import multiply_adds
from .canonical import merged_axis_transposes
from .groups import Group, find_groups, shape_probes
from .recover import bias_of, refit
from .shrink import shrink
from .stats import consumers

DEFAULT_MAX_ERROR = 0.01


@dataclasses.dataclass(frozen=True)
class PruneOptions:
    structure: str = option("channels", "channels: whole output channels of Conv/Gemm/MatMul and FFN neurons; "
                                        "heads: attention heads; unstructured: single weights set to zero; N:M "
                                        "(e.g. 2:4): N of every M weights along the reduction axis set to zero")
    ratio: Optional[float] = option(None, "fraction of each group's units (or each weight's values) to remove; "
                                          "with none of ratio, max_error and min_speedup, max_error=0.01 applies")
    max_error: Optional[float] = option(None, "largest 1 - cosine of the outputs on the representative data; "
                                              "the error budget chooses a ratio per group")
    min_speedup: Optional[float] = option(
        None, "goal: the pruned model this many times as fast as its input (timed at batch 8, or batch_size if "
              "less, 1 thread), at the least measured output error: units go where they cost the least error for "
              "the multiply-adds they save; where even the strongest levels fall short, the fastest is kept and the "
              "report says so")
    levels: tuple[float, ...] = option((0.125, 0.25, 0.375, 0.5), "max_error and min_speedup: the ratios a group "
                                                                   "may take")
    allocation: Literal["uniform", "measured"] = option(
        "uniform", "with ratio: uniform removes that fraction of every group; measured removes as many units in all, "
                   "spread over the groups by their measured sensitivity (each group alone at up to twice the "
                   "ratio, on the representative data)")
    importance: Optional[Literal["magnitude", "activation", "obs"]] = option(
        None, "how units are chosen: magnitude (no data needed), activation (|W| x ||x||), obs (greedy "
              "Optimal Brain Surgeon on the input Gram matrix); default obs with data, magnitude without")
    recover: Optional[bool] = option(None, "refit the layers reading pruned channels by least squares on the "
                                           "representative data; N:M and unstructured: let the kept weights "
                                           "absorb the zeroed ones (OBS update) (default: with data)")
    round_to: int = option(8, "keep a multiple of this many units per group (kernels stay fast)")
    samples: int = option(256, "representative samples to use at most")
    batch_size: int = option(8, "batch size over the representative data")
    exclude: str = option("", "layers to leave alone: node names or regular expressions, ';'-separated")
    keep_if_slower: bool = option(True, "time the pruned model against its input and keep the input if slower")

    def __post_init__(self):
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise ValueError("ratio must be in [0, 1)")
        if self.max_error is not None and not 0 < self.max_error < 1:
            raise ValueError("max_error must be in (0, 1)")
        if self.ratio is not None and self.max_error is not None:
            raise ValueError("give ratio or max_error, not both")
        if self.min_speedup is not None:
            if self.ratio is not None or self.max_error is not None:
                raise ValueError("min_speedup chooses the ratios by itself: give it without ratio or max_error")
            if not self.min_speedup > 1:
                raise ValueError("min_speedup must be above 1 (1.5: half as fast again)")
            if self.structure not in ("channels", "heads"):
                raise ValueError("min_speedup applies to structure=channels or heads (zeros give no speed on CPU)")
        if self.structure not in ("channels", "heads", "unstructured") and not re.fullmatch(r"\d+:\d+", self.structure):
            raise ValueError(f"structure must be channels, heads, unstructured or N:M, not {self.structure!r}")
        if ":" in self.structure:
            n, m = map(int, self.structure.split(":"))
            if not 0 < n < m:
                raise ValueError(f"N:M sparsity needs 0 < N < M, not {self.structure}")
        if any(not 0 < level < 1 for level in self.levels):
            raise ValueError("levels must lie in (0, 1)")
        if self.allocation == "measured" and self.ratio is None:
            raise ValueError("allocation=measured spreads a ratio: give ratio= too")
        if self.allocation == "measured" and self.structure not in ("channels", "heads"):
            raise ValueError("allocation=measured applies to structure=channels or heads")
        if self.round_to < 1 or self.samples < 1 or self.batch_size < 1:
            raise ValueError("round_to, samples and batch_size must be >= 1")


class Prune(Pass):
    """Prune: remove whole channels, FFN neurons or attention heads (tensors shrink), or set weights to
    zero in N:M or unstructured patterns (recorded in the model), chosen on representative data."""

    name = "prune"
    Options = PruneOptions
    lossy = True

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        options = self.options
        if options.structure not in ("channels", "heads"):
            from .sparsity import sparsify

            constants_to_initializers(model.graph)  # weights in Constant nodes are weights too
            return sparsify(model, ctx, options)
        if ctx.data is None and (options.recover or options.importance in ("activation", "obs")
                                 or options.allocation == "measured" or options.min_speedup):
            what = ("recover=true" if options.recover else "allocation=measured" if options.allocation == "measured"
                    else f"min_speedup={options.min_speedup}" if options.min_speedup
                    else "importance=" + options.importance)
            hint = ("give calib data, on which the goal measures each group's error; or give a ratio instead" if options.min_speedup
                    else "give calib data, or use importance=magnitude and allocation=uniform")
            raise OnnxoptError(f"prune:{what} needs representative data", hint)
        notes = nested_layers_note(model, {"Conv", "Gemm", "MatMul"}, "prune")
        constants_to_initializers(model.graph)
        unshare_vectors(model.graph)  # equal biases fold merged must not tie unrelated channels
        batches = ctx.data.batches(model, options.batch_size, options.samples, trim_padding=True) if ctx.data else None
        shapes = self._shapes(model, ctx, batches)
        merged_axis_transposes(model, shapes)  # dynamo's attention transposes keys through batch * heads
        groups, blocked = find_groups(model, shapes)
        groups = [g for g in groups if self._wanted(g)]
        if not groups:
            return PassResult(model, changed=False, skipped=["no prunable layer"] + blocked[:20], notes=notes)
        view = GraphView(model.graph, model.ir_version)
        method = options.importance or ("obs" if batches is not None else "magnitude")
        if batches is None:
            notes.append("no representative data: units chosen by weight magnitude, no refit (accuracy will suffer)")
        recover = options.recover if options.recover is not None else batches is not None
        budgeted = options.ratio is None
        # with the error budget, its check's samples stay out of the refit: checked on samples the refit
        # saw, 160 sentences read 0.009 and scored 0.934 on MiniLM's evaluation sentences
        fitted = budget.without_check(batches) if budgeted and batches is not None else batches
        stats = collect(model, consumers(groups, view), fitted, ctx.progress,
                                label="pruning statistics") if batches is not None else {}
        notes += _sample_notes(stats, recover)
        if options.ratio is None:
            levels = sorted(options.levels)
        elif options.allocation == "measured":  # up to twice the ratio, in quarters of it
            levels = [options.ratio * k / 4 for k in range(1, 9) if options.ratio * k / 4 < 1]
        else:
            levels = [options.ratio]
        orders = {id(g): importance_.removal_order(g, view, stats, self._removed(g, max(levels)), method)
                  for g in ctx.progress(groups, "choosing units", "group")}

        def build(ratios: dict[int, float]) -> onnx.ModelProto:
            removals = [(g, orders[id(g)][:self._removed(g, ratios[id(g)])]) for g in groups]
            return _pruned(model, removals, stats if recover else {})

        if options.min_speedup is not None:
            ratios, details = self._speed_goal(model, view, groups, levels, build, batches, ctx, notes)
        elif options.ratio is not None and options.allocation == "measured":
            ratios, details = self._allocate(model, groups, levels, build, batches, ctx, notes)
        elif options.ratio is not None:
            ratios = {id(g): options.ratio for g in groups}
            details = {"ratio": options.ratio}
        else:
            ratios, details = self._budget(model, view, groups, levels, build, batches, ctx, notes)
        result = build(ratios)
        removed = {id(g): self._removed(g, ratios[id(g)]) for g in groups}
        if not any(removed.values()):
            return PassResult(model, changed=False, skipped=["the error budget leaves every group whole"] + blocked[:20],
                              notes=notes, details=details)
        tables = [_group_table(groups, removed)]
        verdict = (ctx.guard.check_on_data(model, result, batches, ctx.sample_inputs)
                   if options.keep_if_slower else None)
        if verdict is not None:
            details["speed_check"] = verdict.records()
            tables.append(verdict.table("speed guard: pruned against its input"))
            if verdict.slower:
                notes.append(f"pruning does not pay on this model ({verdict.slower}); kept the input")
                return PassResult(model, changed=False, notes=notes, details=details, tables=tables)
        details.update(importance=method, recovered=bool(recover and stats), groups=len(groups))
        counts = {"groups pruned": sum(1 for n in removed.values() if n),
                  "units removed": sum(removed.values()), "groups blocked": len(blocked)}
        return PassResult(result, changed=True, counts=counts, skipped=blocked[:20], notes=notes,
                          details=details, tables=tables)

    # ------------------------------------------------------------------ choices

    def _wanted(self, group: Group) -> bool:
        heads = any(m.width > 1 and m.role == "out" for m in group.members) and group.reshaped
        if heads != (self.options.structure == "heads"):
            return False
        patterns = [p for p in self.options.exclude.split(";") if p]
        return not any(re.fullmatch(p, source) or p == source for p in patterns for source in group.sources)

    def _removed(self, group: Group, ratio: float) -> int:
        """Units to remove at `ratio`, keeping a multiple of round_to units (and at least one)."""
        if ratio <= 0:
            return 0
        step = self.options.round_to if group.units > self.options.round_to else 1
        kept = max(step, int(np.ceil(group.units * (1 - ratio) / step)) * step)
        return max(0, group.units - kept)

    def _shapes(self, model: onnx.ModelProto, ctx: PassContext, batches) -> dict[str, tuple[int, ...]]:
        """Tensor shapes on two samples, where inference cannot tell them (see groups.shape_probes)."""
        from onnxopt.fetch import fetching_session
        from onnxopt.validation import run

        feeds = batches.first_batch() if batches is not None else (ctx.sample_inputs or [None])[0]
        names = shape_probes(model)
        if feeds is None or not names:
            return {}
        if not (batches is not None and batches.per_entry):
            feeds = {k: v[:2] if np.ndim(v) else v for k, v in feeds.items()}
        session, fetch = fetching_session(model, names)
        values = dict(zip([o.name for o in session.get_outputs()], run(session, feeds)))
        return {n: np.shape(values[fetch[n]]) for n in names if fetch.get(n) in values}

    def _budget(self, model, view, groups, levels, build, batches, ctx, notes) -> tuple[dict, dict]:
        """The most weights removed whose measured output error stays within `max_error`, each group at
        one of `levels` (`onnxopt.budget.largest`: each group measured alone at each level)."""
        if batches is None:
            raise OnnxoptError("prune's error budget needs representative data", "give calib data, or a ratio")
        max_error = self.options.max_error if self.options.max_error is not None else DEFAULT_MAX_ERROR
        error_of, check, measure = budget.choice_and_check(model, batches)
        strengths = (0.0, *levels)
        per_unit = [_weights_per_unit(g, view) for g in groups]
        plan = budget.largest(_GroupChoices(groups, strengths, build), error_of,
                              lambda unit, s: per_unit[int(unit)] * self._removed(groups[int(unit)], strengths[s]),
                              max_error, ctx.progress, check)
        ratios = {id(g): strengths[plan.strengths[str(i)]] for i, g in enumerate(groups)}
        notes.append(f"error budget {max_error} on the {measure}: {plan.size} weights removed, error {plan.error:.4g} "
                     f"checked on other samples (the groups' errors alone add up to {plan.predicted:.4g}; "
                     f"{plan.evaluations} models measured)")
        return ratios, {"max_error": max_error, "error": plan.error,
                        "ratios": {g.sources[0]: ratios[id(g)] for g in groups}}

    def _speed_goal(self, model, view, groups, levels, build, batches, ctx, notes) -> tuple[dict, dict]:
        """The least measured output error whose pruned model is timed `min_speedup` times as fast
        as the input (`onnxopt.budget.to_speedup`, with multiply-adds as its cost model)."""
        goal = self.options.min_speedup
        error_of, check, measure = budget.choice_and_check(model, batches)
        strengths = (0.0, *levels)
        feeds = batches.first_batch()
        per_unit, total = multiply_adds(model, view, groups, feeds)
        timed_on: list[int | None] = []  # the batch each timing used (the guard slices it from `feeds`)

        def speedup_of(candidate: onnx.ModelProto) -> float:
            verdict = ctx.guard.check(model, candidate, feeds, batches=None if batches.per_entry else (8,),
                                      threads=(1,), clear_win=None, decisive=None)
            timed_on.append(verdict.checks[0].batch)
            return verdict.checks[0].speedup

        plan = budget.to_speedup(_GroupChoices(groups, strengths, build), error_of,
                                 lambda unit, s: per_unit[int(unit)] * self._removed(groups[int(unit)], strengths[s]),
                                 total, speedup_of, goal, ctx.progress, check)
        ratios = {id(g): strengths[plan.strengths[str(i)]] for i, g in enumerate(groups)}
        timed = ", ".join(f"{s:.2f}x" for _, s in plan.timed)
        where = ("on the data's first entry" if timed_on[0] is None else f"at batch {timed_on[0]}") + ", 1 thread"
        if plan.met:
            notes.append(f"speed goal {goal}x: {plan.speedup:.2f}x {where}; {measure}: {plan.error:.4g} "
                         f"(models timed: {timed})")
        else:
            notes.append(f"speed goal {goal}x not met: the fastest choice measured {plan.speedup:.2f}x {where} "
                         f"(models timed: {timed}), kept; {measure}: {plan.error:.4g}; stronger levels "
                         f"(levels=...;0.625;0.75) or quant may reach it")
        return ratios, {"min_speedup": goal, "met": plan.met, "speedup": plan.speedup, "error": plan.error,
                        "timed": [{"multiply_adds_removed": a, "speedup": s} for a, s in plan.timed],
                        "ratios": {g.sources[0]: ratios[id(g)] for g in groups}}

    def _allocate(self, model, groups, levels, build, batches, ctx, notes) -> tuple[dict, dict]:
        """As many units removed in all as `ratio` everywhere would remove, spread over the groups
        where the measured error is least (`onnxopt.budget.allocate`)."""
        error_of, measure = budget.output_error(model, batches)
        strengths = (0.0, *levels)
        target = sum(self._removed(g, self.options.ratio) for g in groups)
        plan = budget.allocate(_GroupChoices(groups, strengths, build), error_of,
                               lambda unit, s: self._removed(groups[int(unit)], strengths[s]), target, ctx.progress)
        ratios = {id(g): strengths[plan.strengths[str(i)]] for i, g in enumerate(groups)}
        chosen = sorted(ratios.values())
        notes.append(f"ratio {self.options.ratio} spread over {len(groups)} groups by measured sensitivity: "
                     f"{plan.size} units removed (the same ratio everywhere: {target}), ratios {chosen[0]:.3g} to "
                     f"{chosen[-1]:.3g}; {measure}: {plan.error:.4g} (the groups' errors alone add up to "
                     f"{plan.predicted:.4g}; {plan.evaluations} models measured)")
        return ratios, {"ratio": self.options.ratio, "allocation": "measured", "error": plan.error,
                        "ratios": {g.sources[0]: ratios[id(g)] for g in groups}}


def _weights_per_unit(group: Group, view: GraphView) -> int:
    """The weights one unit of `group` holds across its constant members (a Conv channel's fan-in
    and the next layer's fan-out, an FFN neuron's row and column): what removing it saves."""
    total = 0
    for member in group.members:
        value = view.constant(member.slot.tensor)
        if value is not None and value.ndim:
            total += member.width * value.size // value.shape[member.slot.axis]
    return total


class _GroupChoices:
    """The groups as the error budget's units (`onnxopt.budget.Tunable`), each at one of `strengths`
    (ratios, 0 first)."""

    def __init__(self, groups: list[Group], strengths: tuple[float, ...], build):
        self.groups, self._strengths, self._build = groups, strengths, build

    def units(self):
        return [str(i) for i in range(len(self.groups))]

    def strengths(self, unit):
        return self._strengths

    def build(self, chosen):
        return self._build({id(g): self._strengths[chosen[str(i)]] for i, g in enumerate(self.groups)})


def _pruned(model: onnx.ModelProto, removals: list[tuple[Group, list[int]]], stats) -> onnx.ModelProto:
    """A copy of `model` without the removed units, its consumers refit where `stats` allow."""
    pruned = copy_model(model)
    view = GraphView(pruned.graph, pruned.ir_version)
    initializers = {t.name: t for t in pruned.graph.initializer}
    refits: dict[str, list[int]] = {}  # consumer weight -> removed feature indices (original coordinates)
    for group, units in removals:
        for member in group.members:
            st = stats.get(member.slot.tensor) if member.role == "in" else None
            if units and st is not None and st.gram is not None:
                features = importance_.unit_features(group, member.slot.tensor, st.kernel)
                refits.setdefault(member.slot.tensor, []).extend(np.concatenate([features[u] for u in units]))
    for weight_name, removed_features in refits.items():
        st = stats[weight_name]
        weight = view.constant(weight_name)
        holder = bias_of(_same_node(st.layer, model, pruned), view)
        bias = view.constant(holder[0].input[holder[1]]) if holder else None
        kept = np.setdiff1d(np.arange(len(st.gram)), removed_features)
        new_weight, new_bias = refit(st, weight, bias, kept)
        full = np.zeros_like(weight)  # written back in the full layout; shrink removes the rest
        _write_rows(st.layer, full, kept, new_weight)
        initializers[weight_name].CopyFrom(numpy_helper.from_array(full, weight_name))
        if new_bias is not None:
            name = holder[0].input[holder[1]]
            initializers[name].CopyFrom(numpy_helper.from_array(new_bias.reshape(bias.shape), name))
    shrink(pruned, removals, found_in=model)
    return pruned


def _same_node(node: onnx.NodeProto, original: onnx.ModelProto, copy: onnx.ModelProto) -> onnx.NodeProto:
    return copy.graph.node[next(i for i, n in enumerate(original.graph.node) if n is node)]


def _write_rows(layer, full: np.ndarray, kept_features: np.ndarray, kept_weight: np.ndarray) -> None:
    """Places the refit weight (over the kept features) into the full-size weight tensor."""
    if layer.op_type == "Conv":
        flat = full.reshape(full.shape[0], -1)
        flat[:, kept_features] = kept_weight.reshape(kept_weight.shape[0], -1)
    elif layer.op_type == "Gemm" and any(a.name == "transB" and a.i for a in layer.attribute):
        full[:, kept_features] = kept_weight
    else:
        full[kept_features] = kept_weight


def _sample_notes(stats, recover: bool) -> list[str]:
    short = [(st.layer.name or st.layer.output[0], st.count, len(st.gram)) for st in stats.values()
             if st.gram is not None and st.count < 2 * len(st.gram)]
    notes = []
    if short and recover:
        layer, count, features = short[0]
        notes.append(f"the representative data gives {count} positions for {features} features at '{layer}' "
                     f"({len(short)} layer(s) like it): the refit is underdetermined there and leans on its "
                     "regularization; more samples help")
    too_large = [st.layer.name or st.layer.output[0] for st in stats.values() if st.gram is None]
    if too_large and recover:
        notes.append(f"{len(too_large)} layer(s) with too many input features are not refit (e.g. '{too_large[0]}')")
    return notes


def _group_table(groups: list[Group], removed: dict[int, int]) -> Table:
    rows = [[g.describe()[:70], g.units, removed[id(g)], g.units - removed[id(g)]] for g in groups]
    return Table("groups (units: channels, neurons or heads)", ["group", "units", "removed", "kept"], rows)
