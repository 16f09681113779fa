"""Comparing and timing two models under ONNX Runtime.

Latency is measured alternately (A, B, A, B...) in one process so that both see the same machine
state; medians and p90 are reported (the speed guard, `guard.py`, decides on the best run). Agreement is max abs
error and cosine over each output, plus top-1 agreement for outputs shaped like classifier scores
[batch, classes].
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

# what session.run raises for a feed or state it cannot run (a wrong shape, memory it cannot get)
ORT_ERRORS = (_ort_state.Fail, _ort_state.InvalidArgument, _ort_state.RuntimeException)


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
    """The session's outputs on `feeds`; ORT's refusal (a shape it cannot take, memory it cannot get)
    becomes one line naming the inputs given and the shapes the model declares."""
    inputs = session.get_inputs()
    wanted = {i.name for i in inputs}
    try:
        return session.run(None, {k: v for k, v in feeds.items() if k in wanted})
    except RuntimeError as exc:  # ORT's Python API has no numpy type for bfloat16, float8, int4...
        from .errors import OnnxoptError

        raise OnnxoptError(f"ONNX Runtime's Python API cannot pass this model's tensors ({exc})",
                           "bfloat16, float8 and int4 inputs or outputs cannot be compared from Python: "
                           "pass --no-compare (and --verify structure)") from exc
    except ORT_ERRORS as exc:
        from .errors import OnnxoptError
        from .runtime import ort_message

        given = ", ".join(f"{i.name} {list(np.shape(feeds[i.name]))} (model: {i.shape})" for i in inputs if i.name in feeds)
        raise OnnxoptError(f"ONNX Runtime could not run the model on these inputs: {ort_message(exc)[:300]}",
                           f"inputs given: {given}") from exc


def tensors_of(outputs: list) -> list[np.ndarray]:
    """The outputs as a flat list of arrays: a sequence output (a list) gives its length and its
    elements, an empty optional (None) a marker."""
    flat = []
    for value in outputs:
        if value is None:
            flat.append(np.array("<none>"))
        elif isinstance(value, (list, tuple)):
            flat.append(np.array(len(value)))  # the length is part of the value
            flat.extend(np.asarray(v) for v in value)
        else:
            flat.append(np.asarray(value))
    return flat


def compare_outputs(reference: list, candidate: list) -> Agreement:
    """Worst agreement over all outputs (sequence outputs element by element)."""
    reference, candidate = tensors_of(reference), tensors_of(candidate)
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
        agree = (np.isnan(a) & np.isnan(b)) | (np.isinf(a) & (a == b))  # the same NaN or infinity
        a, b = a[~agree], b[~agree]
        if a.size:
            worst.max_abs_error = max(worst.max_abs_error, float(np.max(np.abs(a - b))))
            norm = np.linalg.norm(a) * np.linalg.norm(b)
            cosine = float(a @ b / norm) if norm > 0 else float(np.array_equal(a, b))
            worst.cosine = min(worst.cosine, cosine)
        if ref.ndim == 2 and ref.shape[1] > 1 and np.issubdtype(ref.dtype, np.floating):
            top1 = float(np.mean(ref.argmax(1) == out.argmax(1)))
            worst.top1 = top1 if worst.top1 is None else min(worst.top1, top1)
    return worst


def reference_scale(outputs: list) -> float:
    return max((float(np.max(np.abs(o))) for o in tensors_of(outputs)
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
