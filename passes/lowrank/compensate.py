"""`lowrank:compensate=true`: a low-rank correction of int4 weight error (LQER-style).

After `quant:bits=4` every quantized MatMul is an ORT MatMulNBits computing x @ Q, Q the int4
dequantized weight. With W the float weight it came from (found in the pipeline's input model, as it
is or times one scalar that an earlier `fuse` folded in, and checked: it must requantize to the very
same bytes), the error E = W - Q is spread over the whole
matrix but its effect on the layer's real inputs is concentrated in a few directions. The whitened
truncated SVD of E (the same decomposition `lowrank` factors weights with: whitened by the Cholesky
factor of the inputs' covariance, the inputs' mean going to a bias) gives A [K, r], B [r, N] with
x @ (Q + A B) closest to x @ W on the representative data; the graph gains
y = MatMulNBits(x) + (x @ A) @ B (+ bias) beside each int4 MatMul.

The rank is `rank=` for every matrix, or chosen per matrix by the error budget among `ranks`
(output error against the pipeline's input); without either, the budget aims at a quarter of int4's
own output error (DEFAULT_ERROR_SHARE). The correction costs time (two thin MatMuls per layer) by design: it is not held to
the speed guard; the report says what it adds.
"""
from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxopt import OnnxoptError, PassContext, PassResult, Table
from onnxopt.blockwise import dequantize_blockwise, quantize_blockwise
from onnxopt.graph import GraphView, attribute
from onnxopt.layer_inputs import collect
from onnxopt.manager import copy_model
from onnxopt.surgery import constants_to_initializers, remove_unused_initializers

from .factor import Decomposition, Layer, decompose

CORRECTION_MARK = "/int4_correction"  # in the names of the correction's nodes and weights
# Without max_error, the budget aims at this share of int4's own output error. The budget measures on
# ~16 samples, which flatters the corrections: on MiniLM, halving the error there closed only 46 % of
# the cosine gap on 300 held-out sentences.
DEFAULT_ERROR_SHARE = 0.25


def compensate(model: onnx.ModelProto, ctx: PassContext, options) -> PassResult:
    if ctx.data is None:
        raise OnnxoptError("lowrank:compensate=true needs representative data", "give calib data")
    constants_to_initializers(model.graph)
    view = GraphView(model.graph, model.ir_version)
    int4 = [n for n in model.graph.node if n.op_type == "MatMulNBits" and attribute(n, "bits", 4) == 4]
    if not int4:
        raise OnnxoptError("lowrank:compensate=true: the model has no int4 MatMul (MatMulNBits) to correct",
                           "run quant:bits=4 before it in the same pipeline, e.g. -p quant:bits=4,lowrank:compensate=true")
    skipped: list[str] = []
    todo = [n for n in int4 if not _corrected(n, view, skipped)]
    if not todo:
        return PassResult(model, changed=False, skipped=skipped[:40])
    reference = ctx.reference.model if ctx.reference is not None else model
    ref_view = GraphView(reference.graph, reference.ir_version)
    layers = []
    for node in todo:
        error, why = _int4_error(node, view, ref_view)
        if error is None:
            skipped.append(f"{node.name or node.output[0]}: {why}")
        else:
            layers.append(Layer(node.input[1], [node], error))
    if not layers:
        raise OnnxoptError("lowrank:compensate=true: no float weight found for any int4 MatMul in the pipeline's "
                           f"input ({skipped[0]})", "run quant:bits=4 and lowrank:compensate=true in one pipeline, "
                           "on the float model")
    batches = ctx.data.batches(model, options.batch_size, options.samples, trim_padding=True)
    keyed = {str(i): layer.nodes[0] for i, layer in enumerate(layers)}
    stats = collect(model, keyed, batches, ctx.progress, label="int4 error statistics")
    decompositions = [decompose(layer, stats.get(str(i)), "whitened")
                      for i, layer in enumerate(ctx.progress(layers, "factoring int4 error", "matrix"))]

    def build(chosen: dict[int, int]) -> onnx.ModelProto:
        result = copy_model(model)
        for i, rank in chosen.items():
            _add_correction(result, layers[i], rank, decompositions[i])
        remove_unused_initializers(result.graph)
        return result

    notes: list[str] = []
    details: dict = {"mode": "int4 error compensation"}
    if options.rank is not None:
        chosen = {i: min(options.rank, *layer.matrix.shape) for i, layer in enumerate(layers)}
    else:
        chosen = _budget(model, layers, options, build, batches, ctx, notes, details)
    if not chosen:
        return PassResult(model, changed=False, skipped=skipped[:40], notes=notes, details=details)
    result = build(chosen)
    added = sum(r * sum(layers[i].matrix.shape) for i, r in chosen.items())
    details["ranks"] = {layers[i].nodes[0].name or layers[i].weight: r for i, r in chosen.items()}
    notes.append(f"the corrections add {added:,} float weights and two thin MatMuls per corrected layer: slower than "
                 "int4 alone by design (not held to the speed guard)")
    return PassResult(result, changed=True, counts={"int4 matrices corrected": len(chosen), "weights added": added},
                      skipped=skipped[:40], notes=notes, details=details, tables=[_table(layers, chosen)])


