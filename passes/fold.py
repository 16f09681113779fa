"""Constant folding and graph cleanup (`fold`).

A node whose inputs are all constants (initializers that are not graph inputs, Constant nodes, or
outputs of other such nodes) is evaluated once, ahead of time, and its outputs become initializers.
Shape and Size of tensors whose shape inference gives a fully static shape are constants too, which
turns shape arithmetic (Shape -> Gather -> Unsqueeze -> Concat -> Reshape) into plain initializers.
The whole constant subgraph runs as one ONNX Runtime session; when ORT refuses it, nodes are evaluated
one by one with ORT and then the onnx reference evaluator, and those neither can run are left as they
are and reported. Then dead nodes, Identity/Dropout and duplicate tensors/nodes are removed.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from onnxopt import Pass, PassContext, PassResult, option
from onnxopt.graph import NameGenerator, NONDETERMINISTIC_OPS, GraphView, has_subgraph, infer_dims, infer_value_info
from onnxopt.surgery import add_initializer, constants_to_initializers, remove_nodes, remove_unused_initializers

from . import cleanup
from .control_flow import fold_subgraphs, inline_constant_ifs


@dataclasses.dataclass(frozen=True)
class FoldOptions:
    max_folded_mb: float = option(0.0, "leave a node unfolded if its outputs would exceed this many MB (0: no limit)")
    fold_shapes: bool = option(True, "turn Shape/Size of statically shaped tensors into constants")
    remove_identity: bool = option(True, "bypass Identity, inference-mode Dropout and Cast to the same type")
    dedupe: bool = option(True, "merge equal initializers and identical nodes (common subexpressions)")
    recorded_shapes: Literal["auto", "keep", "drop"] = option(
        "auto", "the shapes a model records for its intermediate tensors (value_info; torch's dynamo exporter "
        "writes them all): auto drops them for the CPU EP, where they let ORT fuse Add + LayerNormalization "
        "into its scalar SkipLayerNormalization kernel (MiniLM's dynamo export: int8 1.34x slower); ORT "
        "infers the shapes it needs itself")

    def __post_init__(self):
        if self.max_folded_mb < 0:
            raise ValueError("max_folded_mb must be >= 0")


class FoldConstants(Pass):
    """Fold constant subgraphs ahead of time (one ORT session; per node with the reference evaluator as
    fallback), turn Shape/Size of statically shaped tensors into constants, inline an If whose condition is
    constant, move Constant nodes to initializers, remove dead nodes, Identity and inference-mode Dropout,
    merge equal initializers and identical nodes."""

    name = "fold"
    Options = FoldOptions
    fixed_point = True

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        graph = model.graph
        counts: Counter[str] = Counter()
        skipped: list[str] = []
        counts["legacy initializer inputs dropped"] = drop_legacy_initializer_inputs(model)
        counts["constant nodes to initializers"] = constants_to_initializers(graph)
        if self.options.fold_shapes:
            counts["shapes made static"] = fold_static_shapes(model)
            counts["reshape shapes made constant"] = reshape_copies_of_input_dims(model)
        folded, reasons = fold_constant_nodes(model, self.options.max_folded_mb)
        counts["nodes folded"] = folded
        skipped.extend(reasons)
        counts["constant Ifs inlined"] = inline_constant_ifs(model)
        counts.update(fold_subgraphs(model, self.options.max_folded_mb))
        if self.options.remove_identity:
            types = {n: vi.type.tensor_type.elem_type for n, vi in infer_value_info(model).items()
                     if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type}
            counts["identities removed"] = cleanup.remove_identities(graph, types)
        if self.options.dedupe:
            counts["duplicates merged"] = cleanup.eliminate_duplicates(graph)
        counts["reshape chains merged"] = cleanup.merge_reshape_chains(graph)
        if _opset(model) >= 13:
            ranks = {name: len(d) for name, d in infer_dims(model).items()}
            counts["unsqueeze chains merged"] = cleanup.merge_unsqueeze_chains(graph, ranks)
        counts["dead nodes removed"] = cleanup.remove_dead_nodes(graph)
        counts["unused initializers removed"] = remove_unused_initializers(graph)
        prune_value_info(graph)
        if self.options.recorded_shapes == "drop" or (self.options.recorded_shapes == "auto" and ctx.ep == "cpu"):
            counts["recorded shapes dropped"] = drop_recorded_shapes(graph)
        counts = Counter({k: v for k, v in counts.items() if v})
        return PassResult(model, changed=bool(counts), counts=dict(counts), skipped=skipped)


def _opset(model: onnx.ModelProto) -> int:
    return next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)


def drop_legacy_initializer_inputs(model: onnx.ModelProto) -> int:
    """IR < 4 listed every initializer as a graph input; drop those inputs and move to IR 4.

    Otherwise an initializer removed by folding would leave behind a required input nobody feeds.
    """
    if model.ir_version >= 4:
        return 0
    names = {t.name for t in model.graph.initializer}
    kept = [i for i in model.graph.input if i.name not in names]
    dropped = len(model.graph.input) - len(kept)
    del model.graph.input[:]
    model.graph.input.extend(kept)
    model.ir_version = 4
    return dropped


def fold_static_shapes(model: onnx.ModelProto) -> int:
    """Shape/Size of tensors with known dims become initializers, and so do Gathers and Slices of known
    dims from a Shape whose other dims are dynamic (Gather(Shape(x), 2) is 384 even with a dynamic
    batch; TorchScript writes x.size(-1) as Slice(Shape(x), -1, INT_MAX))."""
    dims = infer_dims(model)
    graph = model.graph
    view = GraphView(graph, model.ir_version)
    replaced = []
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        value = None
        if node.op_type == "Shape":
            known = _shape_dims(node, dims)
            value = known if known is not None and np.all(known >= 0) else None
        elif node.op_type == "Size":
            shape = dims.get(node.input[0])
            if shape is not None and all(d is not None for d in shape):
                value = np.array(int(np.prod(shape)), dtype=np.int64)
        elif node.op_type == "Gather":
            value = _gathered_static_dims(node, view, dims)
        elif node.op_type == "Slice":
            value = _sliced_static_dims(node, view, dims)
        if value is not None:
            graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
            replaced.append(node)
    remove_nodes(graph, replaced)
    return len(replaced)


def _sliced_static_dims(node: onnx.NodeProto, view: GraphView, dims) -> np.ndarray | None:
    shape_node = view.producer.get(node.input[0])
    if shape_node is None or shape_node.op_type != "Shape" or len(node.input) < 3:
        return None
    bounds = [view.constant(name) if name else None for name in node.input[1:]]
    if any(b is None for b in bounds[:2]) or any(b is None for b, name in zip(bounds, node.input[1:]) if name):
        return None
    known = _shape_dims(shape_node, dims)
    if known is None:
        return None
    starts, ends = bounds[0].reshape(-1), bounds[1].reshape(-1)
    axes = bounds[2].reshape(-1) if len(bounds) > 2 and bounds[2] is not None else np.zeros(1, np.int64)
    steps = bounds[3].reshape(-1) if len(bounds) > 3 and bounds[3] is not None else np.ones(1, np.int64)
    if starts.size != 1 or ends.size != 1 or axes.tolist() not in ([0], [-1]) or steps.tolist() != [1]:
        return None
    picked = known[int(starts[0]):int(min(ends[0], 2**62))]  # numpy clamps the bounds as ONNX does
    return picked if picked.size and np.all(picked >= 0) else None


def _gathered_static_dims(node: onnx.NodeProto, view: GraphView, dims) -> np.ndarray | None:
    shape_node = view.producer.get(node.input[0])
    indices = view.constant(node.input[1])
    if shape_node is None or shape_node.op_type != "Shape" or indices is None or any(a.i for a in node.attribute):
        return None
    known = _shape_dims(shape_node, dims)
    if known is None:
        return None
    picked = np.take(known, indices)
    return picked if np.all(picked >= 0) else None


def _shape_dims(shape_node: onnx.NodeProto, dims) -> np.ndarray | None:
    """What a Shape node returns, as far as `dims` knows it: -1 for a dynamic dim; None when its
    input's rank is unknown."""
    shape = dims.get(shape_node.input[0])
    if shape is None:
        return None
    attrs = {a.name: a.i for a in shape_node.attribute}
    shape = shape[slice(attrs.get("start", 0), attrs.get("end", len(shape)))]
    return np.array([-1 if d is None else d for d in shape], dtype=np.int64)


