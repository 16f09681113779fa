"""A read-only index over a GraphProto that passes query while matching: producers, consumers, constants.

Weights may be initializers or Constant nodes (some exporters emit the latter); `constant()` treats
both alike. The view never mutates the graph; rewrites build new nodes and apply them afterwards.
"""
from __future__ import annotations

from collections import defaultdict
from functools import cached_property

import numpy as np
import onnx
from onnx import numpy_helper

# Where onnx's shape inference leaves a rank unknown (a Reshape to a computed shape, an Expand after
# it: an attention mask as exporters before opset 13 build it), these ops still tell it.
# Elementwise with numpy broadcasting: the output has the largest input rank.
BROADCAST_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean", "Where", "And", "Or", "Xor",
    "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "BitShift",
})
# Elementwise on one tensor (or over one axis, keeping it): the output has the first input's rank.
SAME_RANK_OPS = frozenset({
    "Cast", "CastLike", "Identity", "Not", "Neg", "Abs", "Sign", "Floor", "Ceil", "Round", "Relu", "LeakyRelu",
    "Elu", "Selu", "Sigmoid", "HardSigmoid", "Tanh", "Erf", "Gelu", "Exp", "Log", "Sqrt", "Reciprocal", "Clip",
    "Softmax", "LogSoftmax", "IsNaN", "IsInf",
})
# ONNX Runtime's own ops (models its transformer optimizer fused): output index -> rank of input 0 plus this
CONTRIB_RANKS = {
    **{op: {0: 0} for op in ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "BiasGelu", "FastGelu",
                             "Gelu", "QuickGelu", "BiasAdd", "Attention")},
    "EmbedLayerNormalization": {0: 1},  # [batch, sequence] ids -> [batch, sequence, hidden]
}
# ONNX Runtime's fused activations (com.microsoft, as its transformer optimizer writes them): x, and an
# optional bias broadcast over x's last axis, added before the activation; elementwise in every other way
CONTRIB_ACTIVATIONS = frozenset({"BiasGelu", "FastGelu", "Gelu", "QuickGelu"})
RANK_DEPTH = 32  # nodes walked back at most: the fallback is for short mask paths, not whole networks

# Ops whose output differs between runs: never folded, never merged.
NONDETERMINISTIC_OPS = frozenset({
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli",
})


def attribute(node: onnx.NodeProto, name: str, default=None):
    """The value of a node's attribute, or `default` when the node does not set it."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a Constant node, whichever attribute holds it (None for sparse values)."""
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name in ("value_float", "value_int"):
            return np.array(onnx.helper.get_attribute_value(attr),
                            dtype=np.float32 if attr.name == "value_float" else np.int64)
        if attr.name in ("value_floats", "value_ints"):
            return np.array(onnx.helper.get_attribute_value(attr),
                            dtype=np.float32 if attr.name == "value_floats" else np.int64)
        if attr.name == "value_string":
            return np.array(attr.s.decode(), dtype=object)
        if attr.name == "value_strings":
            return np.array([s.decode() for s in attr.strings], dtype=object)
    return None


def subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the enclosing scope."""
    names: set[str] = set()
    for attr in node.attribute:
        for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            local = {i.name for i in g.input} | {i.name for i in g.initializer}
            for inner in g.node:
                local.update(inner.output)
            for inner in g.node:
                names.update(n for n in inner.input if n and n not in local)
                names.update(n for n in subgraph_inputs(inner) if n not in local)
            names.update(o.name for o in g.output if o.name not in local)
    return names


def has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [g for a in node.attribute for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs)]


def scopes(model: onnx.ModelProto) -> list[tuple[onnx.GraphProto, GraphView]]:
    """The main graph and every subgraph below it (If branches, Loop and Scan bodies), outermost
    first, each with a view that sees its enclosing graphs' constants."""
    found: list[tuple[onnx.GraphProto, GraphView]] = []

    def visit(graph: onnx.GraphProto, outer: GraphView | None) -> None:
        view = GraphView(graph, model.ir_version, outer)
        found.append((graph, view))
        for node in graph.node:
            for sub in subgraphs(node):
                visit(sub, view)

    visit(model.graph, None)
    return found


