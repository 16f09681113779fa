"""int8 quantization (`quant`): calibrated static QDQ, dynamic MatMul, and the choice between them.

Static mode runs in three separate steps: calibration (`calibration.py`: one streaming pass over
the data, statistics cached on disk), planning (`plan.py`: which tensors, which parameters, from a
per-op table) and rewriting (`qdq.py`: QuantizeLinear/DequantizeLinear insertion). Activations that
feed MatMul weights are smoothed (SmoothQuant, `smooth` = alpha): outlier channels are divided by s
in a Mul before their QuantizeLinear and the weight rows multiplied by s (MiniLM: 4% of int8 run time).
Dynamic mode (`dynamic.py`) quantizes MatMul weights only and lets ORT quantize activations per call.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from typing import Literal

import numpy as np
import onnx
from onnx import numpy_helper

from onnxopt import OnnxoptError, Pass, PassContext, PassResult, option
from onnxopt.data import fixed_batch, padding
from onnxopt.graph import GraphView, NameGenerator, infer_value_info, scopes
from onnxopt.manager import copy_model
from onnxopt.opsets import default_opset
from onnxopt.surgery import constants_to_initializers, remove_unused_initializers
from onnxopt.tensor_compare import compare_tensors, error_table

from . import calibration
from .compare import dequantized_views
from .bias import correct_biases, correctable
from .dynamic import dynamic_candidates, quantize_dynamic
from .int4 import int4_candidates, quantize_int4
from .plan import COMPUTE_OPS, PlanOptions, build_plan, excluded, place, smoothing_factors, smoothing_groups
from .qdq import QDQInserter
from .recurrent import float_recurrent_layers, lstm_candidates, quantize_lstms

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeMatMul", "MatMulNBits", "QLinearConv",
                 "QLinearMatMul", "MatMulInteger", "DynamicQuantizeLinear"}


@dataclasses.dataclass(frozen=True)
class QuantOptions:
    mode: Literal["static", "dynamic"] = option("static", "static: calibrated QDQ; dynamic: int8 MatMul weights, activations quantized at run time")
    method: Literal["minmax", "percentile", "entropy", "mse"] = option("mse", "how calibration turns statistics into ranges")
    percentile: float = option(99.99, "percentile kept by method=percentile")
    per_channel: bool = option(True, "one weight scale per output channel (else per tensor)")
    symmetric_activations: bool = option(False, "int8 symmetric activations (TensorRT) instead of uint8 asymmetric")
    profile: Literal["cpu", "tensorrt"] = option("cpu", "target: tensorrt implies int8 symmetric activations and no "
                                                       "CPU speed guard (TensorRT picks its own kernels)")
    reduce_range: Literal["auto", "on", "off"] = option(
        "auto", "7-bit weights, so ORT's u8 x s8 kernels cannot saturate on x86 CPUs without VNNI (AVX2, "
                "AVX-512F); auto: on when this CPU lacks VNNI and the target is the CPU")
    smooth: float = option(0.8, "SmoothQuant alpha for activations feeding MatMul weights (0: off)")
    bias_correction: bool = option(True, "subtract the mean shift weight rounding causes (E[x] @ dW, x's mean from "
                                         "calibration) from the bias after each MatMul/Gemm")
    smooth_min_ratio: float = option(1.0, "smooth only activations whose largest channel max exceeds the median "
                                          "channel max this many times (outlier channels); each costs a Mul")
    exclude: str = option("", "node names or op types to keep float, ';'-separated; regular expressions allowed")
    samples: int = option(128, "calibration samples to use at most")
    trim_padding: bool = option(True, "sequence models with a 0/1 attention-mask input: calibrate each batch "
                                      "cut after its longest real sequence (samples batched by length)")
    batch_size: int = option(8, "calibration batch size")
    bits: Literal[8, 4] = option(8, "weight bits; 4: int4 weight-only MatMul (blockwise, ORT MatMulNBits)")
    block_size: int = option(32, "int4: weights per scale along the reduction axis (power of two, >= 16)")
    auto: bool = option(False, "keep the layers that hurt the outputs most in float until max_error holds")
    max_error: float = option(0.005, "auto: largest allowed 1 - cosine between float and int8 outputs on calibration "
                                     "data, or with eval the largest allowed drop of its score")
    eval: str = option("", "auto: module:function (or file.py:function) scoring a model on your own data, higher is "
                           "better; called with an onnxruntime.InferenceSession on the CPU")
    keep_if_slower: bool = option(True, "time int8 against the float input (batch 1 and 8, 1 and 2 threads; batch 8 "
                                        "is skipped when batch 1 is 1.15x faster) and keep the float model if int8 "
                                        "is slower in any of them")
    dynamic_if_slower: bool = option(True, "where static int8 is slower than float (small layers, one token a "
                                           "call), time dynamic int8 too and keep it where that is faster (not "
                                           "with auto)")

    def __post_init__(self):
        if not 0 <= self.smooth < 1:
            raise ValueError("smooth must be in [0, 1)")
        if not 50 < self.percentile <= 100:
            raise ValueError("percentile must be in (50, 100]")
        if self.samples < 1 or self.batch_size < 1:
            raise ValueError("samples and batch_size must be >= 1")
        if not 0 < self.max_error < (math.inf if self.eval else 1):
            raise ValueError("max_error must be in (0, 1), or > 0 with eval")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError("block_size must be a power of two >= 16")
        if self.eval and not self.auto:
            raise ValueError("eval is the accuracy measure of auto mode: add auto=true")


@dataclasses.dataclass
class StaticResult:
    model: onnx.ModelProto
    counts: dict[str, int]
    skipped: list[str]
    activations: set[str]
    nodes_quantized: int
    compute_outputs: list[str]  # one per quantized Conv/MatMul/Gemm: the handles auto mode keeps float


class Quantize(Pass):
    """int8 quantization: calibrated static QDQ (default), dynamic int8 MatMul (`mode=dynamic`), int4
    weight-only MatMul (`bits=4`); mixed precision within an error budget (`auto=true`); the float
    model is kept where int8 is slower (`keep_if_slower`)."""

    name = "quant"
    Options = QuantOptions
    lossy = True

    @classmethod
    def tensor_views(cls, model: onnx.ModelProto):
        return dequantized_views(model)

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        already = {n.op_type for n in model.graph.node} & QUANTIZED_OPS
        if already:
            return PassResult(model, changed=False, skipped=[f"already quantized ({', '.join(sorted(already))})"])
        notes = []
        if ctx.ep in ("cuda", "tensorrt"):
            notes.append(f"int8 QDQ on the {ctx.ep} EP: ORT's CUDA EP runs QDQ graphs mostly as float ops "
                         "(measured 2.1x slower than fp32 on an H100); fp16 is the GPU speed-up")
        moved = constants_to_initializers(model.graph)  # weights kept in Constant nodes quantize alike
        if moved:
            notes.append(f"{moved} Constant node(s) moved to initializers, so that weights held in them quantize")
        quantizer = self
        if default_opset(model) < 13:
            model, upgraded = self._upgrade(model, ctx, notes)
            if not upgraded and self.options.per_channel:  # per-channel QuantizeLinear needs opset 13
                quantizer = Quantize(dataclasses.replace(self.options, per_channel=False))
        if self.options.bits == 4:
            return quantizer._int4(model, notes)
        if self.options.mode == "dynamic":
            return quantizer._dynamic(model, ctx, notes)
        return quantizer._static(model, ctx, notes)

    def _upgrade(self, model: onnx.ModelProto, ctx: PassContext, notes: list[str]) -> tuple[onnx.ModelProto, bool]:
        """The model at opset 13, checked against itself under ORT (as ORT's own quantizer upgrades old
        models); or, when conversion fails or changes the outputs, the model as it was (per-tensor
        QDQ is legal from opset 10) and a note saying why."""
        from onnxopt.opsets import upgrade_opset

        opset = default_opset(model)
        try:
            upgraded = upgrade_opset(model, 13)
            problem = _outputs_differ(model, upgraded, self._check_feeds(model, ctx))
        except OnnxoptError:
            raise
        except Exception as exc:  # the converter's own errors: which adapter failed, in its words
            problem = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"
        if problem is None:
            notes.append(f"opset {opset} upgraded to 13 with onnx.version_converter (outputs checked equal under "
                         "ONNX Runtime) for per-channel QDQ")
            return upgraded, True
        if opset < 10:
            raise OnnxoptError(f"quant needs opset 10 or newer and the opset-{opset} model could not be upgraded "
                               f"to 13 ({problem})", "convert it with onnx.version_converter and check it")
        notes.append(f"opset {opset} could not be upgraded to 13 ({problem}); per-tensor QDQ at opset {opset}")
        return model, False

    def _check_feeds(self, model: onnx.ModelProto, ctx: PassContext) -> dict[str, np.ndarray] | None:
        if ctx.data is not None:
            return ctx.data.batches(model, self.options.batch_size, check=False).first_batch()
        return ctx.sample_inputs[0] if ctx.sample_inputs else None

    def _weight_bits(self, ep: str, notes: list[str]) -> int:
        """7 under reduce_range, else 8; says why in the report when auto chose 7."""
        from .cpu import int8_products_saturate

        if self.options.reduce_range == "auto":
            reduced = ep == "cpu" and self.options.profile == "cpu" and int8_products_saturate()
            if reduced:
                notes.append("reduce_range: 7-bit weights, because this CPU has no VNNI and ORT's u8 x s8 kernels "
                             "saturate there with 8-bit weights (reduce_range=off for a VNNI deployment target)")
            return 7 if reduced else 8
        return 7 if self.options.reduce_range == "on" else 8

    def _dynamic(self, model: onnx.ModelProto, ctx: PassContext, notes: list[str]) -> PassResult:
        nodes = [n for n in dynamic_candidates(model) if not excluded(n, self.options.exclude)]
        bits = self._weight_bits(ctx.ep, notes)
        count = quantize_dynamic(model, nodes, self.options.per_channel, bits)
        lstms = quantize_lstms(model, [n for n in lstm_candidates(model) if not excluded(n, self.options.exclude)],
                               self.options.per_channel, bits)
        notes.append("mode=dynamic: MatMul (and LSTM) weights int8, activations quantized per call (no calibration)")
        counts = {k: v for k, v in {"MatMuls quantized (dynamic)": count,
                                    "LSTMs quantized (DynamicQuantizeLSTM)": lstms}.items() if v}
        return PassResult(model, changed=count + lstms > 0, counts=counts, notes=notes, details={"mode": "dynamic"})

    def _int4(self, model: onnx.ModelProto, notes: list[str]) -> PassResult:
        nodes = [n for n in int4_candidates(model, self.options.block_size) if not excluded(n, self.options.exclude)]
        count = quantize_int4(model, nodes, self.options.block_size)
        notes.append("bits=4: MatMul weights int4 blockwise as ORT MatMulNBits (accuracy_level 4: int8 compute); "
                     "activations stay float")
        return PassResult(model, changed=count > 0, counts={"MatMuls quantized (int4)": count}, notes=notes,
                          details={"mode": "int4 weight-only", "block_size": self.options.block_size})

    def _static(self, model: onnx.ModelProto, ctx: PassContext, notes: list[str]) -> PassResult:
        from onnxopt.budget import load_score

        source = ctx.require_data("quant")
        score = load_score(self.options.eval, "quant:auto's eval") if self.options.eval else None
        data = source.batches(model, self.options.batch_size, self.options.samples,
                              trim_padding=self.options.trim_padding)
        if self.options.auto and not data.reiterable:
            raise OnnxoptError("quant:auto reads the calibration data more than once, and this is a one-shot iterator",
                               "pass a list, or a callable that returns a fresh iterable")
        floats = {n for n, vi in infer_value_info(model).items()
                  if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
        options = self._plan_options(self._weight_bits(ctx.ep, notes))
        nodes, tensors, groups, channel_tensors = [], set(), {}, set()
        for graph, view in scopes(model):  # If branches and Loop bodies too
            placed, needed, _ = place(graph, view, options, floats)
            nodes += placed
            tensors |= needed
            groups.update(smoothing_groups(view, placed) if self.options.smooth > 0 else {})
            channel_tensors |= set(correctable(view, placed)) if self.options.bias_correction else set()
        channel_tensors |= set(groups)
        lstms = [n for n in lstm_candidates(model) if not excluded(n, self.options.exclude)]
        notes.extend(f"{layer} stays float: ONNX Runtime has no int8 kernel for it" for layer in float_recurrent_layers(model))
        if not nodes and not lstms:
            return PassResult(model, changed=False, skipped=[_nothing_quantizable(model)], notes=notes)
        if not nodes:  # only recurrent layers: their activations are quantized at run time, no calibration
            result = StaticResult(copy_model(model), {}, [], set(), 0, [])
            details = {"mode": "static", "weight_bits": options.weight_bits}
            return self._finish(model, self._int8_lstms(model, result, data, ctx, notes, details), data, ctx,
                                notes, details, probe=None)
        started = time.perf_counter()
        probe = calibration.Probe(self._report_feeds(data, fixed_batch(model)))
        stats = calibration.load_or_collect(model, tensors, data, ctx.cache, ep="cpu", progress=ctx.progress,
                                            channel_tensors=channel_tensors, probe=probe)
        calibration_seconds = time.perf_counter() - started
        calibrated, given = data.positions
        if calibrated < given:
            notes.append(f"calibration cut trailing padding ({data.padding.mask} = 0): {calibrated:,} of {given:,} "
                         "sequence positions run; real tokens' activations do not depend on padding after them")

        def quantize(keep_float: frozenset[str]) -> StaticResult:
            return self._rewrite(model, floats, stats, dataclasses.replace(options, keep_float=keep_float))

        result = quantize(frozenset())
        details = {"mode": "static", "method": self.options.method, "weight_bits": options.weight_bits,
                   "calibration": data.description, "calibration_samples": data.num_samples,
                   "calibration_seconds": calibration_seconds}
        if self.options.auto:
            result = self._keep_sensitive_float(quantize, model, result, data, score, notes, details, ctx.progress)
        if lstms:
            result = self._int8_lstms(model, result, data, ctx, notes, details)
        return self._finish(model, result, data, ctx, notes, details, probe)

    def _int8_lstms(self, model, result: StaticResult, data, ctx: PassContext, notes: list[str],
                    details: dict) -> StaticResult:
        """`result` with its LSTM layers as DynamicQuantizeLSTM, where the speed guard finds that faster."""
        candidate = copy_model(result.model)
        count = quantize_lstms(candidate, [n for n in lstm_candidates(candidate) if not excluded(n, self.options.exclude)],
                               self.options.per_channel, details["weight_bits"])
        if self.options.keep_if_slower:
            verdict = ctx.guard.check(result.model, candidate, data.first_batch(),
                                      batches=None if data.per_entry else (1, 8))
            details["lstm_speed_check"] = verdict.records()
            if verdict.slower:
                notes.append(f"{count} LSTM layer(s) kept float: DynamicQuantizeLSTM is slower here ({verdict.slower})")
                return result
        counts = dict(result.counts, **{"LSTMs quantized (DynamicQuantizeLSTM)": count})
        return dataclasses.replace(result, model=candidate, counts=counts, nodes_quantized=result.nodes_quantized + count)

    def _finish(self, model, result: StaticResult, data, ctx: PassContext, notes: list[str], details: dict,
                probe) -> PassResult:
        """The speed guard on the whole result, then the report."""
        if not result.nodes_quantized:
            return PassResult(model, changed=False, skipped=result.skipped, notes=notes, details=details)
        if self.options.profile == "tensorrt":
            notes.append("profile=tensorrt: int8 symmetric activations; speed not checked on the CPU")
        elif self.options.keep_if_slower:
            started = time.perf_counter()
            verdict = ctx.guard.check_on_data(model, result.model, data)
            details["speed_check"] = verdict.records()
            details["speed_check_seconds"] = time.perf_counter() - started
            if verdict.slower:
                dynamic = self._dynamic_instead(model, data, ctx, notes, verdict) \
                    if self.options.dynamic_if_slower and not self.options.auto else None
                if dynamic is not None:
                    return dynamic
                notes.append(f"int8 does not pay on this model ({verdict.slower}); kept the float model. "
                             "Set quant:keep_if_slower=false to keep int8 anyway")
                return PassResult(model, changed=False, skipped=result.skipped, notes=notes,
                                  details={"mode": "float (int8 slower)", "speed_check": details["speed_check"]},
                                  tables=[verdict.table("speed guard: int8 against float")])
        details["nodes_quantized"] = result.nodes_quantized
        tables = []
        if probe is not None and result.activations:
            started = time.perf_counter()
            errors = compare_tensors(model, result.model, probe.feeds, only=result.activations,
                                     reference_values=probe.values, views=dequantized_views(result.model))
            details["worst_tensors"] = [dataclasses.asdict(e) for e in errors[:10]]
            details["report_seconds"] = time.perf_counter() - started
            tables.append(error_table(errors, "quantized activations with the worst error (SQNR on calibration data)"))
        return PassResult(result.model, changed=True, counts=result.counts, skipped=result.skipped, notes=notes,
                          details=details, tables=tables)

    def _dynamic_instead(self, model, data, ctx: PassContext, notes: list[str], static) -> PassResult | None:
        """Dynamic int8 where static does not pay, if it does: with small layers or one token a call (a
        decoder's decoding step), static QDQ's Quantize/DequantizeLinear steps cost more than its int8
        MatMuls save, while dynamic int8 quantizes only the MatMuls' inputs, inside their kernels."""
        result = self._dynamic(copy_model(model), ctx, [])
        if not result.changed:
            return None
        verdict = ctx.guard.check_on_data(model, result.model, data)
        if verdict.slower:
            notes.append(f"dynamic int8 does not pay either ({verdict.slower})")
            return None
        notes.append(f"static int8 does not pay on this model ({static.slower}); dynamic int8 does, kept "
                     "(quant:mode=static,keep_if_slower=false keeps static int8 anyway)")
        notes.extend(result.notes)
        details = {"mode": "dynamic (static int8 slower)", "static_speed_check": static.records(),
                   "speed_check": verdict.records()}
        return PassResult(result.model, changed=True, counts=result.counts, notes=notes, details=details,
                          tables=[static.table("speed guard: static int8 against float"),
                                  verdict.table("speed guard: dynamic int8 against float")])

    def _keep_sensitive_float(self, quantize, model, result: StaticResult, data, score, notes: list[str],
                              details: dict, progress) -> StaticResult:
        """auto mode: `result` with its most harmful layers float, until the error budget holds."""
        from onnxopt import budget

        if score:
            error_of, measure = budget.score_drop(model, score, self.options.eval, labels=("float", "quantized"))
        else:
            error_of, measure = budget.output_error(model, data)
        layers = QuantizedLayers(quantize, result)
        fit = budget.fit(layers, error_of, self.options.max_error, progress)
        kept = frozenset(fit.stepped_down(layers))
        notes.append(f"auto: {len(kept)} layer(s) kept float for max_error={self.options.max_error} on the "
                     f"{measure} (now {fit.error_after:.4g}, all-int8 {fit.error_before:.4g})")
        details["auto"] = {"error_before": fit.error_before, "error_after": fit.error_after, "kept_float": sorted(kept),
                           "max_error": fit.max_error, "measure": measure}
        if fit.gains:
            details["auto"]["most_sensitive"] = [{"layer": n, "error_drop": g} for n, g in fit.most_sensitive()]
        return quantize(kept) if kept else result

    @property
    def _symmetric(self) -> bool:
        return self.options.symmetric_activations or self.options.profile == "tensorrt"

    def _plan_options(self, weight_bits: int) -> PlanOptions:
        return PlanOptions(self.options.per_channel, self._symmetric, self.options.exclude, weight_bits=weight_bits)

    def _rewrite(self, model: onnx.ModelProto, floats: set[str], stats: dict, options: PlanOptions) -> StaticResult:
        """Plan and QDQ-rewrite a copy of `model`, leaving the nodes in `options.keep_float` float; in
        every subgraph too, innermost first (rewriting a graph's node list copies its subgraphs along)."""
        model = copy_model(model)
        unfit = {n: "has a mask-like range" for n, st in stats.items() if st.is_mask_like}
        unfit.update({n: "never ran on the calibration data (a branch it did not take)"
                      for n, st in stats.items() if st.count == st.nonfinite})
        means = {t: st.channel_mean for t, st in stats.items() if st.channel_mean is not None}
        names = NameGenerator(model.graph)
        counts: Counter[str] = Counter()
        skipped, activations, quantized = [], set(), []
        # each scope's view is built here and dropped after it: views memoize the weights they read
        for graph, outer in [(g, v.outer) for g, v in reversed(scopes(model))]:
            view = GraphView(graph, model.ir_version, outer)
            nodes, tensors, skipped_here = place(graph, view, options, floats, unfit)
            skipped += skipped_here
            if not nodes:
                continue
            groups = smoothing_groups(view, nodes) if self.options.smooth > 0 else {}
            ranges = {t: calibration.compute_range(stats[t], self.options.method, percentile=self.options.percentile,
                                                   symmetric=self._symmetric)
                      for t in tensors if t in stats and t not in unfit}
            smooth = self._smooth(graph, view, names, groups, stats, ranges)
            view = GraphView(graph, model.ir_version, view.outer)  # the smoothed weights are new initializers
            plan = build_plan(view, nodes, tensors, ranges, options, smooth)
            if self.options.bias_correction:
                counts["biases corrected"] += correct_biases(graph, view, names, plan, means, smooth)
                view = GraphView(graph, model.ir_version, view.outer)  # so are the corrected biases
            counts.update(QDQInserter(graph, view, names).apply(plan))
            counts["activations smoothed"] += len(smooth)
            skipped += plan.skipped
            activations |= set(plan.activations)
            quantized += [n.output[0] for n in plan.nodes if n.op_type in COMPUTE_OPS]
            counts["nodes quantized"] += len(plan.nodes)
        for graph, _ in reversed(scopes(model)):  # enclosing graphs' float weights read now only as int8
            remove_unused_initializers(graph)
        nodes_quantized = counts.pop("nodes quantized", 0)
        return StaticResult(model, {k: v for k, v in counts.items() if v}, skipped, activations, nodes_quantized,
                            quantized)

    @staticmethod
    def _report_feeds(data, fixed: int | None, samples: int = 2) -> dict[str, np.ndarray]:
        """Inputs of the SQNR report: a slice of the calibration data (for sequence models, its
        longest sentence without padding, whose values nobody reads); a batch the model fixes whole."""
        first = data.first_batch()
        if data.per_entry or fixed:  # one feed, or a batch the model fixes: as it is
            return first
        if data.padding is not None:
            return padding.longest_sample(first, data.padding)
        return {k: v[:samples] if v.ndim else v for k, v in first.items()}

    def _smooth(self, graph, view, names, groups, stats, ranges) -> dict[str, np.ndarray]:
        """Scales each group's weights by s (copies in `graph`) and records s for its QuantizeLinear;
        updates `ranges`."""
        if not groups:
            return {}
        factors = {}
        for tensor, readers in groups.items():
            st = stats.get(tensor)
            if st is None or st.channel_min is None:
                continue
            channel_absmax = np.maximum(np.abs(st.channel_min), np.abs(st.channel_max))
            if channel_absmax.max() < self.options.smooth_min_ratio * max(float(np.median(channel_absmax)), 1e-12):
                continue
            weights = [view.constant(r.input[1]) for r in readers]
            s = smoothing_factors(channel_absmax, weights, self.options.smooth)
            for reader, weight in zip(readers, weights):
                name = names(reader.input[1] + "_smoothed")
                graph.initializer.append(numpy_helper.from_array((weight * s[:, None]).astype(weight.dtype), name))
                reader.input[1] = name
            # The smoothed activation's exact range follows from the per-channel extremes.
            ranges[tensor] = (min(0.0, float(np.min(st.channel_min / s))), max(0.0, float(np.max(st.channel_max / s))))
            factors[tensor] = s
        return factors


class QuantizedLayers:
    """The quantized Conv/MatMul/Gemm layers as units of the error budget: each is float (0) or int8 (1)."""

    def __init__(self, quantize, full: StaticResult):
        self._quantize, self._full = quantize, full

    def units(self) -> list[str]:
        return self._full.compute_outputs

    def strengths(self, unit: str) -> tuple[str, str]:
        return ("float", "int8")

    def build(self, strengths) -> onnx.ModelProto:
        kept = frozenset(unit for unit, level in strengths.items() if level == 0)
        return self._full.model if not kept else self._quantize(kept).model


def _outputs_differ(model: onnx.ModelProto, other: onnx.ModelProto, feeds) -> str | None:
    """Why `other` does not compute what `model` does on `feeds` (None when it does, or with no feeds
    to tell: ORT still has to load it)."""
    from onnxopt.runtime import make_session
    from onnxopt.validation import compare_outputs, reference_scale, run

    try:
        candidate = make_session(other)
    except OnnxoptError as exc:
        return f"ONNX Runtime cannot load the upgraded model: {exc.problem}"
    if feeds is None:
        return None
    reference = run(make_session(model), feeds)
    agreement = compare_outputs(reference, run(candidate, feeds))
    if not agreement.within(1e-4, 1e-5, reference_scale(reference)):
        return f"the upgraded model's outputs differ by up to {agreement.max_abs_error:.3g}"
    return None


def _nothing_quantizable(model: onnx.ModelProto) -> str:
    """Why `quant` found nothing, naming a float16 model: its int8 QDQ starts from float32 tensors."""
    half = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    layers = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and half & set(n.input)]
    if not layers:
        return "nothing quantizable"
    return (f"nothing quantizable: {len(layers)} MatMul/Gemm/Conv layer(s) have float16 weights, and int8 "
            "quantization starts from a float32 model (export it in float32; float16 is the GPU speed-up)")
