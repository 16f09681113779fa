"""Tensor-by-tensor comparison of two models on the same inputs (where does a quantized model lose accuracy?).

Tensors are matched by name. When the candidate quantizes a tensor T (QuantizeLinear(T) followed by a
DequantizeLinear), the candidate's side is the dequantized value, so the error measured is the one
its readers actually see. SQNR = 10 log10(sum(ref^2) / sum((ref - cand)^2)) dB: higher is better,
~40 dB is near-lossless int8, below ~20 dB a tensor is hurting.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from .runtime import session_with_outputs
from .validation import run


@dataclasses.dataclass
class TensorError:
    tensor: str
    sqnr_db: float
    max_abs_error: float
    cosine: float


def _dequantized_views(model: onnx.ModelProto) -> dict[str, tuple[str, np.ndarray | None]]:
    """T -> (the output of a DequantizeLinear fed by QuantizeLinear(T), the divisor to undo).

    A smoothed activation is quantized as QuantizeLinear(Mul(T, 1/s)): its DequantizeLinear yields
    T / s, so the comparison multiplies it back by s (divides by the Mul's constant)."""
    from .graph import GraphView

    view = GraphView(model.graph, model.ir_version)
    q_of: dict[str, tuple[str, np.ndarray | None]] = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        source, divisor = node.input[0], None
        mul = view.producer.get(source)
        if mul is not None and mul.op_type == "Mul" and view.single_consumer(source) is node:
            constant = next((i for i in (1, 0) if view.constant(mul.input[i]) is not None), None)
            if constant is not None:
                source, divisor = mul.input[1 - constant], view.constant(mul.input[constant])
        q_of[node.output[0]] = (source, divisor)
    views = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in q_of:
            source, divisor = q_of[node.input[0]]
            views.setdefault(source, (node.output[0], divisor))
    return views


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    from .graph import infer_value_info

    return {n for n, vi in infer_value_info(model).items()
            if vi.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}


def _run_all(model: onnx.ModelProto, names: list[str], feeds, ep: str) -> dict[str, np.ndarray]:
    session = session_with_outputs(model, names, ep)
    return dict(zip([o.name for o in session.get_outputs()], run(session, feeds)))


def compare_tensors(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict[str, np.ndarray],
                    ep: str = "cpu", only: set[str] | None = None,
                    reference_values: dict[str, np.ndarray] | None = None) -> list[TensorError]:
    """Errors of every float tensor the two models share (or of `only` those), worst SQNR first.
    `reference_values`: the reference's tensors on `feeds`, already computed; the reference model
    is run only when they do not cover every tensor compared."""
    views = _dequantized_views(candidate)
    produced = {o for n in candidate.graph.node for o in n.output} | {i.name for i in candidate.graph.input}
    ref_names = {o for n in reference.graph.node for o in n.output} | {i.name for i in reference.graph.input}
    ref_names = sorted((ref_names & only) if only is not None else (ref_names & _float_tensors(reference)))
    pairs = [(t, *views.get(t, (t, None))) for t in ref_names if t in views or t in produced]
    if not pairs:
        return []
    ref_values = reference_values or {}
    if any(p[0] not in ref_values for p in pairs):
        ref_values = _run_all(reference, [p[0] for p in pairs], feeds, ep)
    cand_values = _run_all(candidate, [p[1] for p in pairs], feeds, ep)
    errors = []
    for ref_name, cand_name, divisor in pairs:
        got = np.asarray(cand_values[cand_name], np.float64)
        if divisor is not None:
            got = got / divisor
        ref = np.asarray(ref_values[ref_name], np.float64).ravel()
        got = got.ravel()
        if ref.shape != got.shape or not ref.size:
            continue
        noise = float(np.sum((ref - got) ** 2))
        signal = float(np.sum(ref ** 2))
        sqnr = float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-30) / noise)
        norm = np.linalg.norm(ref) * np.linalg.norm(got)
        errors.append(TensorError(ref_name, sqnr, float(np.max(np.abs(ref - got))),
                                  float(ref @ got / norm) if norm else 1.0))
    return sorted(errors, key=lambda e: e.sqnr_db)


def render_errors(errors: list[TensorError], limit: int = 10) -> str:
    from .report import format_table

    rows = [[e.tensor[-60:], f"{e.sqnr_db:.1f}", f"{e.max_abs_error:.3g}", f"{e.cosine:.5f}"] for e in errors[:limit]]
    return format_table(rows, ["tensor (worst first)", "SQNR dB", "max abs err", "cosine"])
