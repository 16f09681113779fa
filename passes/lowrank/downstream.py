"""Output-aware truncation: what an error in a layer's output costs further on.

Whitening by the inputs' Gram matrix makes a truncation optimal for the error of the layer's own
output, every output channel counting alike. They do not count alike downstream, and two paths that
transformers take everywhere say by how much:

- **into a normalization**: the output reaches a LayerNormalization (or an RMS norm) through its bias
  and a residual Add, or ONNX Runtime's fused SkipLayerNormalization that adds both itself, and the
  norm scales channel j by gamma_j. An error in a channel whose gamma is near zero
  costs nothing; the output metric is diag(gamma^2) (floored, so that no channel is free).
- **through an activation into the next matrix**: the output goes through element-wise ops
  (GELU's Erf form, SiLU, ReLU, a gate's product, ORT's BiasGelu...) into a MatMul with a constant weight V, as an
  FFN's up-projection does. Linearized, an output error e reaches V's output as (f'(z) * e) @ V,
  whose expected squared norm is e^T M e with M = E[f' f'^T] * (V G V^T) (* element-wise; G: V's
  own metric by the first rule). f' is measured on the representative data, by central differences
  of those element-wise ops (any of them, no formula per activation).

The truncation then minimizes ||L^T (W - A B) R|| with L the inputs' Cholesky factor and R R^T = M,
a two-sided whitening (decompose's `right`). Measured on MiniLM, FFN matrices at rank 154 with 1,000
sentences: mean cosine 0.894 without, 0.904 with (docs/lowrank.md). Layers on other paths (an
attention projection into its Reshape) keep the plain input whitening.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import helper

from onnxopt import OnnxoptError
from onnxopt.fetch import fetching_session
from onnxopt.graph import CONTRIB_ACTIVATIONS, GraphView
from onnxopt.runtime import make_session

from .factor import Layer, _as_matrix

# Element-wise ops an activation path may take (the other inputs constant or computed elsewhere).
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Exp", "Erf", "Tanh", "Sigmoid", "Relu",
               "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "Softplus", "Softsign", "HardSigmoid", "HardSwish",
               "Mish", "Neg", "Abs", "Clip", "Identity", "Cast"}
# The norms that scale channel j by gamma_j, with gamma's input index; "Skip" forms add the residual
# themselves (input 0 or 1 is the layer's output).
NORMS = {"LayerNormalization": 1, "SimplifiedLayerNormalization": 1, "RMSNormalization": 1}
SKIP_NORMS = {"SkipLayerNormalization": 2, "SkipSimplifiedLayerNormalization": 2}
GAMMA_FLOOR = 0.1  # of the gammas' RMS: a channel the norm all but drops still counts a little
METRIC_RIDGE = 0.1  # of M's mean diagonal: keeps R invertible (V G V^T has rank <= V's width)
# An activation path's metric is N x N: wider outputs (an LLM's 11008-wide FFN) keep the input
# whitening alone, and the moments are accumulated a few hundred MB at a time.
MAX_PATH_WIDTH = 4096
METRIC_BYTES = 256 * 2**20
METRIC_SAMPLES = 256  # a weighting, coarser than the factors' own statistics: fewer samples do
STEP = 1e-2  # central differences of the activation, relative to max(|z|, 1)


@dataclasses.dataclass
class ActivationPath:
    """A layer output `start` that reaches `consumer`'s input `end` through element-wise `nodes`."""
    start: str
    end: str
    nodes: list[onnx.NodeProto]
    external: list[str]  # non-constant inputs of `nodes` computed elsewhere (a gate's other half)
    weight: np.ndarray  # V [N, P] of the consumer MatMul or Gemm
    gamma: np.ndarray | None  # the metric diagonal at V's output, if it reaches a norm