def reshape_copies_of_input_dims(model: onnx.ModelProto) -> int:
    """Reshape(x, Concat(Unsqueeze(Gather(Shape(x), i)) at position i, constants...)) -> Reshape(x, [0, ..., c]).

    With allowzero=0 a 0 in the target shape copies the input's dim at that position, which is all
    the Shape arithmetic computes; the dynamic dims stay dynamic and the subgraph goes away. The
    Shape may read another tensor when shape inference shows that dim is the same (same number or
    same symbolic name, e.g. "batch").
    """
    view = GraphView(model.graph, model.ir_version)
    dims, names = None, None
    made: dict[tuple[str, tuple[int, ...]], str] = {}  # Reshapes sharing a target (Q, K and V's) share its copy
    rewritten = 0
    for node in model.graph.node:
        if node.op_type != "Reshape" or any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        if view.constant(node.input[1]) is not None:
            continue
        dims = dims if dims is not None else infer_dims(model, symbolic=True)
        target = _copied_dims(node.input[0], node.input[1], view, dims)
        if target is None:
            continue
        key = (node.input[1], tuple(target))
        if key not in made:
            names = names or NameGenerator(model.graph)
            made[key] = names(node.input[1] + "_static")
            model.graph.initializer.append(numpy_helper.from_array(np.array(target, dtype=np.int64), made[key]))
        node.input[1] = made[key]
        rewritten += 1
    return rewritten