def nested_layers_note(model: onnx.ModelProto, op_types: set[str], pass_name: str) -> list[str]:
    """For a pass that rewrites the main graph only: a note naming how many `op_types` nodes with a
    constant weight sit inside If/Loop/Scan bodies (at any depth) and stay as they are; [] if none."""
    count = sum(1 for graph, view in scopes(model)[1:] for node in graph.node
                if node.op_type in op_types and len(node.input) > 1 and view.constant(node.input[1]) is not None)
    return [f"{count} layer(s) inside If/Loop/Scan bodies left as they are: {pass_name} rewrites the main "
            f"graph only"] if count else []


class GraphView:
    """Producers, consumers and constant values of one graph, computed once. A subgraph's view (an
    If branch, a Loop body) takes its enclosing graph's view as `outer`: a weight it reads from
    there is as constant as its own."""

    def __init__(self, graph: onnx.GraphProto, ir_version: int = onnx.IR_VERSION, outer: GraphView | None = None):
        self.graph = graph
        self.outer = outer
        self.initializers = {t.name: t for t in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
            for name in subgraph_inputs(node):
                self.consumers[name].append(node)
        self.graph_inputs = {i.name for i in graph.input}
        if ir_version < 4:
            # Before IR 4 every initializer had to be listed as an input too; they are still weights.
            self.graph_inputs -= set(self.initializers)
        self.graph_outputs = {o.name for o in graph.output}
        self._constants: dict[str, np.ndarray] = {}

    def is_constant(self, name: str) -> bool:
        # An initializer that is also a graph input can be overridden at run time: not a constant.
        if name in self.initializers:
            return name not in self.graph_inputs
        node = self.producer.get(name)
        if node is None and name not in self.graph_inputs and self.outer is not None:
            return self.outer.is_constant(name)
        return node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx")

    def constant(self, name: str, keep: bool = True) -> np.ndarray | None:
        """The value of a constant tensor, or None if `name` is computed at run time. With
        `keep=False` the value is not memoized: a rewrite that reads every weight once would
        otherwise hold a float copy of all of them."""
        if name in self._constants:
            return self._constants[name]
        if not self.is_constant(name):
            return None
        if name not in self.initializers and name not in self.producer:
            return self.outer.constant(name, keep)
        if name in self.initializers:
            value = numpy_helper.to_array(self.initializers[name])
        else:
            value = constant_node_value(self.producer[name])
        if value is not None and keep:
            self._constants[name] = value
        return value

    def single_consumer(self, name: str) -> onnx.NodeProto | None:
        """The one node reading `name`, if exactly one does and it is not a graph output."""
        users = self.consumers.get(name, [])
        if len(users) == 1 and name not in self.graph_outputs:
            return users[0]
        return None

    def bias_add(self, output: str) -> tuple[onnx.NodeProto, int] | None:
        """(the Add that alone reads `output` and adds a constant to it, that constant's input index):
        a MatMul's bias as exporters write it. None for anything else (a graph output, x + x, ...)."""
        add = self.single_consumer(output)
        if add is None or add.op_type != "Add" or len(add.input) != 2:
            return None
        index = 1 if add.input[0] == output else 0
        if add.input[1 - index] != output or self.constant(add.input[index]) is None:
            return None
        return add, index

    @cached_property
    def value_info(self) -> dict[str, onnx.ValueInfoProto]:
        infos = {}
        for vi in list(self.graph.input) + list(self.graph.value_info) + list(self.graph.output):
            infos[vi.name] = vi
        return infos

    def rank(self, name: str, depth: int = RANK_DEPTH) -> int | None:
        """The rank of a tensor if shape inference or a constant tells it, or else the ops that
        compute it (`BROADCAST_OPS`, `SAME_RANK_OPS`, Reshape, Expand, Unsqueeze, Squeeze) from their
        inputs' ranks."""
        value = self.constant(name) if self.is_constant(name) else None
        if value is not None:
            return value.ndim
        vi = self.value_info.get(name)
        if vi is not None and vi.type.tensor_type.HasField("shape"):
            return len(vi.type.tensor_type.shape.dim)
        node = self.producer.get(name)
        if node is None or depth == 0:
            return None
        if node.domain == "com.microsoft":
            if node.op_type == "EmbedLayerNormalization" and list(node.output[1:2]) == [name]:
                return 1  # its mask_index: [batch]
            grows = CONTRIB_RANKS.get(node.op_type, {}).get(list(node.output).index(name))
            source = self.rank(node.input[0], depth - 1) if grows is not None else None
            return None if source is None else source + grows
        if node.domain not in ("", "ai.onnx") or node.output[0] != name:
            return None
        if node.op_type in ("Reshape", "Expand"):
            shape = self.static_shape(node.input[1])  # a 1-D shape tensor: its length is the target's rank
            target = shape[0] if shape is not None and len(shape) == 1 else None
            if node.op_type == "Reshape" or target is None:
                return target
            source = self.rank(node.input[0], depth - 1)
            return None if source is None else max(source, target)
        if node.op_type in SAME_RANK_OPS:
            return self.rank(node.input[0], depth - 1)
        if node.op_type in ("Unsqueeze", "Squeeze"):
            axes = self.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else attribute(node, "axes")
            source = self.rank(node.input[0], depth - 1)
            if axes is None or source is None:
                return None  # Squeeze without axes drops the dims that happen to be 1
            return source + len(np.atleast_1d(axes)) * (1 if node.op_type == "Unsqueeze" else -1)
        if node.op_type in BROADCAST_OPS:
            ranks = [self.rank(i, depth - 1) for i in node.input if i]
            return None if not ranks or None in ranks else max(ranks)
        return None

    def elem_type(self, name: str) -> int:
        """A tensor's element type (TensorProto enum) if known, else 0 (UNDEFINED)."""
        return _elem(self.value_info, name)

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of a tensor if every dim is known."""
        value = self.constant(name) if self.is_constant(name) else None
        if value is not None:
            return value.shape
        vi = self.value_info.get(name)
        if vi is None or not vi.type.tensor_type.HasField("shape"):
            return None
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            return tuple(d.dim_value for d in dims)
        return None


class NameGenerator:
    """Fresh tensor/node names that collide with nothing in the graph, its subgraphs included."""

    def __init__(self, graph: onnx.GraphProto):
        self.used: set[str] = set()
        self._collect(graph)

    def _collect(self, graph: onnx.GraphProto) -> None:
        self.used.update(t.name for t in graph.initializer)
        self.used.update(i.name for i in graph.input)
        for node in graph.node:
            self.used.update(node.output)
            self.used.add(node.name)
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                    self._collect(sub)

    def __call__(self, base: str) -> str:
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name


# Initializers above this size are replaced by typed inputs before shape inference: inference
# serializes the model, and it needs only the values of small (shape-like) tensors.
_SKELETON_BYTES = 4096


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's data, from its dims (reading `raw_data` would copy it)."""
    n = 1
    for d in tensor.dims:
        n *= d
    return n * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize if tensor.data_type else 0


def is_large(tensor: onnx.TensorProto) -> bool:
    return tensor_nbytes(tensor) > _SKELETON_BYTES


def skeleton(model: onnx.ModelProto, typed_inputs: bool = True) -> onnx.ModelProto:
    """The model with its large initializers turned into typed graph inputs (cheap to serialize), or
    with `typed_inputs=False` simply left out."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = light.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    inputs = {i.name for i in model.graph.input}
    for tensor in model.graph.initializer:
        if not is_large(tensor):
            graph.initializer.append(tensor)
        elif typed_inputs and tensor.name not in inputs:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    return light


def infer_dims(model: onnx.ModelProto, symbolic: bool = False) -> dict[str, tuple[int | str | None, ...]]:
    """Each tensor's dims as onnx shape inference finds them: a number, or with `symbolic` the
    dim_param name ("batch") where inference carried one, else None."""
    dims = {}
    for name, vi in infer_value_info(model).items():
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            dims[name] = tuple(d.dim_value if d.HasField("dim_value")
                               else (d.dim_param or None) if symbolic else None for d in tt.shape.dim)
    return dims


def infer_shapes_light(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Fully static shapes of tensors, as onnx shape inference finds them (empty dict if it fails)."""
    return {name: dims for name, dims in infer_dims(model).items() if all(d is not None for d in dims)}


def without_output_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (a light copy, such as a skeleton) with its graph outputs' shapes forgotten, types
    kept: some exports declare output shapes their graph does not compute, and inference would
    stop at the contradiction."""
    for output in model.graph.output:
        if output.type.HasField("tensor_type"):
            output.type.tensor_type.ClearField("shape")
    return model


def infer_value_info(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Inferred type/shape of every tensor (graph inputs, intermediates, outputs); where the declared
    output shapes contradict the graph, they are ignored."""
    light = skeleton(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception:
        try:
            inferred = onnx.shape_inference.infer_shapes(without_output_shapes(light), data_prop=True)
        except Exception:
            return {}
    infos = {}
    for graph, _ in scopes(inferred):  # subgraphs' tensors too (names are unique across scopes)
        infos.update({vi.name: vi for vi in list(graph.input) + list(graph.value_info) + list(graph.output)})
    return _completed(light, infos)


# Output element types of ONNX Runtime's own ops that onnx's inference does not know, where they are not
# those of the op's first floating-point input: op -> {output index: TensorProto type}
_CONTRIB_OUTPUT_TYPES = {"EmbedLayerNormalization": {1: onnx.TensorProto.INT32}}
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def _completed(light: onnx.ModelProto, infos: dict[str, onnx.ValueInfoProto]) -> dict[str, onnx.ValueInfoProto]:
    """`infos` completed where onnx's inference stops, and inference run again from there until
    nothing new is learnt:
    - ONNX Runtime's own ops (com.microsoft Attention, SkipLayerNormalization, BiasGelu...: models its
      transformer optimizer fused, as deployed) get their outputs' element types: their first
      floating-point input's (the ops compute in it);
    - a typed tensor without a shape gets its rank where `GraphView.rank` finds it from the ops that
      compute it. Before opset 13 exporters build the attention mask with a Reshape to a computed
      shape, which onnx cannot rank, and every tensor after it (all the layers after the first
      attention) then has no shape: MiniLM exported at opset 11."""
    graph = light.graph
    ranked: set[str] = set()  # each tensor is given a rank once, whatever inference then makes of it
    for _ in range(len(graph.node)):
        known = _contrib_types(graph, infos) + _structural_ranks(graph, infos, ranked)
        if not known:
            return infos
        graph.value_info.extend(known)
        try:
            inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
        except Exception:
            return infos
        infos.update({vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)
                      if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type})
    return infos


def _elem(infos: dict[str, onnx.ValueInfoProto], name: str) -> int:
    vi = infos.get(name)
    return vi.type.tensor_type.elem_type if vi is not None and vi.type.HasField("tensor_type") else 0


def _contrib_types(graph: onnx.GraphProto, infos: dict[str, onnx.ValueInfoProto]) -> list[onnx.ValueInfoProto]:
    """Types (no shapes) for the untyped outputs of com.microsoft ops."""
    known = []
    for node in graph.node:
        if node.domain != "com.microsoft" or all(_elem(infos, o) for o in node.output if o):
            continue
        first = next((_elem(infos, i) for i in node.input if _elem(infos, i) in _FLOATS), 0)
        for index, name in enumerate(node.output):
            kind = _CONTRIB_OUTPUT_TYPES.get(node.op_type, {}).get(index, first)
            if name and kind and not _elem(infos, name):
                known.append(onnx.helper.make_tensor_value_info(name, kind, None))
    return known


def _structural_ranks(graph: onnx.GraphProto, infos: dict[str, onnx.ValueInfoProto],
                      ranked: set[str]) -> list[onnx.ValueInfoProto]:
    """Rank-only shapes (every dim unknown) for typed tensors of the main graph that inference left
    without a shape, where the ops computing them tell the rank (each name once: `ranked`)."""
    view = GraphView(graph)
    view.value_info.update(infos)
    known = []
    for node in graph.node:
        for name in node.output:
            vi = infos.get(name)
            if not name or name in ranked or not _elem(infos, name) or vi.type.tensor_type.HasField("shape"):
                continue
            rank = view.rank(name)
            if rank is not None:
                ranked.add(name)
                known.append(onnx.helper.make_tensor_value_info(name, _elem(infos, name), [None] * rank))
    return known