def output_metrics(model: onnx.ModelProto, view: GraphView, layers: list[Layer], batches,
                   progress) -> dict[int, np.ndarray]:
    """{layer index: R} for the layers with a known downstream path: a vector (diagonal R) or a
    lower-triangular matrix with R R^T = M."""
    metrics: dict[int, np.ndarray] = {}
    paths: dict[int, ActivationPath] = {}
    for i, layer in enumerate(layers):
        if len(layer.nodes) != 1 or layer.nodes[0].op_type not in ("MatMul", "Gemm"):
            continue
        out, width = _after_bias(view, layer.nodes[0].output[0]), layer.matrix.shape[1]
        path = _activation_path(view, out, width) if width <= MAX_PATH_WIDTH else None
        if path is not None:
            paths[i] = path
        elif (gamma := _norm_gamma(view, out, width)) is not None:
            metrics[i] = _floored(gamma)
    if batches is None:
        return metrics
    for chunk in _chunks(paths):  # moments of at most METRIC_BYTES at a time, one pass over the data each
        for i, moment in _derivative_moments(model, view, chunk, batches, progress).items():
            v = chunk[i].weight.astype(np.float64)
            if chunk[i].gamma is not None:
                v = v * _floored(chunk[i].gamma)[None, :]
            m = moment * (v @ v.T)
            m += METRIC_RIDGE * max(float(np.mean(np.diag(m))), 1e-12) * np.eye(len(m))
            metrics[i] = np.linalg.cholesky(m).astype(np.float32)
    return metrics


def _chunks(paths: dict[int, ActivationPath]) -> list[dict[int, ActivationPath]]:
    chunks: list[dict[int, ActivationPath]] = []
    used = METRIC_BYTES
    for i, path in paths.items():
        size = 8 * path.weight.shape[0] ** 2
        if used + size > METRIC_BYTES:
            chunks.append({})
            used = 0
        chunks[-1][i] = path
        used += size
    return chunks


def _floored(gamma: np.ndarray) -> np.ndarray:
    g = np.abs(gamma.astype(np.float64))
    rms = float(np.sqrt(np.mean(g * g)))
    return np.maximum(g / rms, GAMMA_FLOOR) if rms > 0 else np.ones_like(g)


def _after_bias(view: GraphView, output: str) -> str:
    found = view.bias_add(output)
    return found[0].output[0] if found else output


def _norm_gamma(view: GraphView, output: str, width: int) -> np.ndarray | None:
    """The scale of the norm that `output` reaches through a residual Add (or a Skip norm's own), if it does."""
    reader = view.single_consumer(output)
    if reader is not None and reader.op_type in SKIP_NORMS and output in reader.input[:2]:
        return _gamma(view, reader, SKIP_NORMS[reader.op_type], width)
    if reader is None or reader.op_type not in ("Add", "Sum"):
        return None
    if reader.op_type == "Add" and any(view.is_constant(n) for n in reader.input):
        return None
    for norm in view.consumers.get(reader.output[0], []):
        if norm.op_type in NORMS and norm.input[0] == reader.output[0]:
            if (gamma := _gamma(view, norm, NORMS[norm.op_type], width)) is not None:
                return gamma
    return None


def _gamma(view: GraphView, norm: onnx.NodeProto, index: int, width: int) -> np.ndarray | None:
    gamma = view.constant(norm.input[index]) if len(norm.input) > index and norm.input[index] else None
    return gamma if gamma is not None and gamma.shape == (width,) else None