def _copied_dims(data: str, shape: str, view: GraphView, dims) -> list[int] | None:
    concat = view.producer.get(shape)
    if concat is None or concat.op_type != "Concat":
        return None
    target: list[int] = []
    for piece in concat.input:
        value = view.constant(piece)
        if value is not None:
            if value.ndim != 1 or 0 in value:  # a literal 0 would change meaning
                return None
            target.extend(int(v) for v in value)
            continue
        unsqueeze = view.producer.get(piece)
        gather = view.producer.get(unsqueeze.input[0]) if unsqueeze is not None and unsqueeze.op_type == "Unsqueeze" else None
        if gather is None or gather.op_type != "Gather":  # a computed dim (ShuffleNet's Div by groups, then Cast)
            return None
        source = view.producer.get(gather.input[0])
        index = view.constant(gather.input[1])
        if source is None or source.op_type != "Shape" or source.attribute or index is None or index.ndim != 0:
            return None
        position = len(target)
        if source.input[0] != data or int(index) != position:
            data_dims, source_dims = dims.get(data), dims.get(source.input[0])
            if (data_dims is None or source_dims is None or position >= len(data_dims)
                    or not -len(source_dims) <= int(index) < len(source_dims)
                    or data_dims[position] is None or data_dims[position] != source_dims[int(index)]):
                return None
        target.append(0)
    return target if 0 in target else None


@dataclasses.dataclass
class Opset:
    imports: list[onnx.OperatorSetIdProto]
    ir_version: int


def _foldable(node: onnx.NodeProto, view: GraphView, constants: set[str]) -> bool:
    inputs = [n for n in node.input if n]
    return (node.domain in ("", "ai.onnx") and node.op_type not in NONDETERMINISTIC_OPS
            and node.op_type != "Constant" and not has_subgraph(node) and bool(inputs)
            and all(n in constants for n in inputs))


def fold_constant_nodes(model: onnx.ModelProto, max_mb: float, graph: onnx.GraphProto | None = None,
                        outer: GraphView | None = None) -> tuple[int, list[str]]:
    """Evaluates every node fed only by constants (in `graph`, a subgraph of `model` whose enclosing
    graphs `outer` sees, or the main graph); returns (nodes folded, reasons for nodes left)."""
    graph = model.graph if graph is None else graph
    opset = Opset(list(model.opset_import), model.ir_version)
    view = GraphView(graph, model.ir_version, outer)
    constants = {name for name in view.initializers if view.is_constant(name)}
    if outer is not None:  # weights of the enclosing graphs
        constants |= {n for node in graph.node for n in node.input
                      if n and n not in view.producer and view.is_constant(n)}
    foldable = []
    for node in graph.node:
        if _foldable(node, view, constants):
            foldable.append(node)
            constants.update(o for o in node.output if o)
    if not foldable:
        return 0, []
    folded_ids = {id(n) for n in foldable}
    needed = [o for n in foldable for o in n.output if o and (
        o in view.graph_outputs or any(id(c) not in folded_ids for c in view.consumers.get(o, [])))]
    values, reasons = evaluate(foldable, needed, view, opset)
    if max_mb > 0:
        for name in [n for n, v in values.items() if v.nbytes > max_mb * 2**20]:
            reasons.append(f"{name}: folded value would be {values.pop(name).nbytes / 2**20:.1f} MB")
    # A node is removed only when every needed output of it has a value; the rest stays in the graph.
    removable = [n for n in foldable if all(o in values for o in n.output if o in needed)]
    keep = {id(n) for n in foldable} - {id(n) for n in removable}
    if keep:
        removable = _without_sources_of(removable, [n for n in foldable if id(n) in keep])
    removed_ids = {id(n) for n in removable}
    for name in needed:
        if name in values and id(view.producer[name]) in removed_ids:
            add_initializer(graph, values[name], name)
    remove_nodes(graph, removable)
    return len(removable), reasons


