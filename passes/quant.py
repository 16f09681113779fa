"""int8 quantization (`quant`): calibrated static QDQ, dynamic MatMul, and the choice between them.

Static mode runs in three separate steps: calibration (`quant_calibration`: one streaming pass over
the data, statistics cached on disk), planning (`quant_plan`: which tensors, which parameters, from a
per-op table) and rewriting (`quant_qdq`: QuantizeLinear/DequantizeLinear insertion). Activations that
feed MatMul weights are smoothed (SmoothQuant, `smooth` = alpha): outlier channels are divided by s
in a Mul before their QuantizeLinear and the weight rows multiplied by s (MiniLM: 4% of int8 run time).
Dynamic mode (`quant_dynamic`) quantizes MatMul weights only and lets ORT quantize activations per call.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Literal

import numpy as np
import onnx
from onnx import numpy_helper

from onnxopt import OnnxoptError, Pass, PassContext, PassResult, option
from onnxopt.graph import GraphView, NameGenerator, infer_value_info
from onnxopt.manager import copy_model
from onnxopt.tensor_compare import compare_tensors

from . import quant_calibration as calibration
from .quant_bias import correct_biases, correctable
from .quant_dynamic import dynamic_candidates, quantize_dynamic
from .quant_int4 import int4_candidates, quantize_int4
from .quant_plan import COMPUTE_OPS, PlanOptions, build_plan, excluded, place, smoothing_factors, smoothing_groups
from .quant_qdq import QDQInserter

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
    """Quantize to int8: calibrated QDQ (static) or int8 MatMul weights (dynamic)."""

    name = "quant"
    Options = QuantOptions
    lossy = True

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        already = {n.op_type for n in model.graph.node} & QUANTIZED_OPS
        if already:
            return PassResult(model, changed=False, skipped=[f"already quantized ({', '.join(sorted(already))})"])
        notes = []
        if ctx.ep in ("cuda", "tensorrt"):
            notes.append(f"int8 QDQ on the {ctx.ep} EP: ORT's CUDA EP runs QDQ graphs mostly as float ops "
                         "(measured 2.1x slower than fp32 on an H100); fp16 is the GPU speed-up")
        opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)
        if opset < 13:
            raise OnnxoptError(f"quant needs opset 13 or newer (per-channel QDQ); the model is opset {opset}",
                               "convert it with onnx.version_converter first")
        if self.options.bits == 4:
            return self._int4(model, notes)
        if self.options.mode == "dynamic":
            return self._dynamic(model, ctx, notes)
        return self._static(model, ctx, notes)

    def _weight_bits(self, ep: str, notes: list[str]) -> int:
        """7 under reduce_range, else 8; says why in the report when auto chose 7."""
        from onnxopt.runtime import int8_products_saturate

        if self.options.reduce_range == "auto":
            reduced = ep == "cpu" and self.options.profile == "cpu" and int8_products_saturate()
            if reduced:
                notes.append("reduce_range: 7-bit weights, because this CPU has no VNNI and ORT's u8 x s8 kernels "
                             "saturate there with 8-bit weights (reduce_range=off for a VNNI deployment target)")
            return 7 if reduced else 8
        return 7 if self.options.reduce_range == "on" else 8

    def _dynamic(self, model: onnx.ModelProto, ctx: PassContext, notes: list[str]) -> PassResult:
        nodes = [n for n in dynamic_candidates(model) if not excluded(n, self.options.exclude)]
        count = quantize_dynamic(model, nodes, self.options.per_channel, self._weight_bits(ctx.ep, notes))
        notes.append("mode=dynamic: MatMul weights int8, activations quantized per call (no calibration)")
        return PassResult(model, changed=count > 0, counts={"MatMuls quantized (dynamic)": count}, notes=notes,
                          details={"mode": "dynamic"})

    def _int4(self, model: onnx.ModelProto, notes: list[str]) -> PassResult:
        nodes = [n for n in int4_candidates(model, self.options.block_size) if not excluded(n, self.options.exclude)]
        count = quantize_int4(model, nodes, self.options.block_size)
        notes.append("bits=4: MatMul weights int4 blockwise as ORT MatMulNBits (accuracy_level 4: int8 compute); "
                     "activations stay float")
        return PassResult(model, changed=count > 0, counts={"MatMuls quantized (int4)": count}, notes=notes,
                          details={"mode": "int4 weight-only", "block_size": self.options.block_size})

    def _static(self, model: onnx.ModelProto, ctx: PassContext, notes: list[str]) -> PassResult:
        from onnxopt.calib_data import open_calibration

        if ctx.calibration is None:
            raise OnnxoptError("quant needs calibration data", "pass --calib data.npz (or --calib random to try it out)")
        score = None
        if self.options.eval:
            from .quant_auto import load_score

            score = load_score(self.options.eval)
        data = open_calibration(ctx.calibration, model, batch_size=self.options.batch_size,
                                samples=self.options.samples, trim_padding=self.options.trim_padding)
        if self.options.auto and not data.reiterable:
            raise OnnxoptError("quant:auto reads the calibration data more than once, and this is a one-shot iterator",
                               "pass a list, or a callable that returns a fresh iterable")
        floats = {n for n, vi in infer_value_info(model).items()
                  if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
        options = self._plan_options(self._weight_bits(ctx.ep, notes))
        nodes, tensors, _ = place(model, options, floats)
        if not nodes:
            return PassResult(model, changed=False, skipped=["nothing quantizable"], notes=notes)
        groups = smoothing_groups(model, nodes) if self.options.smooth > 0 else {}
        channel_tensors = set(groups) | (set(correctable(model, nodes)) if self.options.bias_correction else set())
        started = time.perf_counter()
        probe = calibration.Probe(self._report_feeds(data))
        stats = calibration.load_or_collect(model, tensors, data, ctx.cache_dir, ep="cpu", progress=ctx.progress,
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
            if not result.nodes_quantized:
                return PassResult(model, changed=False, skipped=result.skipped, notes=notes, details=details)
        if self.options.profile == "tensorrt":
            notes.append("profile=tensorrt: int8 symmetric activations; speed not checked on the CPU")
        elif self.options.keep_if_slower:
            started = time.perf_counter()
            slower, details["speed_check"] = self._speed_check(model, result.model, data, ctx.ep)
            details["speed_check_seconds"] = time.perf_counter() - started
            if slower:
                notes.append(f"int8 does not pay on this model ({slower}); kept the float model. "
                             "Pass quant:keep_if_slower=false to keep int8 anyway")
                return PassResult(model, changed=False, skipped=result.skipped, notes=notes,
                                  details={"mode": "float (int8 slower)", "speed_check": details["speed_check"]})
        details["nodes_quantized"] = result.nodes_quantized
        started = time.perf_counter()
        details["worst_tensors"] = self._worst_tensors(model, result, probe)
        details["report_seconds"] = time.perf_counter() - started
        return PassResult(result.model, changed=True, counts=result.counts, skipped=result.skipped, notes=notes,
                          details=details)

    def _keep_sensitive_float(self, quantize, model, result: StaticResult, data, score, notes: list[str],
                              details: dict, progress: bool) -> StaticResult:
        """auto mode: `result` with its most harmful layers float, until the error budget holds."""
        from .quant_auto import keep_sensitive_float, output_error, score_drop

        error_of, measure = score_drop(model, score, self.options.eval) if score else output_error(model, data)
        kept, sensitivity = keep_sensitive_float(quantize, result, error_of, self.options.max_error, progress)
        notes.append(f"auto: {len(kept)} layer(s) kept float for max_error={self.options.max_error} on the "
                     f"{measure} (now {sensitivity['error_after']:.4g}, all-int8 {sensitivity['error_before']:.4g})")
        details["auto"] = dict(sensitivity, measure=measure)
        return quantize(kept) if kept else result

    @property
    def _symmetric(self) -> bool:
        return self.options.symmetric_activations or self.options.profile == "tensorrt"

    def _plan_options(self, weight_bits: int) -> PlanOptions:
        return PlanOptions(self.options.per_channel, self._symmetric, self.options.exclude, weight_bits=weight_bits)

    def _rewrite(self, model: onnx.ModelProto, floats: set[str], stats: dict, options: PlanOptions) -> StaticResult:
        """Plan and QDQ-rewrite a copy of `model`, leaving the nodes in `options.keep_float` float."""
        model = copy_model(model)
        mask_like = frozenset(n for n, s in stats.items() if s.is_mask_like)
        nodes, tensors, skipped = place(model, options, floats, mask_like)
        groups = smoothing_groups(model, nodes) if self.options.smooth > 0 else {}
        ranges = {t: calibration.compute_range(stats[t], self.options.method, percentile=self.options.percentile,
                                               symmetric=self._symmetric)
                  for t in tensors if t in stats}
        smooth = self._smooth(model, groups, stats, ranges)
        plan = build_plan(model, nodes, tensors, ranges, options, smooth)
        corrected = 0
        if self.options.bias_correction:
            means = {t: st.channel_mean for t, st in stats.items() if st.channel_mean is not None}
            corrected = correct_biases(model, plan, means, smooth)
        counts = QDQInserter(model).apply(plan)
        counts["activations smoothed"] = len(smooth)
        counts["biases corrected"] = corrected
        return StaticResult(model, {k: v for k, v in counts.items() if v}, skipped + plan.skipped,
                            set(plan.activations), len(plan.nodes),
                            [n.output[0] for n in plan.nodes if n.op_type in COMPUTE_OPS])

    @staticmethod
    def _speed_check(float_model, model, data, ep: str) -> tuple[str, list[dict]]:
        """(where int8 lost to float, '' if nowhere; every measurement for the report)."""
        from onnxopt.validation import speed_check

        feeds = data.first_batch()
        checks = speed_check(float_model, model, feeds, ep=ep, min_seconds=0.2, clear_win=1.15, decisive=1.2)
        lost = ", ".join(f"{c.speedup:.2f}x at batch {c.batch}, {c.threads} thread(s)" for c in checks if c.speedup < 1.0)
        return lost, [dict(dataclasses.asdict(c), speedup=c.speedup) for c in checks]

    @staticmethod
    def _report_feeds(data, samples: int = 2) -> dict[str, np.ndarray]:
        """Inputs of the SQNR report: a slice of the calibration data (for sequence models, its
        longest sentence without padding, whose values nobody reads)."""
        from onnxopt.calib_padding import longest_sample

        first = data.first_batch()
        if data.padding is not None:
            return longest_sample(first, data.padding)
        return {k: v[:samples] for k, v in first.items()}

    @staticmethod
    def _worst_tensors(float_model, result: StaticResult, probe: calibration.Probe) -> list[dict]:
        """The 10 quantized activations with the lowest SQNR on the probe input (float values
        recorded by the calibration session when it ran)."""
        errors = compare_tensors(float_model, result.model, probe.feeds, only=result.activations,
                                 reference_values=probe.values)
        return [dataclasses.asdict(e) for e in errors[:10]]

    def _smooth(self, model, groups, stats, ranges) -> dict[str, np.ndarray]:
        """Scales each group's weights by s and records s for its QuantizeLinear; updates `ranges`."""
        if not groups:
            return {}
        view = GraphView(model.graph, model.ir_version)
        names = NameGenerator(model.graph)
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
                model.graph.initializer.append(numpy_helper.from_array((weight * s[:, None]).astype(weight.dtype), name))
                reader.input[1] = name
            # The smoothed activation's exact range follows from the per-channel extremes.
            ranges[tensor] = (min(0.0, float(np.min(st.channel_min / s))), max(0.0, float(np.max(st.channel_max / s))))
            factors[tensor] = s
        return factors
