"""The speed guard: a lossy pass keeps its output only where it is faster than its input.

`SpeedGuard.check(before, after, feeds)` times the two models alternately on the run's execution
provider at batch 1 and 8 (sliced from `feeds`) with 1 and 2 intra-op threads, and returns a
`Verdict`: `slower` names every configuration where the pass's output lost, and `table()` is the
report section. A pass calls it after rewriting and returns its input unchanged when the verdict is
a loss, saying so in a note; quantization does (`keep_if_slower`), and pruning and low-rank
factorization will. Timing decides on each model's fastest run (other processes only ever add
time), settles a clear win in 3 rounds, and times a loss in full, and again on fresh sessions, before
it counts: a loss throws the pass's work away, one hiccup of a busy machine in 3 short rounds once
read a pruned MiniLM at 0.76x that reads 1.34x, and one ORT session can run a small model 15 %
slower than another session of the same model for as long as it lives.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import onnx

from .model_io import save_model
from .runtime import make_session
from .table import Table
from .validation import Latency, measure_latency

Feeds = dict[str, np.ndarray]


@dataclasses.dataclass
class SpeedCheck:
    threads: int
    batch: int | None  # None: the feed as given
    reference_ms: float
    candidate_ms: float

    @property
    def speedup(self) -> float:
        return self.reference_ms / self.candidate_ms if self.candidate_ms else float("inf")


def speed_check(reference, candidate, feeds: dict[str, np.ndarray], batches=(1, 8), threads=(1, 2),
                ep: str = "cpu", min_seconds: float = 0.3, clear_win: float | None = None,
                decisive: float | None = None) -> list[SpeedCheck]:
    """Times two models alternately for each thread count and batch size (sliced from `feeds` along
    axis 0; with `batches=None`, or a scalar among the feeds, `feeds` as they are).

    With `clear_win`, larger batches are not timed at a thread count where the smallest batch is at
    least that much faster: a GEMM-bound model's gain grows with the batch. With `decisive`, a
    configuration is first timed over 3 rounds and measured further only when neither model is
    that many times faster than the other.
    Each thread count opens one session per model (two alive at a time, so a large model's memory
    stays bounded), from files written once: no serialized copy of either model stays in memory.
    """
    if batches is None or any(np.ndim(v) == 0 for v in feeds.values()):
        sizes = [None]  # the feed as given: its batch is not on axis 0 (or it has none)
    else:
        available = min(len(v) for v in feeds.values()) if feeds else 1
        sizes = sorted({min(b, available) for b in batches})
    checks = []
    with tempfile.TemporaryDirectory(prefix="onnxopt_speed_") as tmp:
        paths = [m if isinstance(m, (str, Path)) else save_model(m, Path(tmp) / f"{label}.onnx")
                 for label, m in (("reference", reference), ("candidate", candidate))]
        for n_threads in threads:
            def opened(n_threads=n_threads) -> dict:
                return {"reference": make_session(paths[0], ep, threads=n_threads),
                        "candidate": make_session(paths[1], ep, threads=n_threads)}
            sessions = opened()
            for batch in sizes:
                sliced = feeds if batch is None else {k: v[:batch] for k, v in feeds.items()}
                check = _time_pair(sessions, sliced, n_threads, batch, min_seconds, decisive, opened)
                checks.append(check)
                if clear_win and check.speedup >= clear_win:
                    break
            del sessions
    return checks


def _time_pair(sessions, feeds, threads: int, batch: int, min_seconds: float, decisive: float | None,
               reopen=None) -> SpeedCheck:
    """Best-of-runs times of both sessions: other processes on the machine only ever add time, so
    the fastest run is the steadiest estimate of what each model costs (as `timeit` advises). With
    `decisive`, a candidate that many times faster after 3 quick rounds is settled; anything else is
    timed in full, and a loss once more before it counts, since it makes the caller give up a model:
    on fresh sessions from `reopen` (which replace `sessions`, so that two stay alive), since one
    ORT session can run a sub-millisecond model persistently 15 % slower than another of the same
    model, and each model's best over both sessions counts."""
    def best(*latencies: dict[str, Latency]) -> SpeedCheck:
        return SpeedCheck(threads, batch, *(min(t[label].best_ms for t in latencies)
                                            for label in ("reference", "candidate")))

    rounds = []
    if decisive:
        rounds.append(measure_latency(sessions, feeds, runs=3, warmup=1, min_seconds=0))
        if best(*rounds).speedup >= decisive:
            return best(*rounds)
    rounds.append(measure_latency(sessions, feeds, runs=5, warmup=0 if decisive else 1, min_seconds=min_seconds))
    if best(*rounds).speedup < 1.0:
        if reopen is not None:
            sessions.clear()
            sessions.update(reopen())
        rounds.append(measure_latency(sessions, feeds, runs=5, warmup=0 if reopen is None else 1,
                                      min_seconds=min_seconds))
    return best(*rounds)


@dataclasses.dataclass
class Verdict:
    checks: list[SpeedCheck]
    # a check is lost below this speed-up: 1.0 for a pass meant to speed the model up; lower for one
    # that changes only numerics, whose output runs as fast and would lose half its checks to noise
    tolerance: float = 1.0

    @property
    def slower(self) -> str:
        """Where the pass's output lost ("" when nowhere): "0.93x at batch 8, 2 thread(s), ..."."""
        return ", ".join(f"{c.speedup:.2f}x at {'the given feed' if c.batch is None else f'batch {c.batch}'}, "
                         f"{c.threads} thread(s)" for c in self.checks if c.speedup < self.tolerance)

    def records(self) -> list[dict]:
        return [dict(dataclasses.asdict(c), speedup=c.speedup) for c in self.checks]

    def table(self, title: str) -> Table:
        return Table(title, ["threads", "batch", "input ms", "output ms", "speed-up"],
                     [[c.threads, c.batch, c.reference_ms, c.candidate_ms, c.speedup] for c in self.checks],
                     formats=["", "", ".3f", ".3f", ".2f"])


class SpeedGuard:
    """Times a pass's output against its input on `ep` (see the module docstring)."""

    def __init__(self, ep: str = "cpu"):
        self.ep = ep

    def check(self, before: onnx.ModelProto, after: onnx.ModelProto, feeds: Feeds, *, batches=(1, 8),
              threads=(1, 2), min_seconds: float = 0.2, clear_win: float | None = 1.15,
              decisive: float | None = 1.2, tolerance: float = 1.0) -> Verdict:
        checks = speed_check(before, after, feeds, batches, threads, self.ep, min_seconds, clear_win, decisive)
        return Verdict(checks, tolerance)

    def check_on_data(self, before: onnx.ModelProto, after: onnx.ModelProto, data=None,
                      sample_inputs=None) -> Verdict | None:
        """`check` on the first batch of representative `data` (that feed as it is when the data holds
        one feed per entry), else on the first sample input; None when there is neither."""
        if data is not None:
            return self.check(before, after, data.first_batch(), batches=None if data.per_entry else (1, 8))
        if sample_inputs:
            return self.check(before, after, sample_inputs[0])
        return None