def _corrected(node: onnx.NodeProto, view: GraphView, skipped: list[str]) -> bool:
    """Whether `node` already has a correction beside it (the pass is idempotent)."""
    if any(CORRECTION_MARK in c.name for c in view.consumers.get(node.output[0], [])):
        skipped.append(f"{node.name or node.output[0]}: corrected already")
        return True
    return False


def _int4_error(node: onnx.NodeProto, view: GraphView, ref_view: GraphView) -> tuple[np.ndarray | None, str]:
    """W - Q for the MatMulNBits `node`, W found in the reference model `ref_view` shows; or None and why not."""
    if len(node.input) > 3 and any(node.input[3:]):
        return None, "MatMulNBits with zero points or other extra inputs (not quant's layout)"
    packed, scales = view.constant(node.input[1]), view.constant(node.input[2])
    k, n, block = attribute(node, "K", 0), attribute(node, "N", 0), attribute(node, "block_size", 0)
    if packed is None or scales is None or packed.dtype != np.uint8 or packed.ndim != 3:
        return None, "its int4 weight is not a constant"
    for weight in _float_sources(node, ref_view, k, n):
        source, quantized = weight, quantize_blockwise(weight, block)
        if not _same_int4(quantized, packed, scales):
            source = _rescaled(weight, quantized[1], scales)
            if source is None or not _same_int4(quantize_blockwise(source, block), packed, scales):
                continue
        return source - dequantize_blockwise(packed, scales, k), ""
    return None, "no float weight in the pipeline's input quantizes to its int4 weight"


def _same_int4(quantized: tuple[np.ndarray, np.ndarray], packed: np.ndarray, scales: np.ndarray) -> bool:
    return np.array_equal(quantized[0], packed) and np.allclose(quantized[1], scales, rtol=1e-6, atol=0)


def _rescaled(weight: np.ndarray, own: np.ndarray, scales: np.ndarray) -> np.ndarray | None:
    """`weight` (whose block scales are `own`) times the one scalar that maps them onto `scales`, or
    None when no single scalar does: `fuse` folds a scalar Mul (an attention scale) into a weight
    before `quant` sees it, so the pipeline's input holds that weight unscaled. The requantization
    check then decides."""
    ratio = scales.astype(np.float64) / np.maximum(own, 1e-30)
    if not np.allclose(ratio, ratio.flat[0], rtol=1e-5, atol=0) or np.isclose(ratio.flat[0], 1.0, rtol=1e-7):
        return None
    return (weight * np.float32(ratio.flat[0])).astype(np.float32)


def _float_sources(node: onnx.NodeProto, ref_view: GraphView, k: int, n: int):
    """Float [K, N] weights of the reference that may be the one `node` quantized: the weight of the
    MatMul writing the same output, then the initializer the int4 tensor was named after."""
    names = [p.input[1] for p in ref_view.graph.node
             if p.op_type == "MatMul" and p.output and p.output[0] == node.output[0] and len(p.input) > 1]
    names.append(re.sub(r"_int4(_\d+)?$", "", node.input[1]))
    for name in dict.fromkeys(names):
        weight = ref_view.constant(name)
        if weight is not None and weight.dtype == np.float32 and weight.shape == (k, n):
            yield weight


