"""Where a Reshape's or Expand's target shape and a Split's sizes keep the numbers that must shrink
with a channel group (`groups.py` walks the graph, `shrink.py` edits them).

An exported target is a constant, or a Concat of pieces: constants, and sizes read at run time
(`x.shape[k]` as Gather(Shape(x), k), TorchScript's `x.size(-1)` as a Slice of the Shape), possibly
behind TorchScript's `expand` guard Where(Equal(t, -1), 1, t). A constant entry shrinks; a size read
from a tensor of the group follows by itself.
"""
from __future__ import annotations

import numpy as np
import onnx

from onnxopt.graph import GraphView, attribute


def split_sizes(node: onnx.NodeProto, view: GraphView, total) -> list[int] | None:
    """A Split's output sizes: its `split` input (opset >= 13) or attribute, else equal parts of `total`."""
    if len(node.input) > 1 and node.input[1]:
        value = view.constant(node.input[1])
        return None if value is None else [int(v) for v in value.reshape(-1)]
    given = attribute(node, "split", None)
    if given is not None:
        return [int(v) for v in given]
    parts = len(node.output)
    if not isinstance(total, int) or total % parts:
        return None  # opset 18's num_outputs with a remainder: the last part is smaller
    return [total // parts] * parts


def target_entry(node: onnx.NodeProto, b: int, view: GraphView) -> tuple[str, int, int] | None:
    """Where a Reshape's (or Expand's) target keeps its entry at position b: (constant tensor, element,
    value); None when that entry is computed at run time."""
    found = target_piece(node, b, view)
    value = None if found is None else view.constant(found[2])
    return None if value is None else (found[2], found[3], int(value.reshape(-1)[found[3]]))


def target_piece(node: onnx.NodeProto, b: int, view: GraphView) -> tuple[onnx.NodeProto, int, str, int] | None:
    """Entry b of a Reshape's or Expand's target: (the node that reads the tensor holding it, which of
    its inputs that is, the tensor, the element in it). The tensor is the target itself or a piece of
    the Concat that builds it, seen through TorchScript's `expand` guard Where(Equal(t, -1), 1, t) and
    1-D Reshapes of t."""
    holder, index = node, 1
    while view.constant(holder.input[index]) is None:
        producer = view.producer.get(holder.input[index])
        if producer is not None and producer.op_type == "Reshape" and view.constant(producer.input[1]) is not None \
                and view.constant(producer.input[1]).reshape(-1).tolist() == [-1]:
            holder, index = producer, 0
        elif producer is not None and producer.op_type == "Where" and _expand_guard(producer, view):
            holder, index = producer, 2
        else:
            break
    name = holder.input[index]
    target = view.constant(name)
    if target is not None:
        return (holder, index, name, b) if b < target.size else None
    concat = view.producer.get(name)
    if concat is None or concat.op_type != "Concat":
        return None
    position = 0
    for index, piece in enumerate(concat.input):
        value = view.constant(piece)
        size = 1 if value is None else value.size  # a computed piece is one dim in exported graphs
        if position <= b < position + size:
            return concat, index, piece, b - position
        position += size
    return None


def _expand_guard(where: onnx.NodeProto, view: GraphView) -> bool:
    """Where(Equal(t, -1...), 1..., t): an entry of t that is -1 becomes 1, the others stay (the
    filled tensors constant, or computed from t's shape as TorchScript writes them)."""
    equal = view.producer.get(where.input[0])
    if equal is None or equal.op_type != "Equal" or where.input[2] not in equal.input:
        return False
    other = equal.input[1] if equal.input[0] == where.input[2] else equal.input[0]
    return _filled(where.input[1], view) == 1 and _filled(other, view) == -1


def _filled(name: str, view: GraphView, depth: int = 0) -> float | None:
    """The one value every element of `name` holds, where the graph says so: a constant,
    ConstantOfShape, or a product of such."""
    value = view.constant(name)
    if value is not None:
        flat = np.unique(value)
        return float(flat[0]) if flat.size == 1 else None
    node = view.producer.get(name)
    if node is None or depth > 4:
        return None
    if node.op_type == "ConstantOfShape":
        fill = attribute(node, "value", None)
        return 0.0 if fill is None else float(onnx.numpy_helper.to_array(fill).reshape(-1)[0])
    if node.op_type == "Mul":
        a, b = (_filled(n, view, depth + 1) for n in node.input)
        return None if a is None or b is None else a * b
    return None


def size_read(found: tuple[onnx.NodeProto, int, str, int] | None, view: GraphView,
              dims: dict | None = None) -> tuple[str, int] | None:
    """(tensor, axis) when a computed one-element piece is that tensor's size read at run time, or a
    constant multiple of it: Gather(Shape(tensor), axis) or a one-element Slice of Shape(tensor),
    possibly through Unsqueeze, Squeeze, Cast, Identity and Mul by a constant (TorchScript exports
    write `x.shape[k]`, `x.size(-1)` and `heads * n_rep` so). `dims`: known shapes, for negative
    indices."""
    if found is None:
        return None
    node = view.producer.get(found[2])
    while node is not None and node.op_type in ("Unsqueeze", "Squeeze", "Cast", "Identity", "Mul"):
        if node.op_type == "Mul":
            computed = [n for n in node.input if view.constant(n) is None]
            if len(computed) != 1:
                return None
            node = view.producer.get(computed[0])
            continue
        node = view.producer.get(node.input[0])
    if node is None or node.op_type not in ("Gather", "Slice") or len(node.input) < 2:
        return None
    shape = view.producer.get(node.input[0])
    if shape is None or shape.op_type != "Shape" or attribute(shape, "start", 0) or \
            attribute(shape, "end", None) is not None:
        return None
    rank = len(dims[shape.input[0]]) if dims and shape.input[0] in dims else None
    if node.op_type == "Gather":
        index = view.constant(node.input[1])
        if attribute(node, "axis", 0) != 0 or index is None or index.size != 1:
            return None
        k = int(index.reshape(-1)[0])
        end = None
    else:  # Slice(shape, [k], [k + 1]) or, for the last dim, Slice(shape, [-1], [INT_MAX])
        starts, ends = view.constant(node.input[1]), view.constant(node.input[2]) if len(node.input) > 2 else None
        extra = [view.constant(n) for n in node.input[3:] if n]
        if starts is None or ends is None or starts.size != 1 or any(v is None or v.reshape(-1).tolist() not in
                                                                    ([0], [1]) for v in extra):
            return None
        k, end = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
    if k < 0:
        if rank is None:
            return None
        k += rank
    if end is not None and end != k + 1 and not (rank is not None and k == rank - 1 and end >= rank):
        return None
    return shape.input[0], k


def evaluated_ints(name: str, view: GraphView, dims: dict, depth: int = 0) -> np.ndarray | None:
    """The value of a small integer tensor computed from known dims: Shape of a tensor whose dims are
    known, Gather and Slice of it, elementwise arithmetic, Unsqueeze, Squeeze, Cast, Concat (a plain
    export's chunk() bounds, (x.size(-1) + 1) // 2); None when it depends on anything else."""
    value = view.constant(name)
    if value is not None:
        return value if value.dtype.kind in "iu" and value.size <= 8 else None
    node = view.producer.get(name)
    if node is None or depth > 12:
        return None
    if node.op_type == "Shape":
        shape = dims.get(node.input[0])
        if shape is None:
            return None
        shape = shape[attribute(node, "start", 0):attribute(node, "end", len(shape))]
        return np.array(shape, np.int64) if all(isinstance(d, int) for d in shape) else None
    inputs = [evaluated_ints(n, view, dims, depth + 1) if n else None for n in node.input]
    if node.op_type == "Gather" and inputs[1] is not None and attribute(node, "axis", 0) == 0:
        shape = view.producer.get(node.input[0])
        if inputs[0] is None and shape is not None and shape.op_type == "Shape":  # one known dim of a shape
            known = dims.get(shape.input[0])
            index = int(inputs[1].reshape(-1)[0]) if inputs[1].size == 1 else None
            if known is None or index is None or attribute(shape, "start", 0) or attribute(shape, "end", None):
                return None
            dim = known[index] if -len(known) <= index < len(known) else None
            return np.array(dim, np.int64).reshape(inputs[1].shape) if isinstance(dim, int) else None
        return None if inputs[0] is None else np.take(inputs[0], inputs[1])
    if any(v is None for v, n in zip(inputs, node.input) if n):
        return None
    arithmetic = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.floor_divide}
    if node.op_type in arithmetic:
        return arithmetic[node.op_type](inputs[0], inputs[1]).astype(np.int64)
    if node.op_type in ("Cast", "Identity"):
        return inputs[0].astype(np.int64)
    if node.op_type in ("Unsqueeze", "Squeeze", "Reshape"):
        return inputs[0].reshape(-1) if node.op_type != "Squeeze" or inputs[0].size == 1 else None
    if node.op_type == "Concat":
        return np.concatenate([v.reshape(-1) for v in inputs])
    return None