def _without_sources_of(removable: list[onnx.NodeProto], kept: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Nodes that feed a kept (unevaluable) node must stay so that it still has its inputs."""
    producers = {o: n for n in removable for o in n.output}
    stay: set[int] = set()
    stack = [i for n in kept for i in n.input]
    while stack:
        node = producers.get(stack.pop())
        if node is not None and id(node) not in stay:
            stay.add(id(node))
            stack.extend(node.input)
    return [n for n in removable if id(n) not in stay]


def evaluate(nodes: list[onnx.NodeProto], outputs: list[str], view: GraphView,
             opset: Opset) -> tuple[dict[str, np.ndarray], list[str]]:
    """Runs the constant nodes; falls back to one node at a time where the whole set fails."""
    try:
        return _tensors(dict(zip(outputs, _run(nodes, outputs, view, opset)))), []
    except Exception:
        pass
    values: dict[str, np.ndarray] = {}
    reasons = []
    for node in nodes:
        feeds = {n: values[n] if n in values else view.constant(n) for n in node.input if n}
        if any(v is None for v in feeds.values()):
            reasons.append(f"{node.op_type} '{node.name}': an input could not be computed")
            continue
        outs = [o for o in node.output if o]
        try:
            results = _run([node], outs, view, opset, feeds)
        except Exception as exc:
            try:
                from onnx.reference import ReferenceEvaluator

                results = ReferenceEvaluator(_model([node], outs, {}, opset)).run(None, feeds)
            except Exception:
                reasons.append(f"{node.op_type} '{node.name}': neither ORT nor the reference evaluator ran it "
                               f"({str(exc).splitlines()[0][:120]})")
                continue
        values.update(_tensors(dict(zip(outs, results))))
    return {k: v for k, v in values.items() if k in set(outputs)}, reasons


def _tensors(values: dict) -> dict[str, np.ndarray]:
    """The values that are tensors: a sequence (a list) or an optional (None) cannot become an
    initializer, so the node computing it stays."""
    return {k: v for k, v in values.items() if isinstance(v, np.ndarray)}


def _model(nodes, outputs, initializers, opset) -> onnx.ModelProto:
    inputs = sorted({n for node in nodes for n in node.input if n} - {o for node in nodes for o in node.output})
    graph = onnx.helper.make_graph(
        list(nodes), "fold", [], [onnx.ValueInfoProto(name=o) for o in outputs],
        initializer=[numpy_helper.from_array(initializers[n], n) for n in inputs if n in initializers])
    if set(inputs) - set(initializers):
        graph.input.extend(onnx.ValueInfoProto(name=n) for n in inputs if n not in initializers)
    return onnx.helper.make_model(graph, opset_imports=opset.imports, ir_version=opset.ir_version)


def _run(nodes, outputs, view: GraphView, opset, feeds: dict | None = None) -> list[np.ndarray]:
    if feeds is None:
        inputs = {n for node in nodes for n in node.input if n} - {o for node in nodes for o in node.output}
        feeds = {n: view.constant(n) for n in inputs}
    model = _model(nodes, outputs, feeds, opset)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(outputs, {})


def drop_recorded_shapes(graph: onnx.GraphProto) -> int:
    """Removes the main graph's value_info (the graph's inputs and outputs keep their declarations),
    except for outputs of ops outside the ONNX domain, whose types onnx's shape inference cannot tell.

    Why, on the CPU EP: ONNX Runtime fuses Add (+ bias Add) + LayerNormalization into
    SkipLayerNormalization only where it knows both Adds' inputs to have the same 3-D shape, and the
    CPU kernel of that op is a scalar loop: 1.77 ms against 0.48 ms for Add, Add, LayerNormalization
    on [8, 128, 384] (ORT 1.32, 1 thread). Models that record every shape, as torch's dynamo exporter
    writes them, get the fusion on every layer (all-MiniLM-L6-v2: 95 ms int8 at batch 8 against 71 ms
    without the records, 182 against 158 ms in fp32); TorchScript exports record none. Convolutional
    models measured the same either way (ResNet-18, the digits CNN). Nothing is lost: ORT and onnx's
    shape inference recompute shapes from the graph's inputs.

    This only helps where the graph's inputs leave ORT's own inference short of the shapes; with fixed
    input shapes it fuses anyway. `fuse`'s residual Sum (fuse_layernorm.py) stops the fusion whatever
    the shapes; the drop stays for pipelines that run `fold` without `fuse`."""
    custom = {o for n in graph.node if n.domain not in ("", "ai.onnx") for o in n.output}
    kept = [vi for vi in graph.value_info if vi.name in custom]
    count = len(graph.value_info) - len(kept)
    if count:
        del graph.value_info[:]
        graph.value_info.extend(kept)
    return count


def prune_value_info(graph: onnx.GraphProto) -> None:
    """Drops value_info entries of tensors that no longer exist."""
    alive = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    stale = [v for v in graph.value_info if v.name not in alive]
    for value in stale:
        graph.value_info.remove(value)
