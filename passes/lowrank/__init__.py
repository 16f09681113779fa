"""Low-rank factorization (`lowrank`): a MatMul, Gemm or Conv with a constant weight W [K, N]
becomes two thinner layers x @ A @ B at rank r (a KxK Conv: KxK to r channels, then 1x1), where that
has fewer weights and runs faster.

`factor.py` finds the layers, decomposes each weight once (whitened by its inputs' Gram matrix on
the representative data by default, and on the output side by what the output costs downstream:
`downstream.py`; plain SVD without data) and rewrites the graph; `pays.py` times
a layer dense against factored. The rank comes from `ratio` (parameters kept), `rank`, `energy`
(of the whitened spectrum) or, by default, the error budget (`onnxopt.budget`): each matrix gets the
lowest rank among `levels` that keeps the outputs within `max_error`, matrices differing as they do
(attention projections and FFN matrices do not compress alike).

`compensate=true` is the second mode (`compensate.py`): after `quant:bits=4`, a low-rank correction
of each int4 MatMul's weight error beside it.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Literal, Optional

import numpy as np
import onnx

from onnxopt import OnnxoptError, Pass, PassContext, PassResult, Table, budget, option
from onnxopt.graph import GraphView, nested_layers_note
from onnxopt.layer_inputs import LayerInputStats, collect
from onnxopt.manager import copy_model
from onnxopt.surgery import constants_to_initializers, remove_unused_initializers

from .compensate import compensate
from .downstream import output_metrics
from .factor import Decomposition, Layer, decompose, eligible, factor_in_place
from .pays import BreakEven
from .refit import paired_grams, second_factor

DEFAULT_MAX_ERROR = 0.01


@dataclasses.dataclass(frozen=True)
class LowRankOptions:
    ratio: Optional[float] = option(None, "fraction of each matrix's parameters the two factors keep, in (0, 1]")
    rank: Optional[int] = option(None, "one rank for every matrix")
    energy: Optional[float] = option(None, "keep the smallest rank holding this fraction of the (whitened) "
                                           "spectrum's energy, per matrix")
    max_error: Optional[float] = option(None, "largest 1 - cosine of the outputs on the representative data; the "
                                              "error budget chooses a rank per matrix (the default, at 0.01, when "
                                              "no ratio, rank or energy is given)")
    levels: tuple[float, ...] = option((0.75, 0.5, 0.375, 0.25), "max_error: the parameter fractions a matrix "
                                                                 "may keep")
    allocation: Literal["uniform", "measured"] = option(
        "uniform", "with ratio: uniform factors every matrix to that fraction of its parameters; measured removes "
                   "as many parameters in all, spread over the matrices by their measured sensitivity (each alone "
                   "at a half to twice the ratio, on the representative data)")
    method: Optional[Literal["whitened", "asvd", "svd"]] = option(
        None, "whitened: truncated SVD whitened by the inputs' Gram matrix (default with data); asvd: input "
              "channels scaled by their RMS^0.5; svd: plain SVD of the weight (default without data)")
    output_aware: bool = option(True, "method=whitened: weigh each matrix's truncation error by what its output "
                                      "costs downstream: the scales of the LayerNorm it reaches, or the next MatMul "
                                      "through an activation (see downstream.py)")
    refit: bool = option(False, "refit each second factor by least squares on the factored model's own inputs "
                                "(one more pass over the data; measured worse on MiniLM, see docs/lowrank.md)")
    ops: str = option("MatMul;Gemm;Conv", "layer types to factor (Conv: 2-D, ungrouped), ';'-separated")
    exclude: str = option("", "layers to leave alone: node or weight names or regular expressions, ';'-separated")
    samples: int = option(256, "representative samples to use at most")
    batch_size: int = option(8, "batch size over the representative data")
    keep_if_slower: bool = option(True, "time each factored layer against its dense form and the result against "
                                        "the input; keep what is not faster")
    compensate: bool = option(False, "after quant:bits=4: add a low-rank correction of each int4 MatMul's weight "
                                     "error beside it (x @ A @ B), rank by rank= or the error budget (by default "
                                     "a quarter of int4's output error); see compensate.py")
    ranks: tuple[int, ...] = option((8, 16, 32, 64), "compensate=true with the budget: the ranks a correction may "
                                                     "take")

    def __post_init__(self):
        given = [k for k in ("ratio", "rank", "energy", "max_error") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of ratio, rank, energy and max_error, not {' and '.join(given)}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ValueError("ratio must be in (0, 1]")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ValueError("energy must be in (0, 1]")
        if self.max_error is not None and not 0 < self.max_error < 1:
            raise ValueError("max_error must be in (0, 1)")
        if self.rank is not None and self.rank < 1:
            raise ValueError("rank must be >= 1")
        if any(not 0 < level < 1 for level in self.levels):
            raise ValueError("levels must lie in (0, 1)")
        if self.allocation == "measured" and (self.ratio is None or self.compensate):
            raise ValueError("allocation=measured spreads a ratio: give ratio= (and not compensate=true)")
        if self.compensate and (self.ratio is not None or self.energy is not None):
            raise ValueError("compensate=true takes rank= or max_error=, not ratio= or energy=")
        if any(r < 1 for r in self.ranks):
            raise ValueError("ranks must be >= 1")
        if self.samples < 1 or self.batch_size < 1:
            raise ValueError("samples and batch_size must be >= 1")


class LowRank(Pass):
    """Low-rank: replace MatMul/Gemm/Conv weights by two thinner factors where that has fewer
    weights and runs faster, activation-aware on representative data."""

    name = "lowrank"
    Options = LowRankOptions
    lossy = True

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        options = self.options
        if options.compensate:
            return compensate(model, ctx, options)
        budgeted = options.ratio is None and options.rank is None and options.energy is None
        if ctx.data is None and (budgeted or options.method in ("whitened", "asvd")):
            what = f"method={options.method}" if options.method else "the error budget (max_error)"
            raise OnnxoptError(f"lowrank: {what} needs representative data", "give calib data, or ratio=/rank= "
                               "with method=svd")
        if ctx.data is None and options.allocation == "measured":
            raise OnnxoptError("lowrank:allocation=measured needs representative data", "give calib data, or "
                               "allocation=uniform")
        if ctx.data is None and options.refit:
            raise OnnxoptError("lowrank:refit=true needs representative data", "give calib data")
        ops = set(filter(None, options.ops.split(";")))
        notes = nested_layers_note(model, ops, "lowrank")
        constants_to_initializers(model.graph)
        view = GraphView(model.graph, model.ir_version)
        layers, skipped = eligible(model, view, ops)
        layers = [layer for layer in layers if not self._excluded(layer)]
        if not layers:
            return PassResult(model, changed=False, skipped=["no MatMul, Gemm or Conv with a constant float32 "
                                                             "weight to factor"] + skipped[:20], notes=notes)
        method = options.method or ("whitened" if ctx.data is not None else "svd")
        if ctx.data is None:
            notes.append("no representative data: plain SVD of the weights (accuracy will suffer; give calib data "
                         "for the activation-aware factors)")
        batches = ctx.data.batches(model, options.batch_size, options.samples, trim_padding=True) if ctx.data else None
        # with the error budget, its check's samples stay out of the statistics the factors are fit on
        fitted = budget.without_check(batches) if budgeted and batches is not None else batches
        stats = _stats(model, layers, fitted, ctx, gram=method == "whitened") if method != "svd" else {}
        metrics = (output_metrics(model, view, layers, fitted, ctx.progress)
                   if method == "whitened" and options.output_aware else {})
        decompositions = [decompose(layer, stats.get(i), method, metrics.get(i))
                          for i, layer in enumerate(ctx.progress(layers, "factoring", "matrix"))]
        if options.rank is not None and all(options.rank > min(layer.matrix.shape) for layer in layers):
            raise OnnxoptError(f"lowrank: rank={options.rank} is larger than every matrix allows (the largest "
                               f"min(K, N) here is {max(min(layer.matrix.shape) for layer in layers)})",
                               "give a smaller rank, or ratio=")
        timing = BreakEven(ctx.guard) if options.keep_if_slower else None
        choices = [self._ranks(layer, d, timing, skipped) for layer, d in zip(layers, decompositions)]
        wanted = [i for i, ranks in enumerate(choices) if ranks]

        def build(chosen: dict[int, int], seconds: dict[int, np.ndarray] | None = None) -> onnx.ModelProto:
            """`model` with each chosen layer factored at its rank (second factors from `seconds` where given)."""
            result = copy_model(model)
            for i, rank in chosen.items():
                a, b = decompositions[i].factors(rank)
                b = (seconds or {}).get(i, b)
                factor_in_place(result, layers[i], rank, a, b, decompositions[i].shift(layers[i].matrix, a, b))
            remove_unused_initializers(result.graph)
            return result

        details: dict = {"method": method, "output_aware": len(metrics)}
        if not wanted:
            return PassResult(model, changed=False, skipped=skipped[:40], notes=notes, details=details)
        if budgeted:
            chosen = self._budget(model, layers, choices, wanted, build, batches, ctx, notes, details)
        elif options.allocation == "measured":
            chosen = self._allocate(model, layers, choices, wanted, build, batches, ctx, notes, details)
        else:
            chosen = {i: choices[i][-1] for i in wanted}
        if not chosen:
            return PassResult(model, changed=False, skipped=skipped[:40] + ["the error budget leaves every matrix whole"],
                              notes=notes, details=details)
        result = build(chosen)
        if options.refit:
            result = build(chosen, _refit(model, result, layers, decompositions, chosen, batches, ctx))
        details["refit"] = options.refit
        tables = [_layer_table(layers, chosen, timing)]
        verdict = (ctx.guard.check_on_data(model, result, batches, ctx.sample_inputs)
                   if options.keep_if_slower else None)
        if verdict is not None:
            details["speed_check"] = verdict.records()
            tables.append(verdict.table("speed guard: factored against its input"))
            if verdict.slower:
                notes.append(f"the factorization does not pay on this model ({verdict.slower}); kept the input")
                return PassResult(model, changed=False, notes=notes, details=details, tables=tables)
        removed = sum(layers[i].matrix.size - r * sum(layers[i].matrix.shape) for i, r in chosen.items())
        details["ranks"] = {layers[i].name: r for i, r in chosen.items()}
        return PassResult(result, changed=True, counts={"matrices factored": len(chosen), "weights removed": removed},
                          skipped=skipped[:40], notes=notes, details=details, tables=tables)

    def _excluded(self, layer: Layer) -> bool:
        patterns = [p for p in self.options.exclude.split(";") if p]
        names = {layer.weight, *(n.name for n in layer.nodes if n.name)}
        return any(p == name or re.fullmatch(p, name) for p in patterns for name in names)

    def _ranks(self, layer: Layer, decomposition: Decomposition, timing: BreakEven | None,
               skipped: list[str]) -> list[int]:
        """The ranks this layer may take, weakest first; those that do not pay are dropped (and said)."""
        options, (k, n) = self.options, layer.matrix.shape
        if options.rank is not None:
            if options.rank > min(k, n):
                skipped.append(f"{layer.name}: rank {options.rank} > min(K, N) = {min(k, n)}")
                return []
            ranks = [options.rank]
        elif options.energy is not None:
            ranks = [decomposition.rank_for_energy(options.energy)]
        elif options.ratio is not None and options.allocation == "measured":  # a half to twice the ratio
            kept_fractions = [options.ratio * k / 4 for k in range(2, 9)]
            ranks = sorted({layer.rank_for(f) for f in kept_fractions if f < 1}, reverse=True)
        elif options.ratio is not None:
            ranks = [layer.rank_for(options.ratio)]
        else:
            ranks = sorted({layer.rank_for(level) for level in options.levels}, reverse=True)
        kept = []
        for rank in ranks:
            if rank >= layer.break_even:
                reason = f"rank {rank} keeps as many weights as the {k}x{n} matrix (break-even {layer.break_even:.0f})"
            elif timing is not None and (speedup := timing.speedup(layer, rank)) < 1.0:
                reason = f"factored at rank {rank} it runs {speedup:.2f}x as fast as dense"
            else:
                kept.append(rank)
                continue
            if len(ranks) == 1 or rank == ranks[-1] and not kept:
                skipped.append(f"{layer.name}: {reason}")
        return kept

    def _budget(self, model, layers, choices, wanted, build, batches, ctx, notes, details) -> dict[int, int]:
        """The most weights removed whose measured output error stays within `max_error`, each matrix
        at one of its ranks or whole (`onnxopt.budget.largest`: each matrix measured alone at each)."""
        max_error = self.options.max_error if self.options.max_error is not None else DEFAULT_MAX_ERROR
        error_of, check, measure = budget.choice_and_check(model, batches)
        plan = budget.largest(_MatrixChoices(wanted, choices, build), error_of, _sizes(layers, choices), max_error,
                              ctx.progress, check)
        notes.append(f"error budget {max_error} on the {measure}: {plan.size} weights removed, error {plan.error:.4g} "
                     f"checked on other samples (the matrices' errors alone add up to {plan.predicted:.4g}; "
                     f"{plan.evaluations} models measured)")
        details.update(max_error=max_error, error=plan.error)
        return {i: choices[i][plan.strengths[str(i)] - 1] for i in wanted if plan.strengths[str(i)]}

    def _allocate(self, model, layers, choices, wanted, build, batches, ctx, notes, details) -> dict[int, int]:
        """As many weights removed in all as `ratio` everywhere would remove (where that pays), spread
        over the matrices where the measured error is least (`onnxopt.budget.allocate`)."""
        uniform = {i: layers[i].rank_for(self.options.ratio) for i in wanted}
        target = sum(_removed(layers[i], r) for i, r in uniform.items() if r in choices[i])
        error_of, measure = budget.output_error(model, batches)
        plan = budget.allocate(_MatrixChoices(wanted, choices, build), error_of, _sizes(layers, choices), target,
                               ctx.progress)
        chosen = {i: choices[i][plan.strengths[str(i)] - 1] for i in wanted if plan.strengths[str(i)]}
        notes.append(f"ratio {self.options.ratio} spread over {len(wanted)} matrices by measured sensitivity: "
                     f"{plan.size} weights removed (the same ratio everywhere: {target}), {len(chosen)} matrices "
                     f"factored; {measure}: {plan.error:.4g} (the matrices' errors alone add up to "
                     f"{plan.predicted:.4g}; {plan.evaluations} models measured)")
        details.update(allocation="measured", error=plan.error)
        return chosen


def _removed(layer: Layer, rank: int | None) -> int:
    """Weights that factoring `layer` at `rank` saves (None: left whole)."""
    k, n = layer.matrix.shape
    return 0 if rank is None else k * n - rank * (k + n)


def _sizes(layers: list[Layer], choices: list[list[int]]):
    """The budget's size of a unit at a strength: the weights removed at that rank."""
    return lambda unit, s: _removed(layers[int(unit)], choices[int(unit)][s - 1] if s else None)


