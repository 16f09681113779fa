"""int8 quantization (`quant`): calibrated static QDQ, dynamic MatMul, and the choice between them.

Static mode runs in three separate steps: calibration (`quant_calibration`: one streaming pass over
the data, statistics cached on disk), planning (`quant_plan`: which tensors, which parameters, from a
per-op table) and rewriting (`quant_qdq`: QuantizeLinear/DequantizeLinear insertion). Activations that
feed MatMul weights are smoothed (SmoothQuant, `smooth` = alpha): outlier channels are scaled down
inside the QuantizeLinear and the weight rows scaled up, which costs no extra node at run time.
Dynamic mode (`quant_dynamic`) quantizes MatMul weights only and lets ORT quantize activations per call.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx
from onnx import numpy_helper

from onnxopt import OnnxoptError, Pass, PassContext, PassResult, option
from onnxopt.graph import GraphView, NameGenerator, infer_value_info
from onnxopt.tensor_compare import compare_tensors

from . import quant_calibration as calibration
from .quant_dynamic import dynamic_candidates, quantize_dynamic
from .quant_int4 import int4_candidates, quantize_int4
from .quant_plan import PlanOptions, build_plan, excluded, place, smoothing_factors, smoothing_groups
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
    smooth: float = option(0.8, "SmoothQuant alpha for activations feeding MatMul weights (0: off)")
    exclude: str = option("", "node names or op types to keep float, ';'-separated; regular expressions allowed")
    samples: int = option(128, "calibration samples to use at most")
    batch_size: int = option(8, "calibration batch size")
    bits: Literal[8, 4] = option(8, "weight bits; 4: int4 weight-only MatMul (blockwise, ORT MatMulNBits)")
    block_size: int = option(32, "int4: weights per scale along the reduction axis (power of two, >= 16)")
    keep_if_slower: bool = option(True, "time int8 against the float input (batch 1 and 8, 1 and 2 threads) "
                                        "and keep the float model if int8 is slower in any of them")

    def __post_init__(self):
        if not 0 <= self.smooth < 1:
            raise ValueError("smooth must be in [0, 1)")
        if not 50 < self.percentile <= 100:
            raise ValueError("percentile must be in (50, 100]")
        if self.samples < 1 or self.batch_size < 1:
            raise ValueError("samples and batch_size must be >= 1")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError("block_size must be a power of two >= 16")


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
            return self._dynamic(model, notes)
        return self._static(model, ctx, notes)

    def _dynamic(self, model: onnx.ModelProto, notes: list[str]) -> PassResult:
        nodes = [n for n in dynamic_candidates(model) if not excluded(n, self.options.exclude)]
        count = quantize_dynamic(model, nodes, self.options.per_channel)
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
        data = open_calibration(ctx.calibration, model, batch_size=self.options.batch_size,
                                samples=self.options.samples)
        plan_options = PlanOptions(self.options.per_channel, self.options.symmetric_activations, self.options.exclude)
        floats = {n for n, vi in infer_value_info(model).items()
                  if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
        nodes, tensors, skipped = place(model, plan_options, floats)
        if not nodes:
            return PassResult(model, changed=False, skipped=skipped + ["nothing quantizable"], notes=notes)
        groups = smoothing_groups(model, nodes) if self.options.smooth > 0 else {}
        stats = calibration.load_or_collect(model, tensors, data, ctx.cache_dir, ep="cpu", progress=ctx.progress,
                                            channel_tensors=groups)
        mask_like = {n for n, s in stats.items() if s.is_mask_like}
        if mask_like:
            nodes, tensors, skipped = place(model, plan_options, floats, mask_like)
            groups = {t: [n for n in g if n in nodes] for t, g in groups.items() if t not in mask_like}
        ranges = {t: calibration.compute_range(stats[t], self.options.method, percentile=self.options.percentile,
                                               symmetric=self.options.symmetric_activations)
                  for t in tensors if t in stats}
        smooth = self._smooth(model, groups, stats, ranges)
        plan = build_plan(model, nodes, tensors, ranges, plan_options, smooth)
        float_model = onnx.ModelProto()
        float_model.CopyFrom(model)
        counts = QDQInserter(model).apply(plan)
        counts["activations smoothed"] = len(smooth)
        counts = {k: v for k, v in counts.items() if v}
        if self.options.keep_if_slower:
            slower = self._slower_than_float(float_model, model, data, ctx.ep)
            if slower:
                notes.append(f"int8 does not pay on this model ({slower}); kept the float model. "
                             "Pass quant:keep_if_slower=false to keep int8 anyway")
                return PassResult(float_model, changed=False, skipped=skipped, notes=notes,
                                  details={"mode": "float (int8 slower)"})
        details = {"mode": "static", "method": self.options.method, "calibration": data.description,
                   "calibration_samples": data.num_samples, "nodes_quantized": len(plan.nodes),
                   "worst_tensors": self._worst_tensors(float_model, model, data, set(plan.activations))}
        return PassResult(model, changed=True, counts=counts, skipped=skipped + plan.skipped, notes=notes,
                          details=details)

    @staticmethod
    def _slower_than_float(float_model, model, data, ep: str) -> str:
        """'' when int8 is at least as fast everywhere measured, else where it lost."""
        from onnxopt.validation import speed_check

        feeds = next(iter(data))
        checks = speed_check(float_model, model, feeds, ep="cpu" if ep not in ("cpu",) else ep)
        lost = [c for c in checks if c.speedup < 1.0]
        return ", ".join(f"{c.speedup:.2f}x at batch {c.batch}, {c.threads} thread(s)" for c in lost)

    @staticmethod
    def _worst_tensors(float_model, model, data, tensors: set[str], samples: int = 2) -> list[dict]:
        """The 10 quantized activations with the lowest SQNR on a slice of the calibration data."""
        first = next(iter(data))
        feeds = {k: v[:samples] for k, v in first.items()}
        # `float_model` holds the smoothed weights: its activations are the ones QDQ approximates
        errors = compare_tensors(float_model, model, feeds, only=tensors)
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
            weights = [view.constant(r.input[1]) for r in readers]
            s = smoothing_factors(np.maximum(np.abs(st.channel_min), np.abs(st.channel_max)), weights,
                                  self.options.smooth)
            for reader, weight in zip(readers, weights):
                name = names(reader.input[1] + "_smoothed")
                model.graph.initializer.append(numpy_helper.from_array((weight * s[:, None]).astype(weight.dtype), name))
                reader.input[1] = name
            # The smoothed activation's exact range follows from the per-channel extremes.
            ranges[tensor] = (min(0.0, float(np.min(st.channel_min / s))), max(0.0, float(np.max(st.channel_max / s))))
            factors[tensor] = s
        return factors