# ops through which a size read at run time flows on to a target (shape arithmetic)
SIZE_ARITHMETIC = {"Gather", "Slice", "Squeeze", "Unsqueeze", "Concat", "Cast", "Identity", "Mul", "Div", "Add",
                   "Sub", "Mod", "Neg", "Abs", "Max", "Min", "Where", "Equal", "Less", "Greater", "Not",
                   "ReduceProd", "ReduceSum", "Floor", "Ceil", "Reshape"}


def size_targets(shape: onnx.NodeProto, axis: int, view: GraphView, rank: int) -> list[tuple[str, str]]:
    """Where the size at `axis` of the tensor that `shape` (a Shape or Size node) reads ends up as a
    Reshape's or Expand's target, a Slice's bounds or a Gather's indices: [(the node's name, the
    tensor it shapes or cuts)]. Such a size follows the group when it shrinks, so what it shapes or
    cuts must shrink too (nn.MultiheadAttention's export splits its fused projection into (3, E) with
    E read off the query, which shrinks on its input side only). Gather and Slice with constant
    indices that skip `axis` drop the size; past them it is followed through shape arithmetic.
    Raises ValueError, naming the node, where it reaches an op that is not shape arithmetic."""
    start, end = attribute(shape, "start", 0), attribute(shape, "end", rank)
    start, end = start % rank if start < 0 else min(start, rank), end % rank if end < 0 else min(end, rank)
    if shape.op_type == "Shape" and not start <= axis < end:
        return []
    found: list[tuple[str, str]] = []
    # (tensor, position of the size in it while it is still Shape's vector, else None)
    todo, seen = [(shape.output[0], axis - start if shape.op_type == "Shape" else None)], set()
    while todo:
        name, position = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in view.consumers.get(name, []):
            if node.op_type in ("Reshape", "Expand", "Slice", "Gather") and node.input[0] != name:
                # a target, bounds or indices: what they cut or shape must shrink too (a chunk's bounds)
                found.append((node.name or node.output[0], node.input[0]))
                continue
            if node.op_type in ("Shape", "Size"):  # the length of a shape vector, not the size in it
                continue
            if node.op_type not in SIZE_ARITHMETIC:
                raise ValueError(f"{node.op_type} '{node.name or node.output[0]}'")
            if position is not None and node.input[0] == name and node.op_type in ("Gather", "Slice") \
                    and not _picks(node, position, view):
                continue
            todo += [(out, None) for out in node.output if out]
    return found


def _picks(node: onnx.NodeProto, position: int, view: GraphView) -> bool:
    """Whether a Gather or Slice of a shape vector keeps element `position` (True when unsure)."""
    if node.op_type == "Gather":
        index = view.constant(node.input[1]) if len(node.input) > 1 else None
        return index is None or position in [int(i) for i in index.reshape(-1)] or any(i < 0 for i in index.reshape(-1))
    bounds = [view.constant(n) if n else None for n in node.input[1:5]]
    if any(b is None for b in bounds[:2]) or bounds[0].size != 1 or \
            any(b is not None and b.reshape(-1).tolist() not in ([0], [1]) for b in bounds[2:]):
        return True
    lo, hi = int(bounds[0].reshape(-1)[0]), int(bounds[1].reshape(-1)[0])
    return lo < 0 or hi < 0 or lo <= position < hi
