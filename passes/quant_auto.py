"""Mixed precision for `quant:auto=true`: keep the layers that hurt accuracy most in float.

The error of a candidate model is either 1 - cosine between its outputs and the float model's on a
few calibration samples (the worst output counts), or, with `eval=module:function`, how far the
user's score of the candidate falls below the float model's. Each quantized Conv/MatMul/Gemm is
scored by how much the error drops when that one layer alone stays float; layers are then kept float
greedily, most harmful first, re-measuring after each, until the error is within `max_error` (with
every layer float it is 0, so the budget always holds in the end).
"""
from __future__ import annotations

import math
import sys
from typing import Callable

import onnx
from tqdm import tqdm

from onnxopt.errors import OnnxoptError
from onnxopt.runtime import make_session
from onnxopt.validation import compare_outputs, run

EVAL_SAMPLES = 16

ErrorOf = Callable[[onnx.ModelProto], float]


def _eval_feeds(data) -> list[dict]:
    """About EVAL_SAMPLES samples in batches spread over the data: when padding is cut, samples are
    batched by length and the first batches alone would be the shortest sentences."""
    count, size = getattr(data, "num_batches", None), getattr(data, "batch_size", None)
    if count and size:
        wanted = min(count, -(-EVAL_SAMPLES // size))
        chosen = {int((i + 0.5) * count / wanted) for i in range(wanted)}
        return [batch for index, batch in enumerate(data) if index in chosen]
    feeds, seen = [], 0
    for batch in data:
        feeds.append(batch)
        seen += len(next(iter(batch.values())))
        if seen >= EVAL_SAMPLES:
            break
    return feeds


def output_error(float_model: onnx.ModelProto, data) -> tuple[ErrorOf, str]:
    """The built-in error: 1 - cosine to the float model's outputs on calibration samples."""
    feeds = _eval_feeds(data)
    reference = make_session(float_model)
    float_outputs = [run(reference, f) for f in feeds]
    del reference

    def error(model: onnx.ModelProto) -> float:
        session = make_session(model)
        return max(1.0 - compare_outputs(ref, run(session, f)).cosine for ref, f in zip(float_outputs, feeds))

    samples = sum(len(next(iter(f.values()))) for f in feeds)
    return error, f"1 - cosine of the outputs on {samples} calibration samples"


def load_score(spec: str) -> Callable:
    """The user's scoring function, imported before any work so that a wrong name fails at once."""
    from onnxopt.imports import import_object

    return import_object(spec, "quant:auto's eval",
                         "name a function that takes an onnxruntime.InferenceSession and returns a score (higher is better)")


def score_drop(float_model: onnx.ModelProto, score: Callable, spec: str) -> tuple[ErrorOf, str]:
    """The user's error: how far `score` (a function of an InferenceSession on the CPU, higher is
    better; `spec` names it) falls below its value for the float model."""

    def scored(model: onnx.ModelProto, which: str) -> float:
        session = make_session(model)
        try:
            value = score(session)
            value = float(value)
        except Exception as exc:
            raise OnnxoptError(f"eval function {spec} failed on the {which} model: {type(exc).__name__}: {exc}",
                               "it must take an onnxruntime.InferenceSession and return a number") from exc
        if not math.isfinite(value):
            raise OnnxoptError(f"eval function {spec} returned {value} for the {which} model",
                               "return a finite score, higher is better")
        return value

    baseline = scored(float_model, "float")
    return (lambda model: max(0.0, baseline - scored(model, "quantized")),
            f"drop of {spec} below the float model's {baseline:.6g}")


def keep_sensitive_float(quantize: Callable, full, error_of: ErrorOf, max_error: float,
                         progress: bool = True) -> tuple[frozenset[str], dict]:
    """(compute-node outputs to keep float, a summary for the report)."""
    error = error_of(full.model)
    summary = {"error_before": error, "error_after": error, "kept_float": [], "max_error": max_error}
    if error <= max_error:
        return frozenset(), summary
    gains = {}
    for name in tqdm(full.compute_outputs, desc="sensitivity", unit="layer", leave=False,
                     disable=not progress or not sys.stderr.isatty()):
        gains[name] = error - error_of(quantize(frozenset({name})).model)
    kept: set[str] = set()
    for name in sorted(gains, key=gains.get, reverse=True):  # alone a layer may seem harmless, not in company
        if error <= max_error:
            break
        kept.add(name)
        error = error_of(quantize(frozenset(kept)).model)
    summary.update(error_after=error, kept_float=sorted(kept),
                   most_sensitive=[{"layer": n, "error_drop": gains[n]} for n in sorted(gains, key=gains.get, reverse=True)[:10]])
    return frozenset(kept), summary


