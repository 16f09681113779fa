"""`optimize()`: load, run a pipeline under the PassManager, compare with the original, save, report."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx

from .errors import OnnxoptError, PassFailedError
from .inputs import check_feeds, generate_inputs, load_data
from .manager import PassManager, Verify
from .model_io import check_writable, load_model, save_model
from .pass_api import Pass, PassContext
from .pipeline import build_pipeline, parse_spec
from .registry import load_plugin
from .report import Report
from .runtime import effective_ep, make_session
from .stats import model_stats
from .validation import compare_outputs, measure_latency, run


def optimize(model: onnx.ModelProto | str | os.PathLike, passes: str | list, *,
             output: str | os.PathLike | None = None, in_place: bool = False, ep: str = "cpu",
             ep_fallback: bool = False, data: str | os.PathLike | dict | None = None,
             shapes: dict[str, tuple[int, ...]] | None = None, runs: int = 50, compare: bool = True,
             verify: Verify = "structure", threads: int | None = None, plugins: tuple[str, ...] = (),
             calibration: Any = None, external_data: bool | None = None) -> tuple[onnx.ModelProto, Report]:
    """Optimizes `model` with `passes` ("fold,fuse" or a list of specs/Pass objects).

    Returns the optimized model and a Report; writes the model to `output` (atomically) when given.
    On a pass that breaks the model, raises PassFailedError after writing the last good model to
    `output`, so nothing done before it is lost.
    """
    for plugin in plugins:
        load_plugin(plugin)
    pipeline = _pipeline(passes)
    input_path = None if isinstance(model, onnx.ModelProto) else Path(model)
    if output is not None:
        _check_output(Path(output), input_path, in_place)
    original = load_model(input_path) if input_path else model
    feeds, feeds_note = None, None
    if compare or verify == "numeric":
        feeds, feeds_note = _feeds(original, data, shapes, calibration)
    ctx = PassContext(ep=ep, sample_inputs=[feeds] if feeds else None, calibration=calibration)
    manager = PassManager(pipeline, verify=verify, ctx=ctx)
    spec = passes if isinstance(passes, str) else ",".join(p.name for p in pipeline)
    # Without a comparison the input is not needed after the first pass: holding it would keep a
    # second copy of a large model alive for the whole run.
    pending = [original]
    if not (compare and feeds is not None):
        del original
    try:
        optimized = manager.run(pending.pop())
    except PassFailedError as exc:
        if output is not None and exc.last_good is not None:
            save_model(exc.last_good, output, external_data)
            exc.hint = f"the model before that pass was written to {output}"
        raise
    report = Report(pipeline=spec, input=str(input_path) if input_path else None,
                    output=str(output) if output else None, ep=ep, original=manager.input_stats,
                    optimized=manager.stats(optimized), passes=[r.to_dict() for r in manager.records],
                    notes=list(manager.notes) + ([feeds_note] if feeds_note else []))
    if compare and feeds is not None:
        _compare(original, optimized, feeds, report, ep, ep_fallback, runs, threads)
    if output is not None:
        save_model(optimized, output, external_data)
    return optimized, report


def _pipeline(passes: str | list) -> list[Pass]:
    if isinstance(passes, str):
        return build_pipeline(parse_spec(passes))
    built = []
    for item in passes:
        built.extend([item] if isinstance(item, Pass) else build_pipeline(item if isinstance(item, str) else [item]))
    return built


def _check_output(output: Path, input_path: Path | None, in_place: bool) -> None:
    if input_path is not None and output.exists() and input_path.exists() and output.samefile(input_path) and not in_place:
        raise OnnxoptError(f"output {output} is the input model", "choose another -o, or pass --in-place to overwrite it")
    check_writable(output)


def _feeds(model: onnx.ModelProto, data, shapes, calibration) -> tuple[dict, str | None]:
    """Inputs to compare the models on, and a note when they are not the user's `data`: without
    `data` or `shapes`, stored calibration data (a file, folder or dict) is real input of the right
    shapes, which generated inputs of a dynamic-shaped model cannot be."""
    if isinstance(data, dict):
        check_feeds(data, model, "the given data")
        return data, None
    if data is not None:
        return load_data(data, model), None
    if calibration is not None and not shapes:
        from .calib_data import is_stored, open_calibration

        if is_stored(calibration):
            feeds = open_calibration(calibration, model).first_batch()
            samples = len(next(iter(feeds.values()))) if feeds else 0
            return feeds, (f"compared on the first calibration batch ({samples} samples); "
                           "pass --data for held-out inputs")
    return generate_inputs(model, shapes), None


def _compare(original, optimized, feeds, report: Report, ep, ep_fallback, runs, threads) -> None:
    ep = effective_ep(ep, ep_fallback)
    sessions = {"original": make_session(original, ep, fallback=ep_fallback, threads=threads),
                "optimized": make_session(optimized, ep, fallback=ep_fallback, threads=threads)}
    report.agreement = compare_outputs(run(sessions["original"], feeds), run(sessions["optimized"], feeds))
    if runs > 0:
        report.latency = measure_latency(sessions, feeds, runs=runs)
