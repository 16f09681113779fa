"""Unstructured and N:M sparsity: weights set to zero in place, no mask tensors, recorded in the model.

Each Conv/MatMul/Gemm with a constant float weight loses its lowest-scoring values: by magnitude
|W| without data, by |W| * ||x_k|| with representative data (Wanda: the weight times the norm of the
input feature it multiplies, compared within each output's row of weights). Unstructured sparsity
zeros `ratio` of each row; N:M zeros the N lowest of every M consecutive weights along the reduction
axis (input features), the pattern sparse tensor cores run (TensorRT, 2:4 on Ampere and newer).
With data and `recover` (default), the weights that stay are refit by least squares on the input
Gram matrix to compute what the layer computed with all of them (each output on its own kept inputs).
The file does not grow (its zeros compress); ONNX Runtime's CPU kernels run the zeros as numbers,
so there is no speed-up there, and the report says so. `onnxopt.sparsity` records each layer.
"""
from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import numpy_helper

from onnxopt import PassResult, Table
from onnxopt import sparsity as records
from onnxopt.graph import GraphView, nested_layers_note
from onnxopt.layer_inputs import collect



def reduction_axis(node: onnx.NodeProto, weight: np.ndarray) -> int | None:
    if node.op_type == "Conv" and weight.ndim >= 3:
        return 1
    if node.op_type == "MatMul" and weight.ndim == 2:
        return 0
    if node.op_type == "Gemm" and weight.ndim == 2:
        return 1 if any(a.name == "transB" and a.i for a in node.attribute) else 0
    return None


def sparsify(model: onnx.ModelProto, ctx, options) -> PassResult:
    view = GraphView(model.graph, model.ir_version)
    patterns = [p for p in options.exclude.split(";") if p]
    layers, shared = [], []
    for node in model.graph.node:
        weight = view.constant(node.input[1]) if node.domain in ("", "ai.onnx") and len(node.input) > 1 else None
        if weight is None or weight.dtype.kind != "f":
            continue
        if len(view.consumers.get(node.input[1], [])) > 1 or node.input[1] not in view.initializers:
            shared.append(node.name or node.output[0])  # its zeros would be chosen for one reader's inputs
            continue
        axis = reduction_axis(node, weight)
        if axis is None or any(re.fullmatch(p, node.name or "") or p == node.name for p in patterns):
            continue
        layers.append((node, axis))
    skipped = [f"{name}: its weight is read by other nodes too (or lives in an enclosing graph)" for name in shared]
    nested = nested_layers_note(model, {"Conv", "Gemm", "MatMul"}, "prune")
    if not layers:
        return PassResult(model, changed=False, skipped=["no prunable layer"] + skipped[:20], notes=nested)
    n_m = tuple(map(int, options.structure.split(":"))) if ":" in options.structure else None
    ratio = options.ratio if options.ratio is not None else 0.5
    stats = {}
    notes = nested + ["N:M and unstructured zeros give no speed on ONNX Runtime's CPU kernels, only a smaller "
                      "compressed file (and speed on runtimes with sparse kernels: TensorRT runs 2:4)"]
    if ctx.data is not None:
        batches = ctx.data.batches(model, options.batch_size, options.samples, trim_padding=True)
        recover = options.recover if options.recover is not None else True
        stats = collect(model, {node.input[1]: node for node, _ in layers}, batches, ctx.progress, gram=recover,
                        label="pruning statistics")
    else:
        notes.append("no representative data: weights chosen by magnitude")
    written = records.read(model)
    rows = []
    for node, axis in layers:
        name = node.input[1]
        weight = view.constant(name)
        scores = np.abs(weight.astype(np.float64))
        st = stats.get(name)
        if st is not None:  # Wanda: |W| times the norm of the input feature it multiplies
            norms = np.sqrt(st.channel_sumsq / max(st.count, 1))
            shape = [1] * weight.ndim
            shape[axis] = -1
            scores = scores * norms.reshape(shape)
        if n_m is not None and weight.shape[axis] % n_m[1]:
            rows.append([records.layer_key(node), "-", f"the reduction axis ({weight.shape[axis]}) is not a multiple of {n_m[1]}"])
            continue
        mask = _nm_mask(scores, axis, *n_m) if n_m else _row_mask(scores, axis, ratio)
        if st is not None and st.gram is not None:
            pruned = _refit_kept(weight, mask, node, st)
        else:
            pruned = np.where(mask, np.zeros_like(weight), weight)
        model.graph.initializer.remove(view.initializers[name])
        model.graph.initializer.append(numpy_helper.from_array(pruned, name))
        sparsity, holds = records.measure(pruned, options.structure if n_m else "unstructured", axis)
        written[records.layer_key(node)] = {"pattern": options.structure if n_m else "unstructured", "axis": axis,
                                            "sparsity": round(sparsity, 6)}
        rows.append([records.layer_key(node), f"{sparsity:.3f}", "holds" if holds else "BROKEN"])
    records.write(model, written)
    changed = sum(1 for r in rows if r[1] != "-")
    return PassResult(model, changed=changed > 0, counts={"layers sparsified": changed}, notes=notes,
                      skipped=skipped[:20],
                      details={"pattern": options.structure, "ratio": None if n_m else ratio},
                      tables=[Table("sparsity per layer", ["layer", "zeros", "pattern"], rows)])