class _MatrixChoices:
    """The matrices as the error budget's units (`onnxopt.budget.Tunable`): strength 0 leaves one
    whole, strength s factors it at its s-th rank in `choices` (weakest first)."""

    def __init__(self, wanted: list[int], choices: list[list[int]], build):
        self.wanted, self.choices, self._build = wanted, choices, build

    def units(self):
        return [str(i) for i in self.wanted]

    def strengths(self, unit):
        return (None, *self.choices[int(unit)])

    def build(self, strengths):
        return self._build({i: self.choices[i][strengths[str(i)] - 1] for i in self.wanted if strengths[str(i)]})


def _refit(model, result, layers: list[Layer], decompositions, chosen: dict[int, int], batches,
           ctx) -> dict[int, np.ndarray]:
    """Each chosen layer's second factor refit on the inputs `result` (the factored model) gives it
    (`refit.py`)."""
    keyed = {f"{i}/{j}": node for i in chosen for j, node in enumerate(layers[i].nodes)}
    grams: dict[int, list] = {}
    for key, (gram_new, cross, _) in paired_grams(model, result, keyed, batches, ctx.progress).items():
        i = int(key.split("/")[0])
        if i in grams:
            grams[i][0] += gram_new
            grams[i][1] += cross
        else:
            grams[i] = [gram_new, cross]
    return {i: second_factor(decompositions[i].factors(chosen[i])[0], layers[i].matrix, *g) for i, g in grams.items()}


