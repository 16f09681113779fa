"""Comparing and timing two models under ONNX Runtime.

Latency is measured alternately (A, B, A, B...) in one process so that both see the same machine
state; medians and p90 are reported, and speed checks decide on the best run. Agreement is max abs
error and cosine over each output, plus top-1 agreement for outputs shaped like classifier scores
[batch, classes].
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import onnxruntime as ort


@dataclasses.dataclass
class Latency:
    median_ms: float
    p90_ms: float
    runs: int
    best_ms: float


@dataclasses.dataclass
class Agreement:
    max_abs_error: float
    cosine: float
    top1: float | None = None

    def within(self, rtol: float, atol: float, ref_scale: float) -> bool:
        return self.max_abs_error <= atol + rtol * ref_scale


def run(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    wanted = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in wanted})


def compare_outputs(reference: list[np.ndarray], candidate: list[np.ndarray]) -> Agreement:
    """Worst agreement over all outputs."""
    if len(reference) != len(candidate):
        return Agreement(float("inf"), 0.0)
    worst = Agreement(0.0, 1.0)
    for ref, out in zip(reference, candidate):
        ref = np.asarray(ref)
        out = np.asarray(out)
        if ref.shape != out.shape:
            return Agreement(float("inf"), 0.0)
        if not np.issubdtype(ref.dtype, np.number) and ref.dtype != np.bool_:
            same = bool(np.array_equal(ref, out))
            worst.max_abs_error = max(worst.max_abs_error, 0.0 if same else float("inf"))
            continue
        a = ref.astype(np.float64).ravel()
        b = out.astype(np.float64).ravel()
        both_nan = np.isnan(a) & np.isnan(b)
        a, b = a[~both_nan], b[~both_nan]
        if a.size:
            worst.max_abs_error = max(worst.max_abs_error, float(np.max(np.abs(a - b))))
            norm = np.linalg.norm(a) * np.linalg.norm(b)
            cosine = float(a @ b / norm) if norm > 0 else float(np.array_equal(a, b))
            worst.cosine = min(worst.cosine, cosine)
        if ref.ndim == 2 and ref.shape[1] > 1 and np.issubdtype(ref.dtype, np.floating):
            top1 = float(np.mean(ref.argmax(1) == out.argmax(1)))
            worst.top1 = top1 if worst.top1 is None else min(worst.top1, top1)
    return worst


def reference_scale(outputs: list[np.ndarray]) -> float:
    return max((float(np.max(np.abs(o))) for o in outputs
                if np.issubdtype(np.asarray(o).dtype, np.number) and np.asarray(o).size), default=0.0)


def measure_latency(sessions: dict[str, ort.InferenceSession], feeds: dict[str, np.ndarray],
                    runs: int = 50, warmup: int = 3, min_seconds: float = 1.0) -> dict[str, Latency]:
    """Alternating timings of each session on the same feeds.

    At least `runs` rounds, and more (up to 20x) until `min_seconds` have passed: a sub-millisecond
    model needs thousands of runs before its median stops moving.
    """
    for session in sessions.values():
        for _ in range(warmup):
            run(session, feeds)
    samples: dict[str, list[float]] = {label: [] for label in sessions}
    started = time.perf_counter()
    rounds = 0
    while rounds < runs or (time.perf_counter() - started < min_seconds and rounds < 20 * runs):
        for label, session in sessions.items():
            start = time.perf_counter()
            run(session, feeds)
            samples[label].append((time.perf_counter() - start) * 1e3)
        rounds += 1
    return {
        label: Latency(float(np.median(times)), float(np.percentile(times, 90)), len(times), float(np.min(times)))
        for label, times in samples.items()
    }


@dataclasses.dataclass
class SpeedCheck:
    threads: int
    batch: int
    reference_ms: float
    candidate_ms: float

    @property
    def speedup(self) -> float:
        return self.reference_ms / self.candidate_ms if self.candidate_ms else float("inf")


def speed_check(reference, candidate, feeds: dict[str, np.ndarray], batches=(1, 8), threads=(1, 2),
                ep: str = "cpu", min_seconds: float = 0.3, clear_win: float | None = None,
                decisive: float | None = None) -> list[SpeedCheck]:
    """Times two models alternately for each thread count and batch size (sliced from `feeds`).

    With `clear_win`, larger batches are not timed at a thread count where the smallest batch is at
    least that much faster: a GEMM-bound model's gain grows with the batch. With `decisive`, a
    configuration is first timed over 3 rounds and measured further only when neither model is
    that many times faster than the other.
    Each thread count opens one session per model (two alive at a time, so a large model's memory
    stays bounded), from files written once: no serialized copy of either model stays in memory.
    """
    import tempfile
    from pathlib import Path

    from .model_io import save_model
    from .runtime import make_session

    available = min(len(v) for v in feeds.values()) if feeds else 1
    sizes = sorted({min(b, available) for b in batches})
    checks = []
    with tempfile.TemporaryDirectory(prefix="onnxopt_speed_") as tmp:
        paths = [m if isinstance(m, (str, Path)) else save_model(m, Path(tmp) / f"{label}.onnx")
                 for label, m in (("reference", reference), ("candidate", candidate))]
        for n_threads in threads:
            sessions = {"reference": make_session(paths[0], ep, threads=n_threads),
                        "candidate": make_session(paths[1], ep, threads=n_threads)}
            for batch in sizes:
                sliced = {k: v[:batch] for k, v in feeds.items()}
                check = _time_pair(sessions, sliced, n_threads, batch, min_seconds, decisive)
                checks.append(check)
                if clear_win and check.speedup >= clear_win:
                    break
            del sessions
    return checks


def _time_pair(sessions, feeds, threads: int, batch: int, min_seconds: float, decisive: float | None) -> SpeedCheck:
    """Best-of-runs times of both sessions: other processes on the machine only ever add time, so
    the fastest run is the steadiest estimate of what each model costs (as `timeit` advises). A loss
    that is not decisive is timed once more before it counts, since it can make the caller give up
    a model."""
    def best(*latencies: dict[str, Latency]) -> SpeedCheck:
        return SpeedCheck(threads, batch, *(min(t[label].best_ms for t in latencies)
                                            for label in ("reference", "candidate")))

    if decisive:
        check = best(measure_latency(sessions, feeds, runs=3, warmup=1, min_seconds=0))
        if max(check.speedup, 1 / check.speedup) >= decisive:
            return check
    first = measure_latency(sessions, feeds, runs=5, warmup=0 if decisive else 1, min_seconds=min_seconds)
    check = best(first)
    if check.speedup < 1.0:
        check = best(first, measure_latency(sessions, feeds, runs=5, warmup=0, min_seconds=min_seconds))
    return check
