"""The error budget: apply a lossy technique only as far as an accuracy budget allows, unit by unit.

A pass offers its choices as a `Tunable`: named units (a layer it can quantize, prune or factor),
each with strengths from 0 (left alone) up to its strongest (int8; 50 % pruned; the lowest rank),
and a way to build the model for any assignment of strengths. `fit(tunable, error_of, max_error)`
starts with every unit at its strongest. While the error is over budget it steps one unit down one
strength at a time, the unit whose step removes the most error first: each unit's gain is measured
alone, from the all-strongest model (a layer may seem harmless alone and not in company, so the
error of the whole assignment is measured again after every step). With every unit left alone the
error is 0, so the budget always holds in the end.

`allocate(tunable, error_of, size, target)` answers another question: not "as far as the budget
allows" but "this much in all, where it hurts least" (a pruning ratio spread over the layers by
their measured sensitivity instead of the same ratio everywhere). `largest(tunable, error_of, size,
max_error)` turns it round: the most removed in all whose error holds, from the same measurements,
checked on other samples than the ones it chose on (`choice_and_check`), which the pass leaves out of
what it fits (`without_check`: a refit or a whitening fit on the check's samples flatters them too).
`prune` and `lowrank` use it for `max_error` (they remove amounts: channels, weights); `quant:auto`
and `lowrank:compensate` use `fit`. `to_speedup(tunable, error_of, saved, total, speedup_of, goal)`
asks for a speed instead: the least error whose model is measured `goal` times as fast (`prune`'s
`min_speedup`), the amount found by timing a few candidates.

Errors are measured against a reference model, usually the pass's input (`output_error`: 1 - cosine
of the outputs on a few batches of representative data; `score_drop`: how far the user's own score
of a model falls below the reference's).
"""
from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import onnx

from .errors import OnnxoptError
from .imports import import_object
from .progress import Progress
from .runtime import make_session
from .validation import compare_outputs, run

EVAL_SAMPLES = 16

ErrorOf = Callable[[onnx.ModelProto], float]


class Tunable(Protocol):
    """What a lossy pass offers the budget."""

    def units(self) -> Sequence[str]:
        """The names of the units, in a fixed order."""

    def strengths(self, unit: str) -> Sequence[Any]:
        """The unit's strengths, weakest first: index 0 leaves it alone, the last is the strongest."""

    def build(self, strengths: Mapping[str, int]) -> onnx.ModelProto:
        """The model with each unit at the strength of that index."""


@dataclasses.dataclass
class Fit:
    strengths: dict[str, int]  # unit -> index into its strengths
    error_before: float  # every unit at its strongest
    error_after: float
    max_error: float
    gains: dict[str, float]  # error removed by each unit's first step down, measured alone
    evaluations: int  # models built and measured

    def stepped_down(self, tunable: Tunable) -> list[str]:
        """Units left below their strongest."""
        return [u for u in tunable.units() if self.strengths[u] < len(tunable.strengths(u)) - 1]

    def most_sensitive(self, limit: int = 10) -> list[tuple[str, float]]:
        return sorted(self.gains.items(), key=lambda item: item[1], reverse=True)[:limit]


def fit(tunable: Tunable, error_of: ErrorOf, max_error: float, progress: Progress | None = None) -> Fit:
    """Strengths that keep `error_of` within `max_error` (see the module docstring)."""
    progress = progress or Progress(False)
    units = list(tunable.units())
    top = {u: len(tunable.strengths(u)) - 1 for u in units}
    measured: dict[tuple, float] = {}  # an assignment is built and measured once

    def error_at(strengths: Mapping[str, int]) -> float:
        key = tuple(strengths[u] for u in units)
        if key not in measured:
            measured[key] = error_of(tunable.build(strengths))
        return measured[key]

    current = dict(top)
    error = error_before = error_at(current)
    if error <= max_error:
        return Fit(current, error_before, error, max_error, {}, len(measured))

    def gain_of_step(unit: str, level: int) -> float:
        """Error removed when `unit` alone goes from `level` to `level - 1`, all others strongest."""
        above = error_before if level == top[unit] else error_at({**top, unit: level})
        return above - error_at({**top, unit: level - 1})

    gains = {u: gain_of_step(u, top[u]) for u in progress(units, "sensitivity", "unit") if top[u] > 0}
    # most harmful first; ties keep the units' order
    queue = [(-gain, units.index(u), u) for u, gain in gains.items()]
    heapq.heapify(queue)
    while error > max_error and queue:
        _, order, unit = heapq.heappop(queue)
        current[unit] -= 1
        error = error_at(current)
        if current[unit] > 0 and error > max_error:
            heapq.heappush(queue, (-gain_of_step(unit, current[unit]), order, unit))
    return Fit(current, error_before, error, max_error, gains, len(measured))


