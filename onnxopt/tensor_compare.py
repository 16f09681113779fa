"""Tensor-by-tensor comparison of two models on the same inputs (where does a compressed model lose accuracy?).

Tensors are matched by name. A pass that changes how a tensor is represented (quantization keeps
T as QuantizeLinear -> DequantizeLinear) tells the comparison where the candidate holds T's value
through a `TensorView`: the candidate tensor, and a divisor to undo (None for none). Passes offer
views with `Pass.tensor_views`; the comparison itself knows no technique.
SQNR = 10 log10(sum(ref^2) / sum((ref - cand)^2)) dB: higher is better, ~40 dB is near-lossless
int8, below ~20 dB a tensor is hurting.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from .graph import infer_value_info, scopes
from .fetch import fetching_session
from .table import Table
from .validation import run

TensorView = tuple[str, "np.ndarray | None"]


@dataclasses.dataclass
class TensorError:
    tensor: str
    sqnr_db: float
    max_abs_error: float
    cosine: float


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    return {n for n, vi in infer_value_info(model).items()
            if vi.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}


def _values(model: onnx.ModelProto) -> set[str]:
    """Names of the model's inputs and of what its nodes compute, in subgraphs too."""
    names = {i.name for i in model.graph.input}
    for graph, _ in scopes(model):
        names.update(o for node in graph.node for o in node.output)
    return names


def _run_all(model: onnx.ModelProto, names: list[str], feeds, ep: str) -> dict[str, np.ndarray]:
    session, fetch = fetching_session(model, names, ep)
    values = dict(zip([o.name for o in session.get_outputs()], run(session, feeds)))
    return {name: values[fetch[name]] for name in names if fetch.get(name) in values}


def compare_tensors(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict[str, np.ndarray],
                    ep: str = "cpu", only: set[str] | None = None,
                    reference_values: dict[str, np.ndarray] | None = None,
                    views: dict[str, TensorView] | None = None) -> list[TensorError]:
    """Errors of every float tensor the two models share (or of `only` those), worst SQNR first.
    `reference_values`: the reference's tensors on `feeds`, already computed; the reference model
    is run only when they do not cover every tensor compared. `views`: where the candidate holds a
    reference tensor under another name (see the module docstring)."""
    views = views or {}
    produced = _values(candidate)
    ref_names = _values(reference)
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


def error_table(errors: list[TensorError], title: str, limit: int = 10) -> Table:
    """The `limit` worst tensors as a report table."""
    return Table(title, ["tensor (worst first)", "SQNR dB", "max abs err", "cosine"],
                 [[e.tensor[-60:], e.sqnr_db, e.max_abs_error, e.cosine] for e in errors[:limit]],
                 formats=["", ".1f", ".3g", ".5f"])