def _add_correction(model: onnx.ModelProto, layer: Layer, rank: int, decomposition: Decomposition) -> None:
    """y = MatMulNBits(x) + (x @ A) @ B (+ the inputs' mean share as a bias), in `model`."""
    a, b = decomposition.factors(rank)
    shift = decomposition.shift(layer.matrix, a, b)
    node = next(n for n in model.graph.node if n.output and n.output[0] == layer.nodes[0].output[0])
    stem, base, out = f"{layer.weight}{CORRECTION_MARK}_r{rank}", node.name or node.output[0], node.output[0]
    tensors = {f"{stem}_a": a, f"{stem}_b": b, **({f"{stem}_bias": shift} if shift is not None else {})}
    model.graph.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in tensors.items())
    int4_out, middle, correction = f"{out}/int4", f"{out}{CORRECTION_MARK}_mid", f"{out}{CORRECTION_MARK}"
    node.output[0] = int4_out
    added = [helper.make_node("MatMul", [node.input[0], f"{stem}_a"], [middle], name=f"{base}{CORRECTION_MARK}_a"),
             helper.make_node("MatMul", [middle, f"{stem}_b"], [correction], name=f"{base}{CORRECTION_MARK}_b")]
    if shift is not None:
        added.append(helper.make_node("Add", [correction, f"{stem}_bias"], [f"{correction}_biased"],
                                      name=f"{base}{CORRECTION_MARK}_bias"))
        correction = f"{correction}_biased"
    added.append(helper.make_node("Add", [int4_out, correction], [out], name=f"{base}{CORRECTION_MARK}"))
    nodes = list(model.graph.node)
    position = next(i for i, n in enumerate(nodes) if n is node) + 1
    nodes[position:position] = added
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _budget(model, layers, options, build, batches, ctx, notes, details) -> dict[int, int]:
    """Per matrix, the smallest rank among `options.ranks` that keeps the output error within
    max_error (by default DEFAULT_ERROR_SHARE of int4's own)."""
    from onnxopt import budget

    error_of, measure = budget.output_error(ctx.reference.model if ctx.reference is not None else model, batches)
    int4_error = error_of(model)
    max_error = options.max_error if options.max_error is not None else int4_error * DEFAULT_ERROR_SHARE
    if int4_error <= max_error:
        notes.append(f"int4 alone is within max_error {max_error:.4g} on the {measure} ({int4_error:.4g}): "
                     "nothing to correct")
        return {}
    ranks = {i: sorted({min(r, *layer.matrix.shape) for r in options.ranks}, reverse=True)
             for i, layer in enumerate(layers)}

    class Corrections:  # strength 0: the largest rank (the least error); the last: no correction
        def units(self):
            return [str(i) for i in ranks]

        def strengths(self, unit):
            return (*ranks[int(unit)], None)

        def build(self, strengths):
            return build({i: ranks[i][s] for i in ranks if (s := strengths[str(i)]) < len(ranks[i])})

    fit = budget.fit(Corrections(), error_of, max_error, ctx.progress)
    target = "max_error" if options.max_error is not None else f"{DEFAULT_ERROR_SHARE:.0%} of int4's error,"
    notes.append(f"error budget ({target} {max_error:.4g}) on the {measure}: {fit.error_after:.4g} after correction, "
                 f"{int4_error:.4g} int4 alone; {fit.evaluations} models measured")
    if fit.error_after > max_error:
        notes.append(f"the largest ranks allowed ({max(options.ranks)}) do not reach the budget")
    details.update(max_error=max_error, error=fit.error_after, int4_error=int4_error)
    return {i: ranks[i][s] for i in ranks if (s := fit.strengths[str(i)]) < len(ranks[i])}


def _table(layers: list[Layer], chosen: dict[int, int]) -> Table:
    rows = []
    for i, rank in chosen.items():
        k, n = layers[i].matrix.shape
        rows.append([(layers[i].nodes[0].name or layers[i].weight)[:60], f"{k}x{n}", rank, rank * (k + n) / (k * n)])
    return Table("int4 error corrections", ["layer", "K x N", "rank", "weights added / K*N"], rows,
                 formats=["", "", "", ".3f"])
