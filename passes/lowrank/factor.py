"""Which layers can be factored, their decompositions, and the graph rewrite to two thinner layers.

A layer is a constant float weight W read as x @ W ([K, N]: K input features, N outputs) by one or
more MatMul, Gemm (transA=0; transB and alpha folded into W) or Conv nodes. At rank r it becomes
x @ A @ B with A [K, r] and B [r, N]: r * (K + N) weights instead of K * N, so it can only pay when
r < K * N / (K + N).

A 2-D Conv with an [N, C, kh, kw] weight is the same product over im2col features (K = C * kh * kw,
ordered channel-major as `onnxopt.layer_inputs.features` lays them out): A becomes a kh x kw Conv
to r channels that keeps the strides, pads and dilations, B a 1x1 Conv holding the bias.

The decomposition minimizes the error on the layer's own inputs where data is given:
- whitened (default with data): with the Gram matrix H = X^T X = L L^T of the layer's inputs on the
  representative data, ||X (W - A B)||_F = ||L^T (W - A B)||_F, so the truncated SVD of L^T W gives the
  best rank-r factors for those inputs (SVD-LLM's truncation-aware whitening): A = L^-T U_r, B = S_r V_r^T.
  The singular values of L^T W say how much output energy each rank carries (`energy=`).
- asvd: the input channels scaled by their RMS ** 0.5 before the SVD (ASVD's activation-aware scaling).
- svd: plain truncated SVD of W (no data needed).
The singular values are split evenly between the factors (sqrt on each side), which keeps both
factors' ranges alike for a later int8 quantization.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxopt.graph import GraphView, attribute
from onnxopt.layer_inputs import LayerInputStats

WHITEN_RIDGE = 1e-6  # of the mean input energy: keeps the Cholesky factor defined for dead channels
ASVD_ALPHA = 0.5
FACTOR_MARK = "/lowrank_r"  # in the names of the factors' weights: <weight>/lowrank_r<rank>_a and _b


@dataclasses.dataclass
class Layer:
    weight: str
    nodes: list[onnx.NodeProto]
    matrix: np.ndarray  # [K, N], as x @ matrix (Gemm's alpha and transB folded in)
    kernel: tuple[int, ...] = (1, 1)  # a Conv's kernel: its weight is [N, K / (kh * kw), kh, kw]

    @property
    def conv_shape(self) -> tuple[int, ...]:
        """The Conv weight shape of rank-`matrix.shape[1]` (for a Conv layer)."""
        k, n = self.matrix.shape
        return (n, k // int(np.prod(self.kernel)), *self.kernel)

    @property
    def name(self) -> str:
        return self.nodes[0].name or self.weight

    @property
    def break_even(self) -> float:
        """The rank at which the two factors hold as many weights as W."""
        k, n = self.matrix.shape
        return k * n / (k + n)

    def rank_for(self, kept: float) -> int:
        """The smallest rank keeping at least `kept` of W's parameters (so `kept` = 1 never pays)."""
        return max(1, int(np.ceil(kept * self.break_even - 1e-9)))


def eligible(model: onnx.ModelProto, view: GraphView, ops: set[str]) -> tuple[list[Layer], list[str]]:
    """The factorable layers of the main graph (a shared weight once, with all its nodes) and why
    the other constant-weight layers are not."""
    by_weight: dict[str, list[tuple[onnx.NodeProto, np.ndarray]]] = {}
    skipped: list[str] = []
    other_types: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv") or node.op_type not in ops or len(node.input) < 2:
            continue
        weight = view.constant(node.input[1])
        if weight is None or view.constant(node.input[0]) is not None:
            continue
        if FACTOR_MARK in node.input[1]:
            continue  # a factor already: factoring it again would only lose accuracy
        if weight.dtype != np.float32:
            other_types.setdefault(str(weight.dtype), []).append(node.name or node.output[0])
            continue
        matrix, why = _as_matrix(node, weight)
        if matrix is None:
            skipped.append(f"{node.name or node.output[0]}: {why}")
            continue
        by_weight.setdefault(node.input[1], []).append((node, matrix))
    skipped += [f"{len(names)} layer(s) with {dtype} weights, e.g. '{names[0]}': lowrank factors float32 weights"
                for dtype, names in other_types.items()]
    layers = []
    for name, uses in by_weight.items():
        readers = view.consumers.get(name, [])
        if len(readers) != len(uses) or len({(n.op_type, m.tobytes()) for n, m in uses}) != 1:
            skipped.append(f"{uses[0][0].name or name}: its weight is also read in another way")
            continue
        weight_shape = view.constant(name).shape
        kernel = tuple(weight_shape[2:]) if uses[0][0].op_type == "Conv" else (1, 1)
        layers.append(Layer(name, [n for n, _ in uses], uses[0][1], kernel))
    return layers, skipped


