"""Mixed precision for `quant:auto=true`: keep the layers that hurt the outputs most in float.

The error of a candidate model is 1 - cosine between its outputs and the float model's, on a few
calibration samples (the worst output counts). Each quantized Conv/MatMul/Gemm is scored by how much
the error drops when that one layer alone stays float; layers are then kept float greedily, most
harmful first, re-measuring after each, until the error is within `max_error` (with every layer
float it is 0, so the budget always holds in the end).
"""
from __future__ import annotations

import sys
from typing import Callable

import numpy as np
from tqdm import tqdm

from onnxopt.runtime import make_session
from onnxopt.validation import compare_outputs, run

EVAL_SAMPLES = 16


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


def output_error(float_outputs: list[list[np.ndarray]], model, feeds: list[dict]) -> float:
    session = make_session(model)
    return max(1.0 - compare_outputs(ref, run(session, f)).cosine for ref, f in zip(float_outputs, feeds))


def keep_sensitive_float(quantize: Callable, float_model, full, data, max_error: float,
                         progress: bool = True) -> tuple[frozenset[str], dict]:
    """(compute-node outputs to keep float, a summary for the report)."""
    feeds = _eval_feeds(data)
    reference = make_session(float_model)
    float_outputs = [run(reference, f) for f in feeds]
    error = output_error(float_outputs, full.model, feeds)
    summary = {"error_before": error, "error_after": error, "kept_float": [], "max_error": max_error}
    if error <= max_error:
        return frozenset(), summary
    gains = {}
    for name in tqdm(full.compute_outputs, desc="sensitivity", unit="layer", leave=False,
                     disable=not progress or not sys.stderr.isatty()):
        gains[name] = error - output_error(float_outputs, quantize(frozenset({name})).model, feeds)
    kept: set[str] = set()
    for name in sorted(gains, key=gains.get, reverse=True):  # alone a layer may seem harmless, not in company
        if error <= max_error:
            break
        kept.add(name)
        error = output_error(float_outputs, quantize(frozenset(kept)).model, feeds)
    summary.update(error_after=error, kept_float=sorted(kept),
                   most_sensitive=[{"layer": n, "error_drop": gains[n]} for n in sorted(gains, key=gains.get, reverse=True)[:10]])
    return frozenset(kept), summary