REFIT_DAMP = 0.01  # of the mean input energy added to H (SparseGPT's damping): few samples stay well posed
REFIT_CHUNK = 16  # output columns solved at once


def _as_features(weight: np.ndarray, node: onnx.NodeProto) -> np.ndarray:
    """The weight as [input features, outputs], features ordered as `onnxopt.layer_inputs.features`."""
    if node.op_type == "Conv":
        return weight.reshape(weight.shape[0], -1).T
    if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
        return weight.T
    return weight


def _refit_kept(weight: np.ndarray, mask: np.ndarray, node: onnx.NodeProto, st) -> np.ndarray:
    """Zeros the masked weights and refits the kept ones of each output by least squares on the data:
    with H = X^T X, output j's kept features K get w'_K = (H_KK + damping)^-1 (H w)_K, the best a
    weight with those zeros can do on these inputs. (SparseGPT's one-pass OBS update approximates this
    with a fixed feature order; measured here it leaves 17x the error of the exact refit on correlated
    inputs.) Columns with as many kept weights are solved together, a chunk at a time."""
    w = _as_features(weight, node).astype(np.float64)
    zero = _as_features(mask, node)
    h = st.gram / max(st.count, 1)
    target = h @ w
    h = h + REFIT_DAMP * max(float(np.mean(np.diag(h))), 1e-12) * np.eye(len(h))
    result = np.zeros_like(w)
    kept = ~zero
    counts = kept.sum(axis=0)
    for count in np.unique(counts):
        columns = np.flatnonzero(counts == count)
        if count == 0:
            continue
        for start in range(0, len(columns), REFIT_CHUNK):
            chunk = columns[start:start + REFIT_CHUNK]
            rows = np.stack([np.flatnonzero(kept[:, j]) for j in chunk])  # [c, count]
            systems = h[rows[:, :, None], rows[:, None, :]]
            rhs = target[rows, chunk[:, None]]
            try:
                result[rows, chunk[:, None]] = np.linalg.solve(systems, rhs[..., None])[..., 0]
            except np.linalg.LinAlgError:
                result[rows, chunk[:, None]] = w[rows, chunk[:, None]]
    out = result.astype(weight.dtype)
    if node.op_type == "Conv":
        return out.T.reshape(weight.shape)
    return out.T if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute) else out


def _row_mask(scores: np.ndarray, axis: int, ratio: float) -> np.ndarray:
    """True where a weight goes: the `ratio` lowest of the weights each output reads (Wanda's
    comparison group). The output axis is the one that is not the reduction axis of a 2-D weight, or
    a Conv's axis 0."""
    out_axis = 1 if scores.ndim == 2 and axis == 0 else 0
    per_output = np.moveaxis(scores, out_axis, 0)
    flat = per_output.reshape(per_output.shape[0], -1)
    order = np.argsort(flat, axis=1, kind="stable")
    mask = np.zeros_like(flat, dtype=bool)
    np.put_along_axis(mask, order[:, :int(np.floor(flat.shape[1] * ratio))], True, axis=1)
    return np.moveaxis(mask.reshape(per_output.shape), 0, out_axis)


def _nm_mask(scores: np.ndarray, axis: int, n: int, m: int) -> np.ndarray:
    moved = np.moveaxis(scores, axis, -1)
    groups = moved.reshape(-1, m)
    order = np.argsort(groups, axis=1, kind="stable")
    mask = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(mask, order[:, :n], True, axis=1)
    return np.moveaxis(mask.reshape(moved.shape), -1, axis)