def _as_matrix(node: onnx.NodeProto, weight: np.ndarray) -> tuple[np.ndarray | None, str]:
    if node.op_type == "MatMul":
        return (weight, "") if weight.ndim == 2 else (None, f"{weight.ndim}-D weight")
    if node.op_type == "Gemm":
        if attribute(node, "transA", 0):
            return None, "Gemm with transA"
        w = weight.T if attribute(node, "transB", 0) else weight
        return (w * np.float32(attribute(node, "alpha", 1.0))).astype(np.float32), ""
    if weight.ndim != 4:
        return None, f"{weight.ndim - 2}-D Conv (2-D Convs are factored)"
    if attribute(node, "group", 1) != 1:
        return None, "grouped Conv"
    if attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        return None, "Conv with auto_pad SAME (explicit pads only)"
    if attribute(node, "kernel_shape", None) is None:
        return None, "Conv without a kernel_shape attribute"
    return weight.reshape(weight.shape[0], -1).T, ""


@dataclasses.dataclass
class Decomposition:
    """W ~ left[:, :r] @ right[:r] for any r; `spectrum` holds the singular values the truncation
    ranks by (in the whitened space for method=whitened). With `mean` (the inputs' mean on the data),
    the truncation was made for the centered inputs, and the bias takes the mean's share:
    E[x] @ (W - A B), so that the error left is the part of the inputs that varies."""
    left: np.ndarray  # [K, m] float64
    right: np.ndarray  # [m, N] float64
    spectrum: np.ndarray  # [m]
    mean: np.ndarray | None = None  # [K]

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        return self.left[:, :rank].astype(np.float32), self.right[:rank].astype(np.float32)

    def shift(self, matrix: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
        """What the bias gains: the mean input's output lost by the factors."""
        if self.mean is None:
            return None
        return (self.mean @ (matrix.astype(np.float64) - a.astype(np.float64) @ b)).astype(np.float32)

    def rank_for_energy(self, energy: float) -> int:
        """The smallest rank whose singular values hold `energy` of the total squared."""
        cumulative = np.cumsum(self.spectrum ** 2)
        return int(np.searchsorted(cumulative, energy * cumulative[-1]) + 1)


def decompose(layer: Layer, stats: LayerInputStats | None, method: str,
              right: np.ndarray | None = None) -> Decomposition:
    """`right` (method=whitened): the output metric's factor R (`downstream.py`), a vector for a
    diagonal one; the truncation then minimizes ||L^T (W - A B) R|| instead of ||L^T (W - A B)||."""
    w = layer.matrix.astype(np.float64)
    if method == "whitened" and stats is not None and stats.gram is not None and stats.count:
        mean = stats.sums / stats.count
        h = stats.gram / stats.count - np.outer(mean, mean)  # the covariance: the mean goes to the bias
        h = h + WHITEN_RIDGE * max(float(np.mean(np.diag(h))), 1e-12) * np.eye(len(h))
        chol = np.linalg.cholesky(h)  # h = chol @ chol.T
        if right is not None:
            w = w * right[None, :] if right.ndim == 1 else w @ right
        u, s, vt = np.linalg.svd(chol.T @ w, full_matrices=False)
        root = np.sqrt(s)
        left = np.linalg.solve(chol.T, u * root)
        second = root[:, None] * vt
        if right is not None:  # back from the weighted outputs: B = B' R^-1
            second = second / right[None, :] if right.ndim == 1 else np.linalg.solve(right.T, second.T).T
        return Decomposition(left, second, s, mean)
    scale = np.ones(len(w))
    if method in ("whitened", "asvd") and stats is not None and stats.count:
        rms = np.sqrt(stats.channel_sumsq / stats.count)
        scale = np.maximum(rms, 1e-6 * max(float(rms.max()), 1e-12)) ** ASVD_ALPHA
        scale = np.repeat(scale, len(w) // len(scale))  # a Conv's rows are channels x kernel positions
    u, s, vt = np.linalg.svd(scale[:, None] * w, full_matrices=False)
    root = np.sqrt(s)
    return Decomposition((u * root) / scale[:, None], root[:, None] * vt, s)


def factor_tensors(layer: Layer, rank: int, a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """The two factors' initializers, named and laid out for the layer's op (a Conv's A with the
    layer's kernel, its B as a 1x1 kernel)."""
    stem = f"{layer.weight}{FACTOR_MARK}{rank}"
    if layer.nodes[0].op_type == "Conv":
        _, channels, *kernel = layer.conv_shape
        a, b = a.T.reshape(rank, channels, *kernel), b.T[:, :, None, None]
    return {f"{stem}_a": np.ascontiguousarray(a), f"{stem}_b": np.ascontiguousarray(b)}


def bias_tensors(model: onnx.ModelProto, layer: Layer, rank: int, shift: np.ndarray | None) -> dict[str, np.ndarray]:
    """The second factors' biases, one per node: the node's own bias (Gemm's times beta) plus `shift`.
    Empty without a shift, or when a Gemm's bias is not a vector (its rows differ: left as it is)."""
    if shift is None:
        return {}
    initializers = {t.name: t for t in model.graph.initializer}
    n = shift.shape[0]
    biases = {}
    for j, node in enumerate(layer.nodes):
        own = np.zeros(n, np.float32)
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in initializers:
                return {}
            value = numpy_helper.to_array(initializers[node.input[2]]).astype(np.float32)
            if value.size not in (1, n):
                return {}
            own = np.broadcast_to(value.reshape(-1), (n,)) * np.float32(attribute(node, "beta", 1.0) if
                                                                          node.op_type == "Gemm" else 1.0)
        biases[f"{layer.weight}{FACTOR_MARK}{rank}_bias{j}"] = (own + shift).astype(np.float32)
    return biases


def factor_in_place(model: onnx.ModelProto, layer: Layer, rank: int, a: np.ndarray, b: np.ndarray,
                    shift: np.ndarray | None = None) -> None:
    """Replaces each node of `layer` in `model` (the node computing the same output: `model` may be a
    copy of the one `layer` was found in) by two nodes at `rank`: the first holds A (and a Conv's
    kernel, strides, pads and dilations), the second B and the bias, which gains `shift` (a MatMul
    gets an Add for it, unless the Add of its own bias follows it). Names carry the weight and the
    rank (`<weight>/lowrank_r<rank>_a`)."""
    tensors = factor_tensors(layer, rank, a, b)
    (a_name, _), (b_name, _) = tensors.items()
    biases = bias_tensors(model, layer, rank, shift)
    kind = layer.nodes[0].op_type
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in tensors.items())
    bias_names = list(biases)
    view = GraphView(model.graph, model.ir_version)  # who reads each node's output, before any replacement
    graph_nodes = list(model.graph.node)
    producers = {n.output[0]: n for n in graph_nodes if n.output}
    for j, node in enumerate(producers[n.output[0]] for n in layer.nodes):
        base = node.name or node.output[0]
        middle = f"{node.output[0]}/lowrank_r{rank}"
        bias = [bias_names[j]] if bias_names else list(node.input[2:3])
        first_inputs = [node.input[0], a_name]
        if kind == "MatMul":
            replacement = [helper.make_node("MatMul", first_inputs, [middle], name=f"{base}/lowrank_a")]
            if bias_names and _fold_into_bias_add(model, view, node.output[0], biases[bias_names[j]]):
                replacement.append(helper.make_node("MatMul", [middle, b_name], list(node.output),
                                                    name=f"{base}/lowrank_b"))
            elif bias_names:
                replacement += [helper.make_node("MatMul", [middle, b_name], [f"{middle}_b"], name=f"{base}/lowrank_b"),
                                helper.make_node("Add", [f"{middle}_b", bias[0]], list(node.output),
                                                 name=f"{base}/lowrank_bias")]
            else:
                replacement.append(helper.make_node("MatMul", [middle, b_name], list(node.output),
                                                    name=f"{base}/lowrank_b"))
        elif kind == "Gemm":  # MatMul where there is no bias: Gemm needs its C input before opset 11
            beta = 1.0 if bias_names else attribute(node, "beta", 1.0)
            second = helper.make_node("Gemm", [middle, b_name, *bias], list(node.output), name=f"{base}/lowrank_b",
                                      beta=beta) if bias else \
                helper.make_node("MatMul", [middle, b_name], list(node.output), name=f"{base}/lowrank_b")
            replacement = [helper.make_node("MatMul", first_inputs, [middle], name=f"{base}/lowrank_a"), second]
        else:
            first = helper.make_node("Conv", first_inputs, [middle], name=f"{base}/lowrank_a")
            first.attribute.extend(attr for attr in node.attribute if attr.name != "group")  # kernel, strides...
            replacement = [first,
                           helper.make_node("Conv", [middle, b_name, *bias], list(node.output),
                                            name=f"{base}/lowrank_b", kernel_shape=[1, 1])]
        position = next(i for i, n in enumerate(graph_nodes) if n is node)
        graph_nodes[position:position + 1] = replacement
        model.graph.initializer.extend(numpy_helper.from_array(biases[name], name) for name in bias_names[j:j + 1]
                                       if any(name in n.input for n in replacement))
    del model.graph.node[:]
    model.graph.node.extend(graph_nodes)


def _fold_into_bias_add(model: onnx.ModelProto, view: GraphView, output: str, shift: np.ndarray) -> bool:
    """Adds `shift` to the constant bias of the Add that is the only reader of `output` (a MatMul's
    bias as exporters write it), under a new name, so that the factored MatMul needs no Add of its
    own: one more elementwise pass over a [tokens, N] tensor costs about as much as the thinner
    factor saves at int8. False (nothing changed) when there is no such Add, or when its bias is an
    initializer a caller may override (a graph input too: `view` does not count it as constant)."""
    found = view.bias_add(output)
    if found is None:
        return False
    add, slot = found
    bias = view.constant(add.input[slot])
    if bias.dtype != np.float32 or bias.size != shift.size or bias.shape[-1] != shift.size:
        return False
    name = f"{add.input[slot]}{FACTOR_MARK}_shifted"
    while name in view.initializers or any(t.name == name for t in model.graph.initializer):
        name += "_"
    model.graph.initializer.append(numpy_helper.from_array((bias + shift.reshape(bias.shape)).astype(np.float32), name))
    add.input[slot] = name
    return True
