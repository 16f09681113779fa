"""The PassManager: runs a pipeline, verifies after each pass, times it and records what changed.

Consecutive cleanup passes (`fixed_point = True`, which must be idempotent) are rerun as a group until
none changes anything.
Each pass works on a copy, so when one breaks the model the manager stops with that pass's name and
the last good model is still at hand.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Literal

import numpy as np
import onnx

from .errors import OnnxoptError, PassFailedError
from .graph import skeleton, without_output_shapes
from .pass_api import Pass, PassContext, PassResult, Reference
from .stats import ModelStats, model_stats
from .table import Table
from .validation import Agreement, compare_outputs, reference_scale

log = logging.getLogger("onnxopt")

Verify = Literal["none", "structure", "numeric"]


@dataclasses.dataclass
class PassRecord:
    name: str
    iteration: int
    changed: bool
    seconds: float
    counts: dict[str, int]
    skipped: list[str]
    notes: list[str]
    nodes: tuple[int, int]
    parameters: tuple[int, int]
    size_bytes: tuple[int, int]
    agreement: Agreement | None = None
    details: dict = dataclasses.field(default_factory=dict)
    tables: list[Table] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


class Verifier:
    """Structural checks (checker, strict shape inference) and an optional numeric comparison, plus,
    always, whether ONNX Runtime can load the result: its loader inlines and infers more than onnx's
    checks (an If with a constant condition, for one), and a pass must never hand on a model it cannot
    run, even under `--verify none`.

    A check that already fails on the input model is switched off with a note rather than blamed
    on the first pass.
    """

    def __init__(self, model: onnx.ModelProto, mode: Verify, ctx: PassContext, rtol: float, atol: float):
        self.mode = mode
        self.ctx = ctx
        self.rtol, self.atol = rtol, atol
        self.notes: list[str] = []
        self.checks = {"checker": _check_model, "shape inference": _infer_shapes} if mode != "none" else {}
        self.checks["ONNX Runtime load"] = _ort_loads
        if "shape inference" in self.checks and _infer_shapes(model) and not _infer_shapes(model, outputs=False):
            self.notes.append("the input model declares output shapes its graph does not compute; shape inference "
                              "is checked without them")
            self.checks["shape inference"] = functools.partial(_infer_shapes, outputs=False)
        for name, check in list(self.checks.items()):
            problem = check(model)
            if problem:
                self.notes.append(f"{name} already fails on the input model ({problem}); not checked after passes")
                del self.checks[name]
        self.reference: list[list[np.ndarray]] | None = None
        if mode == "numeric":
            if ctx.sample_inputs is None:
                raise OnnxoptError("--verify numeric needs sample inputs", "give --data or --shape for dynamic inputs")
            self.reference = self._outputs(model)

    def _outputs(self, model: onnx.ModelProto) -> list[list[np.ndarray]]:
        from .runtime import make_session
        from .validation import run

        session = make_session(model, self.ctx.ep)
        return [run(session, feeds) for feeds in self.ctx.sample_inputs]

    def load_problem(self, model: onnx.ModelProto) -> str | None:
        """Why ORT cannot load `model`, or None (also when it could not load the input either)."""
        check = self.checks.get("ONNX Runtime load")
        problem = check(model) if check else None
        return f"ONNX Runtime load: {problem}" if problem else None

    def verify(self, model: onnx.ModelProto, lossy: bool, load: bool = True) -> tuple[str | None, Agreement | None]:
        """(failure reason or None, agreement with the input model when numeric); `load=False` leaves
        the ORT load check to the caller (once for a whole group of cleanup passes)."""
        for name, check in self.checks.items():
            if name == "ONNX Runtime load" and not load:
                continue
            problem = check(model)
            if problem:
                return f"{name}: {problem}", None
        if self.reference is None:
            return None, None
        try:
            outputs = self._outputs(model)
        except OnnxoptError as exc:
            return f"ONNX Runtime cannot run the result: {exc}", None
        worst = None
        for ref, out in zip(self.reference, outputs):
            agreement = compare_outputs(ref, out)
            if not lossy and not agreement.within(self.rtol, self.atol, reference_scale(ref)):
                return (f"outputs differ from the input model (max abs error {agreement.max_abs_error:.3g}, "
                        f"tolerance {self.atol:g} + {self.rtol:g} x {reference_scale(ref):.3g})"), agreement
            if worst is None or agreement.max_abs_error > worst.max_abs_error:
                worst = agreement
        return None, worst


# Both checks run on the model's skeleton (large initializers as typed inputs): the checker and shape
# inference serialize what they are given, and the weights' bytes tell them nothing about structure.
def _check_model(model: onnx.ModelProto) -> str | None:
    try:
        onnx.checker.check_model(skeleton(model))
    except Exception as exc:
        return str(exc).strip().splitlines()[0][:300]
    return None


def _ort_loads(model: onnx.ModelProto) -> str | None:
    """ORT's loader on the skeleton: cheap (no weights), and its graph checks and shape inference run
    as they would on the full model."""
    import onnxruntime as ort

    from .runtime import describe_ort_error

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    try:
        ort.InferenceSession(skeleton(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        return describe_ort_error(exc)[:300]
    return None


def _infer_shapes(model: onnx.ModelProto, outputs: bool = True) -> str | None:
    light = skeleton(model) if outputs else without_output_shapes(skeleton(model))
    try:
        onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True)
    except Exception as exc:
        return str(exc).strip().splitlines()[0][:300]
    return None


class PassManager:
    def __init__(self, passes: list[Pass], *, verify: Verify = "structure", ctx: PassContext | None = None,
                 max_iterations: int = 4, rtol: float = 1e-4, atol: float = 1e-5):
        self.passes = passes
        self.verify_mode = verify
        self.ctx = ctx or PassContext()
        self.max_iterations = max_iterations
        self.rtol, self.atol = rtol, atol
        self.records: list[PassRecord] = []
        self.notes: list[str] = []
        self._stats: tuple[onnx.ModelProto, ModelStats] | None = None  # stats of the current model, computed once

    def groups(self) -> list[list[Pass]]:
        """Consecutive fixed-point passes form one group; every other pass stands alone."""
        groups: list[list[Pass]] = []
        for p in self.passes:
            if p.fixed_point and groups and groups[-1][-1].fixed_point:
                groups[-1].append(p)
            else:
                groups.append([p])
        return groups

    def stats(self, model: onnx.ModelProto) -> ModelStats:
        """Stats of `model`, reusing those of the last pass's result (sizing a large model is not free)."""
        if self._stats is None or self._stats[0] is not model:
            self._stats = (model, model_stats(model))
        return self._stats[1]

    def run(self, model: onnx.ModelProto) -> onnx.ModelProto:
        if self.ctx.reference is None:  # optimize() sets one that reloads a large input from its file
            self.ctx.reference = Reference(model)
        self.input_stats = self.stats(model)
        verifier = Verifier(model, self.verify_mode, self.ctx, self.rtol, self.atol)
        self.notes.extend(verifier.notes)
        for group in self.groups():
            if not group[0].fixed_point:
                model, _ = self._run_one(group[0], model, verifier, 1)
                continue
            # ORT's loader runs once for a whole cleanup group; when it refuses the result, the group
            # is run again from its input with the check after each pass, which names the culprit.
            group_input, records = model, len(self.records)
            model = self._run_to_fixed_point(group, model, verifier, load=False)
            problem = verifier.load_problem(model) if model is not group_input else None
            if problem:
                del self.records[records:]
                self._run_to_fixed_point(group, group_input, verifier, load=True)
                raise PassFailedError("+".join(p.name for p in group), problem, last_good=group_input)
            del group_input  # a second model in memory for the rest of the pipeline otherwise
        return model

    def _run_to_fixed_point(self, group: list[Pass], model: onnx.ModelProto, verifier: Verifier,
                            load: bool) -> onnx.ModelProto:
        """Cleanup passes are idempotent, so the group is at a fixed point once every other pass has
        run without change since the last change."""
        unchanged_in_a_row = 0
        for step in range(self.max_iterations * len(group)):
            p = group[step % len(group)]
            model, record = self._run_one(p, model, verifier, step // len(group) + 1, load)
            unchanged_in_a_row = 0 if record.changed else unchanged_in_a_row + 1
            if unchanged_in_a_row >= len(group) - 1 and step >= len(group) - 1:
                break
        return model

    def _run_one(self, p: Pass, model: onnx.ModelProto, verifier: Verifier,
                 iteration: int, load: bool = True) -> tuple[onnx.ModelProto, PassRecord]:
        before = self.stats(model)
        start = time.perf_counter()
        try:
            result: PassResult = p.run(copy_model(model), self.ctx)
        except OnnxoptError:
            raise
        except Exception as exc:
            raise PassFailedError(p.name, f"{type(exc).__name__}: {exc}", last_good=model) from exc
        seconds = time.perf_counter() - start
        problem, agreement = verifier.verify(result.model, p.lossy, load) if result.changed else (None, None)
        if problem:
            raise PassFailedError(p.name, problem, last_good=model)
        after = model_stats(result.model) if result.changed else before
        self._stats = (result.model if result.changed else model, after)
        record = PassRecord(
            name=p.name, iteration=iteration, changed=result.changed, seconds=seconds,
            counts=result.counts, skipped=result.skipped, notes=result.notes,
            nodes=(before.nodes, after.nodes), parameters=(before.parameters, after.parameters),
            size_bytes=(before.size_bytes, after.size_bytes), agreement=agreement, details=result.details,
            tables=result.tables,
        )
        self.records.append(record)
        log.info("%s (iteration %d): %s in %.2fs", p.name, iteration,
                 record.counts if record.changed else "no change", seconds)
        return (result.model if result.changed else model), record