@dataclasses.dataclass
class Allocation:
    strengths: dict[str, int]  # unit -> index into its strengths
    size: int  # what the assignment removes in all (at least the target)
    predicted: float  # the units' errors measured alone, summed
    error: float  # the assignment's error, measured
    evaluations: int  # models built and measured


def allocate(tunable: Tunable, error_of: ErrorOf, size: Callable[[str, int], int], target: int,
             progress: Progress | None = None) -> Allocation:
    """The strengths that remove at least `target` in all (`size(unit, strength index)`: channels,
    weights) at the least error. Each unit's error is measured alone at each of its strengths (the
    others left alone) and the errors are taken to add up, which holds while they are small; the
    cheapest combination is then exact, by dynamic programming over the amount removed (amounts
    beyond the target count as the target). The chosen assignment's error is measured once."""
    units = list(tunable.units())
    alone = _errors_alone(tunable, error_of, units, progress)
    frontier = _frontier(units, alone, size, cap=target)
    if frontier[-1][1] < target:
        raise ValueError(f"the units cannot remove {target} in all (at most {frontier[-1][1]})")
    predicted, _, choice = frontier[-1]
    strengths = dict(zip(units, choice))
    amount = sum(size(u, s) for u, s in strengths.items())
    return Allocation(strengths, amount, predicted, error_of(tunable.build(strengths)),
                      sum(len(e) - 1 for e in alone.values()) + 1)


def largest(tunable: Tunable, error_of: ErrorOf, size: Callable[[str, int], int], max_error: float,
            progress: Progress | None = None, check: ErrorOf | None = None) -> Allocation:
    """The strengths that remove the most in all (`size` as for `allocate`) with the error within
    `max_error`: each unit's error measured alone at each strength, the errors taken to add up, the
    largest combination whose summed error fits is exact by dynamic programming (a knapsack), and it
    is then measured by `check` (default `error_of`; other samples than the ones the choice was
    made on, since a choice made on a few samples flatters them). Where the measured error is over
    the budget, the summed budget is lowered by the ratio they were off and the next largest is
    measured, until one holds; all units left alone always does."""
    check = check or error_of
    units = list(tunable.units())
    alone = _errors_alone(tunable, error_of, units, progress)
    frontier = _frontier(units, alone, size, cap=None)
    evaluations = sum(len(e) - 1 for e in alone.values())
    allowed = max_error
    while True:
        fitting = [state for state in frontier if state[0] <= allowed]
        predicted, amount, choice = fitting[-1] if fitting else (0.0, 0, (0,) * len(units))
        strengths = dict(zip(units, choice))
        error = check(tunable.build(strengths))
        evaluations += 1
        if error <= max_error or not fitting or amount == 0:
            return Allocation(strengths, amount, predicted, error, evaluations)
        allowed = min(predicted * max_error / error, predicted - 1e-12)  # always below the one just measured


@dataclasses.dataclass
class SpeedPlan:
    strengths: dict[str, int]  # unit -> index into its strengths
    saved: int  # what the assignment saves of the cost in all (multiply-adds)
    speedup: float  # measured
    met: bool  # the speed-up reached the goal
    error: float  # the assignment's error, measured by the check
    timed: list[tuple[int, float]]  # (saved, measured speed-up) of each assignment timed, in order
    evaluations: int  # models built and measured for their error


