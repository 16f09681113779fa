"""Least-squares recovery: a layer that lost some of its input channels is refit, on the
representative data, to compute what it computed with all of them.

With H = [X 1]^T [X 1] over the original inputs (the Gram matrix with the feature sums and the
sample count for an intercept) and W_all = [W; b], the kept features K give
    [W_K'; b'] = (H_KK + ridge)^-1 H_K,all W_all,
the ridge-regularized projection of the original outputs onto what the kept inputs can still say.
A removed channel that was nearly constant is exactly what the intercept absorbs (bias
compensation). Without a bias to update, the refit has no intercept.
"""
from __future__ import annotations

import numpy as np
import onnx

from onnxopt.graph import GraphView, attribute
from onnxopt.layer_inputs import LayerInputStats

from .importance import weight_matrix

REFIT_RIDGE = 1e-4  # of the mean feature energy: keeps the solve stable, barely biases the fit


def bias_of(layer: onnx.NodeProto, view: GraphView) -> tuple[onnx.NodeProto, int] | None:
    """(the node holding the layer's bias, its input index), for MatMul+Add, Gemm and Conv."""
    if layer.op_type in ("Gemm", "Conv"):
        index = 2
        return (layer, index) if len(layer.input) > index and layer.input[index] and \
            view.constant(layer.input[index]) is not None else None
    found = view.bias_add(layer.output[0])
    return found if found is not None and view.constant(found[0].input[found[1]]).ndim <= 1 else None


def refit(st: LayerInputStats, weight: np.ndarray, bias: np.ndarray | None,
          kept_features: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(the weight over the kept features, in its own layout, and the new bias)."""
    w_all = weight_matrix(st.layer, weight).astype(np.float64)  # [F, O]
    features = len(st.gram)
    n = max(st.count, 1)
    if bias is not None:  # the intercept is one more feature, always 1
        h = np.zeros((features + 1, features + 1))
        h[:-1, :-1], h[:-1, -1], h[-1, :-1], h[-1, -1] = st.gram, st.sums, st.sums, n
        target = np.vstack([w_all, bias.astype(np.float64)[None]])
        kept = np.append(kept_features, features)
    else:
        h, target, kept = st.gram.astype(np.float64), w_all, kept_features
    h = h / n
    block = h[np.ix_(kept, kept)] + REFIT_RIDGE * max(float(np.mean(np.diag(h))), 1e-12) * np.eye(len(kept))
    solved = np.linalg.solve(block, h[kept] @ target)
    new_w, new_b = (solved[:-1], solved[-1]) if bias is not None else (solved, None)
    return _as_layout(st.layer, weight, new_w).astype(weight.dtype), None if new_b is None else new_b.astype(bias.dtype)


def _as_layout(layer, original: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """[kept features, outputs] back to the layer's weight layout."""
    if layer.op_type == "Conv":
        return matrix.T.reshape(original.shape[0], -1, *original.shape[2:])  # [O, C, kernel...]
    if layer.op_type == "Gemm" and attribute(layer, "transB", 0):
        return matrix.T
    return matrix