def _activation_path(view: GraphView, start: str, width: int) -> ActivationPath | None:
    """Element-wise nodes from `start` to one MatMul with a constant [width, P] weight, and nothing else
    reading what they compute."""
    nodes: list[onnx.NodeProto] = []
    seen: set[int] = set()
    reached, frontier, end = {start}, [start], None
    while frontier:
        name = frontier.pop()
        if name in view.graph_outputs:
            return None
        for node in view.consumers.get(name, []):
            if _reads_as_matmul(view, node, name):
                if end not in (None, node):
                    return None
                end = node
            elif ((node.op_type in ELEMENTWISE and node.domain in ("", "ai.onnx"))
                  or (node.op_type in CONTRIB_ACTIVATIONS and node.domain == "com.microsoft")):
                if id(node) in seen:
                    continue
                seen.add(id(node))
                nodes.append(node)
                reached.update(node.output)
                frontier.extend(node.output)
            else:
                return None
        if len(nodes) > 16:
            return None
    if end is None or not nodes:
        return None
    weight, _ = _as_matrix(end, view.constant(end.input[1]))  # a Gemm's transB and alpha folded in; None for transA
    if weight is None or weight.ndim != 2 or weight.shape[0] != width:
        return None
    for node in nodes:  # constants must not broadcast the path's values to another shape
        for name in node.input:
            value = view.constant(name) if name and name not in reached else None
            if value is not None and value.size not in (1, width):
                return None
    order = {id(node): k for k, node in enumerate(view.graph.node)}
    nodes.sort(key=lambda node: order[id(node)])
    external = [n for node in nodes for n in node.input
                if n and n not in reached and not view.is_constant(n)]
    gamma = _norm_gamma(view, _after_bias(view, end.output[0]), weight.shape[1])
    return ActivationPath(start, end.input[0], nodes, list(dict.fromkeys(external)), weight, gamma)


def _reads_as_matmul(view: GraphView, node: onnx.NodeProto, name: str) -> bool:
    """`node` computes `name` @ V with a constant V: a MatMul or a Gemm (factor._as_matrix reads V)."""
    return node.op_type in ("MatMul", "Gemm") and node.input[0] == name and view.is_constant(node.input[1])


def _derivative_moments(model: onnx.ModelProto, view: GraphView, paths: dict[int, ActivationPath], batches,
                        progress) -> dict[int, np.ndarray]:
    """{layer: E[f' f'^T]} with f' = d end / d start, element-wise, by central differences."""
    fetched = list(dict.fromkeys(n for p in paths.values() for n in (p.start, *p.external)))
    session, mapping = fetching_session(model, fetched)
    wanted = {i.name for i in session.get_inputs()}
    steps = {}
    for i, path in paths.items():
        try:
            steps[i] = make_session(_path_model(model, view, path))
        except OnnxoptError:  # a path ORT will not run alone: that layer keeps the input whitening
            continue
    paths = {i: p for i, p in paths.items() if i in steps}
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    read = 0
    for feeds in progress(batches, "output metrics", "batch", getattr(batches, "num_batches", None)):
        if read >= METRIC_SAMPLES:
            break
        read += len(next(iter(feeds.values())))
        values = dict(zip(fetched, session.run([mapping[n] for n in fetched],
                                               {k: v for k, v in feeds.items() if k in wanted})))
        for i, path in paths.items():
            z = values[path.start]
            h = (STEP * np.maximum(np.abs(z), 1.0)).astype(z.dtype)
            others = {n: values[n] for n in path.external}
            up, = steps[i].run(None, {path.start: z + h, **others})
            down, = steps[i].run(None, {path.start: z - h, **others})
            if up.shape != z.shape:
                continue  # a gate broadcast the path to another shape: no element-wise derivative
            d = ((up - down) / (2 * h)).reshape(-1, z.shape[-1]).astype(np.float32)
            sums[i] = sums.get(i, 0) + (d.T @ d).astype(np.float64)  # float32 products: faster, ample for a weighting
            counts[i] = counts.get(i, 0) + len(d)
    return {i: sums[i] / counts[i] for i in sums}


def _path_model(model: onnx.ModelProto, view: GraphView, path: ActivationPath) -> onnx.ModelProto:
    """The path's element-wise nodes alone, from `start` (and its external inputs) to `end`."""
    elem = onnx.TensorProto.FLOAT
    constants = [n for node in path.nodes for n in node.input
                 if n and view.is_constant(n) and n not in {path.start, *path.external}]
    initializers = [onnx.numpy_helper.from_array(view.constant(n), n) for n in dict.fromkeys(constants)]
    inputs = [helper.make_tensor_value_info(n, elem if n == path.start else view.elem_type(n) or elem, None)
              for n in (path.start, *path.external)]
    graph = helper.make_graph(path.nodes, "activation_path", inputs,
                              [helper.make_tensor_value_info(path.end, elem, None)], initializers)
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