def _stats(model, layers: list[Layer], batches, ctx: PassContext, gram: bool) -> dict[int, LayerInputStats]:
    """Input statistics per layer, summed over the nodes of a shared weight."""
    keyed = {f"{i}/{j}": node for i, layer in enumerate(layers) for j, node in enumerate(layer.nodes)}
    per_node = collect(model, keyed, batches, ctx.progress, gram=gram, label="low-rank statistics")
    merged: dict[int, LayerInputStats] = {}
    for key, st in per_node.items():
        i = int(key.split("/")[0])
        if i not in merged:
            merged[i] = st
            continue
        into = merged[i]
        if into.gram is not None and st.gram is not None:
            into.gram += st.gram
        into.sums += st.sums
        into.channel_sumsq += st.channel_sumsq
        into.count += st.count
    return merged


def _layer_table(layers: list[Layer], chosen: dict[int, int], timing: BreakEven | None) -> Table:
    rows = []
    for i, rank in chosen.items():
        layer = layers[i]
        k, n = layer.matrix.shape
        speed = timing.speedup(layer, rank) if timing is not None else None
        rows.append([layer.name[:60], f"{k}x{n}", rank, round(layer.break_even), rank * (k + n) / (k * n),
                     "-" if speed is None else f"{speed:.2f}x"])
    return Table("factored matrices", ["layer", "K x N", "rank", "break-even", "weights kept", "layer speed-up"],
                 rows, formats=["", "", "", "", ".2f", ""])
