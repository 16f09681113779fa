"""Refit of the second factors on the factored model's own inputs.

Each matrix is truncated for the inputs the original model gives it, but once the layers before it
are factored too, its inputs X' differ from X. One more pass over the representative data runs the
original and the factored model side by side and accumulates, per factored layer, H' = X'^T X' and
C = X'^T X (Gram matrices only, so memory stays flat in the number of samples). With the first
factor A fixed, the second becomes the least-squares fit of what the layer computed before:

    B = argmin ||X W - X' A B||  =  (A^T H' A + ridge)^-1 A^T C W

which corrects downstream what upstream factors lost (one pass for all layers, not one per layer).
"""
from __future__ import annotations

import numpy as np
import onnx

from onnxopt.fetch import fetching_session
from onnxopt.layer_inputs import features

RIDGE = 1e-6  # of the mean energy of A^T H' A


def paired_grams(reference: onnx.ModelProto, candidate: onnx.ModelProto, layers: dict[str, onnx.NodeProto],
                 batches, progress) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """{key: (X'^T X', X'^T X, positions)} for each layer's input, X from `reference`, X' from `candidate`."""
    names = list(dict.fromkeys(node.input[0] for node in layers.values()))
    sessions = [fetching_session(model, names) for model in (reference, candidate)]
    grams: dict[str, list] = {key: [None, None, 0] for key in layers}
    for feeds in progress(batches, "low-rank refit", "batch", getattr(batches, "num_batches", None)):
        values = []
        for session, fetch in sessions:
            wanted = {i.name for i in session.get_inputs()}
            outputs = session.run([fetch[n] for n in names], {k: v for k, v in feeds.items() if k in wanted})
            values.append(dict(zip(names, outputs)))
        for key, node in layers.items():
            x = features(node, values[0][node.input[0]]).astype(np.float64)
            x_new = features(node, values[1][node.input[0]]).astype(np.float64)
            entry = grams[key]
            if entry[0] is None:
                entry[0], entry[1] = np.zeros((x.shape[1],) * 2), np.zeros((x.shape[1],) * 2)
            entry[0] += x_new.T @ x_new
            entry[1] += x_new.T @ x
            entry[2] += len(x)
    return {k: (v[0], v[1], v[2]) for k, v in grams.items() if v[0] is not None}


def second_factor(a: np.ndarray, w: np.ndarray, gram_new: np.ndarray, cross: np.ndarray) -> np.ndarray:
    """B minimizing ||X W - X' A B|| given the accumulated statistics (see the module docstring)."""
    a64 = a.astype(np.float64)
    lhs = a64.T @ gram_new @ a64
    lhs += RIDGE * max(float(np.mean(np.diag(lhs))), 1e-12) * np.eye(len(lhs))
    return np.linalg.solve(lhs, a64.T @ cross @ w.astype(np.float64)).astype(np.float32)