def to_speedup(tunable: Tunable, error_of: ErrorOf, saved: Callable[[str, int], int], total: int,
               speedup_of: Callable[[onnx.ModelProto], float], goal: float, progress: Progress | None = None,
               check: ErrorOf | None = None, tries: int = 4) -> SpeedPlan:
    """The strengths with the least error whose model is measured `goal` times as fast as the
    reference (`speedup_of`). `saved(unit, strength index)` estimates what a strength saves of a cost
    (multiply-adds) that comes to `total` in the reference. Each unit's error is measured alone at
    each strength and the errors are taken to add up, as for `allocate`: the least-error combination
    saving a given amount is then exact. Time is not proportional to the cost (fixed overheads,
    kernels that run narrow matrices less well), so the amount is found by timing, at most `tries`
    models. The first target takes time to be all cost (saving 1 - 1/goal of it). Then time is taken
    to be linear in the amount saved between the two measurements that bracket the goal (the
    reference itself, saving nothing at 1x, is one), or, while none is fast enough, along the line
    through the reference and the largest amount timed; the target moves to where that line meets
    the goal. Where even the strongest combination falls short, the fastest one measured is
    returned, with `met` false."""
    check = check or error_of
    units = list(tunable.units())
    alone = _errors_alone(tunable, error_of, units, progress)
    frontier = _frontier(units, alone, saved, cap=None)  # by amount ascending, error ascending with it
    most = frontier[-1][1]
    target = total * (1 - 1 / goal)
    timed: list[tuple[float, int, float, tuple[int, ...]]] = []  # (speed-up, amount, summed error, choice)
    for _ in range(tries):
        predicted, amount, choice = next((state for state in frontier if state[1] >= target), frontier[-1])
        if any(amount == t[1] for t in timed):
            break  # nothing between what was timed
        timed.append((speedup_of(tunable.build(dict(zip(units, choice)))), amount, predicted, choice))
        short = max([(1.0, 0, 0.0, ())] + [t for t in timed if t[0] < goal], key=lambda t: t[1])
        fast = min((t for t in timed if t[0] >= goal), key=lambda t: t[1], default=None)
        if fast is not None and fast[1] < short[1]:
            break  # a smaller saving measured fast enough and a larger one not: noise; the smaller holds
        if fast is not None:  # bracketed: where the line between the two meets the goal
            gained = 1 / short[0] - 1 / fast[0]
            if gained <= 0:
                break  # the faster one saves less: noise, or a kernel's cliff; no line to follow
            target = short[1] + (fast[1] - short[1]) * (1 / short[0] - 1 / goal) / gained
            if not any(short[1] < state[1] < fast[1] and state[1] >= target for state in frontier):
                break
        elif short[1] >= most:
            break  # the strongest is not fast enough
        elif short[0] <= 1.0:
            target = most  # saving this much bought nothing measurable: only the most can tell
        else:
            target = max(short[1] * (1 - 1 / goal) / (1 - 1 / short[0]), short[1] + 1)
    met = [t for t in timed if t[0] >= goal]
    speedup, amount, _, choice = (min(met, key=lambda t: (t[2], t[1])) if met else max(timed, key=lambda t: t[0]))
    strengths = dict(zip(units, choice))
    return SpeedPlan(strengths, amount, speedup, bool(met), check(tunable.build(strengths)),
                     [(a, s) for s, a, _, _ in timed], sum(len(e) - 1 for e in alone.values()) + 1)


def _errors_alone(tunable: Tunable, error_of: ErrorOf, units: list[str],
                  progress: Progress | None) -> dict[str, list[float]]:
    """Each unit's error at each of its strengths, the others left alone (0 at strength 0)."""
    progress = progress or Progress(False)
    return {u: [0.0] + [error_of(tunable.build({v: (s if v == u else 0) for v in units}))
                        for s in range(1, len(tunable.strengths(u)))]
            for u in progress(units, "sensitivity", "unit")}


def _frontier(units: list[str], alone: dict[str, list[float]], size: Callable[[str, int], int],
              cap: int | None) -> list[tuple[float, int, tuple[int, ...]]]:
    """The combinations of strengths not beaten on both counts (an amount at least as large at an
    error at most as large), as (summed error, amount, strength per unit), by amount ascending; with
    `cap`, amounts beyond it count as `cap`. Dynamic programming unit by unit: a combination beaten
    so far is beaten whatever the remaining units add, so only the frontier is carried."""
    states = [(0.0, 0, ())]
    for unit in units:
        removed = [size(unit, s) for s in range(len(alone[unit]))]
        grown = [(error + unit_error, amount + removed[s], choice + (s,))
                 for error, amount, choice in states for s, unit_error in enumerate(alone[unit])]
        if cap is not None:
            grown = [(e, min(a, cap), c) for e, a, c in grown]
        states = []
        for state in sorted(grown, key=lambda st: (-st[1], st[0])):  # largest amount first, least error first
            if not states or state[0] < states[-1][0]:
                states.append(state)
        states.reverse()
    return states


def _spread_batches(data, offset: float = 0.5) -> list[dict]:
    """About EVAL_SAMPLES samples in batches spread over the data (`offset` places them within each
    stretch: another offset gives other batches): when padding is cut, samples are batched by length
    and the first batches alone would be the shortest sentences."""
    chosen = _spread_indices(data, offset)
    if chosen is not None:
        return [batch for index, batch in enumerate(data) if index in chosen]
    feeds, seen = [], 0
    for batch in data:
        feeds.append(batch)
        seen += 1 if getattr(data, "per_entry", False) else len(next(iter(batch.values())))
        if seen >= EVAL_SAMPLES:
            break
    return feeds


