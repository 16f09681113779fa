"""`optimize()`: load, run a pipeline under the PassManager, compare with the original, save, report."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .data import RepresentativeData, load_feeds, validate_feeds
from .errors import OnnxoptError, PassFailedError
from .inputs import generate_inputs
from .manager import PassManager
from .model_io import check_writable, external_data_files, load_model, save_model
from .pass_api import Pass, PassContext, Reference
from .pipeline import build_pipeline, parse_spec
from .registry import load_plugin
from .report import Report
from .runtime import effective_ep, make_session
from .settings import RunSettings
from .validation import compare_outputs, measure_latency, run


def optimize(model: onnx.ModelProto | str | os.PathLike, passes: str | list, settings: RunSettings | None = None,
             **values: Any) -> tuple[onnx.ModelProto, Report]:
    """Optimizes `model` with `passes` ("fold,fuse" or a list of specs/Pass objects).

    Run settings are `RunSettings` fields, as keywords (`output=`, `calib=`, `shapes=`, `ep=`, ...)
    or as a `settings` object they override. Returns the optimized model and a Report; writes the
    model to `output` (atomically) and the JSON report to `report` when given. On a pass that breaks
    the model, raises PassFailedError after writing the last good model to `output`, so nothing
    done before it is lost.
    """
    if "calibration" in values:  # the keyword's name before run settings were declared in one place
        values["calib"] = values.pop("calibration")
    settings = RunSettings.build(values, "optimize()", base=settings)
    for plugin in settings.plugins:
        load_plugin(plugin)
    pipeline = _pipeline(passes)
    input_path = None if isinstance(model, onnx.ModelProto) else Path(model)
    output = Path(settings.output) if settings.output is not None else None
    original = load_model(input_path) if input_path else model
    check_outputs(settings, input_path, external_data_files(original))
    data = RepresentativeData(settings.calib, settings.shapes) if settings.calib is not None else None
    train = RepresentativeData(settings.train, settings.shapes) if settings.train is not None else None
    feeds, feeds_note = None, None
    if settings.compare or settings.verify == "numeric":
        feeds, feeds_note = _feeds(original, settings, data or train, _samples_read(pipeline))
    comparing = settings.compare and feeds is not None
    # Without a comparison the input is not needed after the first pass: holding it would keep a
    # second copy of a large model alive for the whole run (a pass that asks reloads it from its file).
    reference = Reference(original) if comparing or input_path is None else Reference(path=input_path)
    ctx = PassContext(ep=settings.ep, sample_inputs=None if feeds is None else [feeds], data=data, train=train,
                      reference=reference)
    manager = PassManager(pipeline, verify=settings.verify, ctx=ctx)
    spec = passes if isinstance(passes, str) else ",".join(p.name for p in pipeline)
    pending = [original]
    del original
    try:
        optimized = manager.run(pending.pop())
    except PassFailedError as exc:
        if output is not None and exc.last_good is not None:
            save_model(exc.last_good, output, settings.external_data)
            exc.hint = f"the model before that pass was written to {output}"
        raise
    report = Report(pipeline=spec, input=str(input_path) if input_path else None,
                    output=str(output) if output else None, ep=settings.ep, original=manager.input_stats,
                    optimized=manager.stats(optimized), passes=[r.to_dict() for r in manager.records],
                    notes=list(manager.notes) + ([feeds_note] if feeds_note else []))
    if comparing:
        _compare(reference.model, optimized, feeds, report, settings)
    if output is not None:
        save_model(optimized, output, settings.external_data)
    if settings.report is not None:
        report.write_json(settings.report)
    return optimized, report


def _pipeline(passes: str | list) -> list[Pass]:
    if isinstance(passes, str):
        return build_pipeline(parse_spec(passes))
    built = []
    for item in passes:
        built.extend([item] if isinstance(item, Pass) else build_pipeline(item if isinstance(item, str) else [item]))
    return built


def check_outputs(settings: RunSettings, input_path: Path | None, external: list[Path] = (),
                  other_inputs: tuple[tuple[str, Path], ...] = ()) -> None:
    """Before any work: every output can be written, and none is a file the run reads (the model,
    its external data, the sample or representative data, a plugin), except the model itself under
    `in_place`. Writing one would destroy an input."""
    inputs = [("the input model", input_path)] if input_path else []
    inputs += [("the input model's external data", f) for f in external] + list(other_inputs)
    named = (("data", settings.data), ("calib", settings.calib), ("train", settings.train))
    inputs += [(f"the {name} file", Path(value)) for name, value in named
               if isinstance(value, (str, os.PathLike)) and Path(value).is_file()]
    inputs += [(f"a file of the {name} folder", f) for name, value in named[1:] for f in _files_below(value)]
    inputs += [("the plugin", Path(p)) for p in settings.plugins]
    outputs = []
    if settings.output is not None:
        output = Path(settings.output)
        outputs += [("output", output), ("the output's external data", output.with_name(f"{output.name}.data"))]
    if settings.report is not None:
        outputs.append(("report", Path(settings.report)))
    for index, (label, path) in enumerate(outputs):
        for other_label, other in outputs[:index]:
            if _same_file(path, other):
                raise OnnxoptError(f"{label} {path} is also the {other_label}", "write them to different files")
        for what, source in inputs:
            if not _same_file(path, source):
                continue
            if label == "the output's external data" and settings.in_place:
                continue  # replacing the input in place: save_model keeps its data until the new model is in place
            if label == "output" and what == "the input model":
                if settings.in_place:
                    continue
                raise OnnxoptError(f"output {path} is the input model", "choose another -o, or pass --in-place to overwrite it")
            raise OnnxoptError(f"{label} {path} is {what} ({source})", f"choose another path for the {label}")
        if label != "the output's external data":
            check_writable(path)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _files_below(source) -> list[Path]:
    if not isinstance(source, (str, os.PathLike)) or not Path(source).is_dir():
        return []
    return [f for f in Path(source).rglob("*") if f.is_file()]


def _feeds(model: onnx.ModelProto, settings: RunSettings, data: RepresentativeData | None,
           read: int | None) -> tuple[dict, str | None]:
    """Inputs to compare the models on, and a note when they are not the user's `data`: without
    `data` or `shapes`, stored representative (or else training) data, a file, folder or dict, is
    real input of the right shapes, which generated inputs of a dynamic-shaped model cannot be.
    Samples past the `read` that the passes use are taken first: a pass fits what it reads, so a
    comparison on those samples would flatter it."""
    if isinstance(settings.data, dict):
        validate_feeds(settings.data, model, "the given data")
        return settings.data, None
    if settings.data is not None:
        return load_feeds(settings.data, model), None
    if data is not None and data.stored and not settings.shapes:
        source = "calibration" if settings.calib is not None else "training"
        if read and (held := data.held_out(model, read)) is not None:
            feeds, samples = held
            what = "one feed" if samples is None else f"{samples} sample{'s' if samples != 1 else ''}"
            return feeds, (f"compared on {what} of the {source} data that no pass read (they read the first "
                           f"{read} at most); pass --data for inputs of your own")
        batches = data.batches(model, check=False)
        feeds = batches.first_batch()
        what = "one feed" if batches.per_entry or not feeds else f"{len(next(iter(feeds.values())))} samples"
        fitted = ", which the passes also read" if read is None or read else ""
        return feeds, f"compared on the first {source} batch ({what}){fitted}; pass --data for held-out inputs"
    return generate_inputs(model, settings.shapes), None


def _samples_read(pipeline: list[Pass]) -> int | None:
    """The most representative samples a pass of `pipeline` reads (its `samples` option); None when
    a lossy pass has no such bound; 0 when no pass reads data (only lossy passes do)."""
    counts = [0]
    for p in pipeline:
        if p.lossy:
            samples = getattr(getattr(p, "options", None), "samples", None)
            if not isinstance(samples, int):
                return None
            counts.append(samples)
    return max(counts)


NOISE_CONTROL_MAX_BYTES = 256 << 20  # a third session of a larger model costs more memory than it tells


def _compare(original, optimized, feeds, report: Report, settings: RunSettings) -> None:
    ep = effective_ep(settings.ep, settings.ep_fallback)
    sessions = {name: make_session(model, ep, fallback=settings.ep_fallback, threads=settings.threads)
                for name, model in (("original", original), ("optimized", optimized))}
    reference = run(sessions["original"], feeds)
    report.notes.extend(_misdeclared_outputs(original, reference))
    report.agreement = compare_outputs(reference, run(sessions["optimized"], feeds))
    if settings.runs > 0:
        if report.original.size_bytes <= NOISE_CONTROL_MAX_BYTES:
            # A second session of the same model can run persistently 15 % faster or slower than the
            # first on a sub-millisecond model (measured on the demo CNN): timed beside the two, it
            # says how large a difference this run can tell from noise.
            sessions["original_again"] = make_session(original, ep, fallback=settings.ep_fallback,
                                                      threads=settings.threads)
        report.latency = measure_latency(sessions, feeds, runs=settings.runs)


def _misdeclared_outputs(model: onnx.ModelProto, values: list) -> list[str]:
    """Warnings for outputs whose declared rank or fixed dims disagree with what ORT returns (the
    comparison trusts the values)."""
    warnings = []
    for output, value in zip(model.graph.output, values):
        tensor_type = output.type.tensor_type
        if not output.type.HasField("tensor_type") or not tensor_type.HasField("shape") or value is None:
            continue
        declared = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]
        actual = list(np.shape(value))
        if len(declared) != len(actual) or any(isinstance(d, int) and d > 0 and d != a for d, a in zip(declared, actual)):
            warnings.append(f"warning: output '{output.name}' is declared {declared} but ONNX Runtime returns "
                            f"{actual}; the comparison uses the values it returns")
    return warnings