def _spread_indices(data, offset: float) -> set[int] | None:
    """The indices of `_spread_batches`'s batches, where the data says how many it has."""
    count, size = getattr(data, "num_batches", None), getattr(data, "batch_size", None)
    if not (count and size):
        return None
    wanted = min(count, -(-EVAL_SAMPLES // size))
    return {int((i + offset) * count / wanted) for i in range(wanted)}


CHECK_OFFSET = 0.0  # where `largest`'s check samples lie (the choice is made on those at 0.5)


def without_check(data):
    """`data` less the batches `choice_and_check`'s check measures on: what a pass fits its
    statistics on (a refit, a whitening), so that the budget's check sees samples it did not."""
    skip = _spread_indices(data, CHECK_OFFSET)
    if skip is None or data.num_batches < 4:
        return data  # too few batches to spare some (or unknown): the check shares the fit's samples
    return _Without(data, skip)


class _Without:
    """A batch stream with some batches (by index) left out; anything else is the stream's."""

    def __init__(self, data, skip: set[int]):
        self._data, self._skip = data, skip

    def __iter__(self):
        return (batch for index, batch in enumerate(self._data) if index not in self._skip)

    @property
    def num_batches(self) -> int:
        return self._data.num_batches - len(self._skip)

    def __getattr__(self, name):
        return getattr(self._data, name)


def output_error(reference: onnx.ModelProto, data, offset: float = 0.5) -> tuple[ErrorOf, str]:
    """1 - cosine of a model's outputs to the reference's on ~EVAL_SAMPLES samples of `data` (the
    worst output and batch count), and a description for reports. Another `offset` measures on other
    batches (where the data has enough): a check of a choice made on the first."""
    return _output_error(make_session(reference), data, offset)


def _output_error(session, data, offset: float) -> tuple[ErrorOf, str]:
    """`output_error` with the reference model's session given (the session is not kept)."""
    feeds = _spread_batches(data, offset)
    reference_outputs = [run(session, f) for f in feeds]

    def error(model: onnx.ModelProto) -> float:
        candidate = make_session(model)
        return max(1.0 - compare_outputs(ref, run(candidate, f)).cosine for ref, f in zip(reference_outputs, feeds))

    samples = len(feeds) if getattr(data, "per_entry", False) else sum(len(next(iter(f.values()))) for f in feeds)
    return error, f"1 - cosine of the outputs on {samples} samples of representative data"


def choice_and_check(reference: onnx.ModelProto, data) -> tuple[ErrorOf, ErrorOf, str]:
    """`output_error` twice, on different batches: one to choose by, one for `largest` to check the
    choice with (the batches `without_check` leaves out), and the description for reports."""
    session = make_session(reference)  # one session of the reference for both
    error_of, measure = _output_error(session, data, 0.5)
    check, _ = _output_error(session, data, CHECK_OFFSET)
    return error_of, check, measure


def load_score(spec: str, purpose: str) -> Callable:
    """The user's scoring function (`module:function`), imported before any work so that a wrong
    name fails at once."""
    return import_object(spec, purpose, "name a function that takes an onnxruntime.InferenceSession "
                                        "and returns a score (higher is better)")


def score_drop(reference: onnx.ModelProto, score: Callable, spec: str,
               labels: tuple[str, str] = ("reference", "candidate")) -> tuple[ErrorOf, str]:
    """How far `score` (a function of an InferenceSession on the CPU, higher is better; `spec`
    names it) falls below its value for the reference model. `labels` name the reference and the
    candidates in messages ("float", "quantized")."""

    def scored(model: onnx.ModelProto, which: str) -> float:
        session = make_session(model)
        try:
            value = float(score(session))
        except Exception as exc:
            raise OnnxoptError(f"eval function {spec} failed on the {which} model: {type(exc).__name__}: {exc}",
                               "it must take an onnxruntime.InferenceSession and return a number") from exc
        if not math.isfinite(value):
            raise OnnxoptError(f"eval function {spec} returned {value} for the {which} model",
                               "return a finite score, higher is better")
        return value

    baseline = scored(reference, labels[0])
    return (lambda model: max(0.0, baseline - scored(model, labels[1])),
            f"drop of {spec} below the {labels[0]} model's {baseline:.6g}")
