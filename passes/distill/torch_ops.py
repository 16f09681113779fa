"""ONNX operators written in torch, for `torch_graph.TorchGraph`: each function takes the node's
`Attrs`, the default-domain opset, and its inputs as tensors (None for an omitted optional input),
and returns its outputs (a tensor or a list). Semantics follow the ONNX operator docs, including the
version differences our models meet (axes as attributes before opset 13 and as inputs after,
Softmax's 2-D coercion before 13, Clip's bounds before 11).

Shape arithmetic (Shape, Gather on shapes, Concat of ints, Range) runs in torch on int64 tensors
too: its values are not trained, and `.tolist()` turns them into Python ints where torch wants them.
"""
from __future__ import annotations

import math

import onnx
import torch
import torch.nn.functional as F
from onnx import helper

from onnxopt.graph import attribute

_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool,
}


def torch_dtype(onnx_type: int) -> torch.dtype:
    if onnx_type not in _DTYPES:
        raise NotImplementedError(f"element type {helper.tensor_dtype_to_np_dtype(onnx_type)}")
    return _DTYPES[onnx_type]


class Attrs:
    def __init__(self, node: onnx.NodeProto):
        self.node = node

    def __call__(self, name: str, default=None):
        value = attribute(self.node, name, default)
        return value.decode() if isinstance(value, bytes) else value


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axes(a: Attrs, opset: int, since: int, given: torch.Tensor | None) -> list[int] | None:
    return a("axes") if opset < since else _ints(given)


def _binary(fn):
    return lambda a, opset, x, y: fn(x, y)


def _unary(fn):
    return lambda a, opset, x: fn(x)


def _div(a, opset, x, y):
    if x.dtype.is_floating_point:
        return x / y
    return torch.div(x, y, rounding_mode="trunc")  # ONNX integer Div truncates, as C does


def _variadic(fn):
    def apply(a, opset, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out
    return apply


def _softmax(fn):
    def apply(a, opset, x):
        if opset >= 13:
            return fn(x, dim=a("axis", -1))
        axis = a("axis", 1) % x.dim()  # before 13: coerced to 2-D at axis
        flat = x.reshape(math.prod(x.shape[:axis]), -1)
        return fn(flat, dim=1).reshape(x.shape)
    return apply


def _clip(a, opset, x, low=None, high=None):
    if opset < 11:
        low, high = a("min"), a("max")
    return torch.clamp(x, low, high)


def _cast(a, opset, x):
    return x.to(torch_dtype(a("to")))


def _gemm(a, opset, x, w, c=None):
    x = x.t() if a("transA", 0) else x
    w = w.t() if a("transB", 0) else w
    y = a("alpha", 1.0) * (x @ w)
    return y if c is None else y + a("beta", 1.0) * c


def _pads(a, x_shape, kernel, strides, dilations):
    """(begin..., end...) spatial padding, from `pads` or `auto_pad`."""
    spatial = len(kernel)
    auto = a("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(x_shape[2:], kernel, strides, dilations):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begin.append(large if auto == "SAME_LOWER" else small)
            end.append(small if auto == "SAME_LOWER" else large)
        return begin + end
    if auto == "VALID":
        return [0] * (2 * spatial)
    return list(a("pads", [0] * (2 * spatial)))


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX (b1, b2, .., e1, e2, ..) as F.pad's (last axis first) pairs."""
    n = len(pads) // 2
    return [p for i in reversed(range(n)) for p in (pads[i], pads[n + i])]


def _conv(a, opset, x, w, b=None):
    kernel = list(w.shape[2:])
    strides, dilations = a("strides", [1] * len(kernel)), a("dilations", [1] * len(kernel))
    pads = _pads(a, x.shape, kernel, strides, dilations)
    n = len(kernel)
    if pads[:n] == pads[n:]:
        padding = pads[:n]
    else:
        x, padding = F.pad(x, _torch_pad(pads)), 0
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    return conv(x, w, b, stride=strides, padding=padding, dilation=dilations, groups=a("group", 1))


def _pool(kind: str):
    def apply(a, opset, x):
        kernel = a("kernel_shape")
        n = len(kernel)
        strides, dilations = a("strides", [1] * n), a("dilations", [1] * n)
        pads = _pads(a, x.shape, kernel, strides, dilations)
        ceil = bool(a("ceil_mode", 0))
        symmetric = pads[:n] == pads[n:] and all(p <= k // 2 for p, k in zip(pads[:n], kernel))
        if kind == "max":
            if not symmetric:
                x, pads = F.pad(x, _torch_pad(pads), value=-math.inf), [0] * (2 * n)
            pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[n]
            return pool(x, kernel, strides, pads[:n], dilations, ceil_mode=ceil)
        include = bool(a("count_include_pad", 0))
        pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[n]
        if symmetric:
            return pool(x, kernel, strides, pads[:n], ceil_mode=ceil, count_include_pad=include)
        padded = F.pad(x, _torch_pad(pads))
        total = pool(padded, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
        if include:
            return total
        # the mean over the real positions only: window sums of x over window sums of a mask of them
        real = F.pad(torch.ones_like(x[:, :1]), _torch_pad(pads))
        return total / pool(real, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    return apply


def _global_pool(fn):
    return lambda a, opset, x: fn(x, dim=tuple(range(2, x.dim())), keepdim=True)


def _batch_norm(a, opset, x, scale, bias, mean, var):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    inv = scale / torch.sqrt(var + a("epsilon", 1e-5))
    return (x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)


def _layer_norm(a, opset, x, scale, bias=None):
    axis = a("axis", -1) % x.dim()
    return F.layer_norm(x, x.shape[axis:], scale, bias, a("epsilon", 1e-5))


def _lrn(a, opset, x):
    return F.local_response_norm(x, a("size"), a("alpha", 1e-4), a("beta", 0.75), a("bias", 1.0))


def _reshape(a, opset, x, shape):
    dims = _ints(shape)
    if not a("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _flatten(a, opset, x):
    axis = a("axis", 1) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _transpose(a, opset, x):
    return x.permute(a("perm", list(reversed(range(x.dim())))))


def _squeeze(a, opset, x, axes=None):
    dims = _axes(a, opset, 13, axes)
    if dims is None:
        return x.squeeze()
    for d in sorted((d % x.dim() for d in dims), reverse=True):
        x = x.squeeze(d)
    return x


def _unsqueeze(a, opset, x, axes=None):
    dims = _axes(a, opset, 13, axes)
    rank = x.dim() + len(dims)
    for d in sorted(d % rank for d in dims):
        x = x.unsqueeze(d)
    return x


def _concat(a, opset, *xs):
    return torch.cat([x for x in xs if x is not None], dim=a("axis"))


def _split(a, opset, x, split=None):
    axis = a("axis", 0)
    sizes = a("split") if opset < 13 else _ints(split)
    outputs = len(a.node.output)
    if sizes is None:
        size = x.shape[axis]
        chunk = -(-size // outputs)
        sizes = [min(chunk, size - i * chunk) for i in range(outputs)]
    return list(torch.split(x, sizes, dim=axis))


def _slice(a, opset, x, starts=None, ends=None, axes=None, steps=None):
    if opset < 10:
        starts, ends, axes = a("starts"), a("ends"), a("axes")
        steps = None
    else:
        starts, ends, axes, steps = _ints(starts), _ints(ends), _ints(axes), _ints(steps)
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= x.dim()
        size = x.shape[axis]
        if step > 0:
            start = max(0, min(size, start + size if start < 0 else start))
            end = max(0, min(size, end + size if end < 0 else end))
            index[axis] = slice(start, end, step)
        else:  # torch slices forward only: take the range, then flip it
            start = max(-1, min(size - 1, start + size if start < 0 else start))
            end = max(-1, min(size - 1, end + size if end < 0 else end))
            picked = list(range(start, end, step))
            index[axis] = torch.tensor(picked, dtype=torch.long) if picked else slice(0, 0)
    out = x
    for axis, item in enumerate(index):  # one axis at a time: tensor indices on several axes would broadcast
        if not (isinstance(item, slice) and item == slice(None)):
            out = out[(slice(None),) * axis + (item,)]
    return out


def _gather(a, opset, x, indices):
    axis = a("axis", 0) % x.dim()
    idx = torch.where(indices < 0, indices + x.shape[axis], indices).long()
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])


def _gather_nd(a, opset, x, indices):
    """Output [indices.shape[:-1], x.shape[b + k:]]: each index row picks x[batch..., i_0, ..., i_k-1]."""
    b, k = a("batch_dims", 0), indices.shape[-1]
    flat = x.reshape((-1,) + tuple(x.shape[b:]))  # the batch dims as one
    rows = indices.reshape(flat.shape[0], -1, k).long()
    rows = torch.where(rows < 0, rows + torch.tensor(x.shape[b:b + k]), rows)
    batch = torch.arange(flat.shape[0]).unsqueeze(1).expand(rows.shape[:2])
    picked = flat[(batch, *rows.unbind(-1))]
    return picked.reshape(tuple(indices.shape[:-1]) + tuple(x.shape[b + k:]))


def _shape(a, opset, x):
    dims = list(x.shape)[a("start", 0):a("end", None)] if opset >= 15 else list(x.shape)
    return torch.tensor(dims, dtype=torch.int64)


def _constant_of_shape(a, opset, shape):
    value = a("value")
    fill = onnx.numpy_helper.to_array(value) if value is not None else None
    dims = _ints(shape)
    if fill is None:
        return torch.zeros(dims, dtype=torch.float32)
    return torch.full(dims, fill.reshape(-1)[0].item(), dtype=torch_dtype(value.data_type))


def _range(a, opset, start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


def _expand(a, opset, x, shape):
    dims = _ints(shape)
    rank = max(len(dims), x.dim())
    dims = [1] * (rank - len(dims)) + dims
    have = [1] * (rank - x.dim()) + list(x.shape)
    return x.reshape(have).expand([max(d, h) if d == 1 or h == 1 else d for d, h in zip(dims, have)])


def _reduce(fn):
    def apply(a, opset, x, axes=None):
        since = 18 if a.node.op_type != "ReduceSum" else 13
        dims = _axes(a, opset, since, axes)
        keep = bool(a("keepdims", 1))
        if not dims:
            if a("noop_with_empty_axes", 0):
                return x
            dims = list(range(x.dim()))
        return fn(x, dim=tuple(d % x.dim() for d in dims), keepdim=keep)
    return apply


def _reduce_max(x, dim, keepdim):
    return torch.amax(x, dim=dim, keepdim=keepdim)


def _norm(order: int):
    """ReduceL1 / ReduceL2 (an exported F.normalize: sentence-transformers' pooled embeddings)."""
    return lambda x, dim, keepdim: torch.linalg.vector_norm(x, order, dim=dim, keepdim=keepdim)


def _where(a, opset, condition, x, y):
    return torch.where(condition, x, y)


def _gelu(a, opset, x):
    return F.gelu(x, approximate="tanh" if a("approximate", "none") == "tanh" else "none")


def _pad(a, opset, x, pads=None, value=None, axes=None):
    mode = a("mode", "constant")
    pads = a("pads") if opset < 11 else _ints(pads)
    fill = a("value", 0.0) if opset < 11 else (0.0 if value is None else value.item())
    if axes is not None:
        raise NotImplementedError("Pad with axes")
    if mode != "constant":
        raise NotImplementedError(f"Pad mode {mode}")
    return F.pad(x, _torch_pad(pads), value=fill)


def _trilu(a, opset, x, k=None):
    shift = 0 if k is None else int(k.item())
    return torch.triu(x, shift) if a("upper", 1) else torch.tril(x, shift)


def _cumsum(a, opset, x, axis):
    dim = int(axis.item())
    if a("reverse", 0):
        x = torch.flip(x, [dim])
    total = torch.cumsum(x, dim)
    if a("exclusive", 0):
        total = total - x
    return torch.flip(total, [dim]) if a("reverse", 0) else total


OPS = {
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _div,
    "Pow": _binary(torch.pow), "MatMul": _binary(torch.matmul), "Equal": _binary(torch.eq),
    "Greater": _binary(torch.gt), "GreaterOrEqual": _binary(torch.ge), "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le), "And": _binary(torch.logical_and), "Or": _binary(torch.logical_or),
    "Not": _unary(torch.logical_not), "Sqrt": _unary(torch.sqrt), "Exp": _unary(torch.exp),
    "Log": _unary(torch.log), "Neg": _unary(torch.neg), "Abs": _unary(torch.abs),
    "Reciprocal": _unary(torch.reciprocal), "Erf": _unary(torch.erf), "Tanh": _unary(torch.tanh),
    "Sigmoid": _unary(torch.sigmoid), "Relu": _unary(torch.relu), "Identity": _unary(lambda x: x),
    "Cos": _unary(torch.cos), "Sin": _unary(torch.sin), "Softplus": _unary(F.softplus),
    "Floor": _unary(torch.floor), "Ceil": _unary(torch.ceil), "Sign": _unary(torch.sign),
    "Dropout": lambda a, opset, x, *rest: x,  # inference semantics: the student trains as it will run
    "LeakyRelu": lambda a, opset, x: F.leaky_relu(x, a("alpha", 0.01)),
    "HardSigmoid": lambda a, opset, x: torch.clamp(a("alpha", 0.2) * x + a("beta", 0.5), 0, 1),
    "HardSwish": _unary(F.hardswish), "Gelu": _gelu, "Clip": _clip, "Cast": _cast,
    "Sum": _variadic(torch.add), "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum),
    "Mean": lambda a, opset, *xs: _variadic(torch.add)(a, opset, *xs) / len(xs),
    "Softmax": _softmax(torch.softmax), "LogSoftmax": _softmax(torch.log_softmax),
    "Gemm": _gemm, "Conv": _conv, "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": _global_pool(torch.mean), "GlobalMaxPool": _global_pool(torch.amax),
    "BatchNormalization": _batch_norm, "LayerNormalization": _layer_norm, "LRN": _lrn,
    "Reshape": _reshape, "Flatten": _flatten, "Transpose": _transpose, "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze, "Concat": _concat, "Split": _split, "Slice": _slice, "Gather": _gather,
    "GatherND": _gather_nd, "Shape": _shape, "ConstantOfShape": _constant_of_shape, "Range": _range,
    "Expand": _expand,
    "ReduceMean": _reduce(torch.mean), "ReduceSum": _reduce(torch.sum), "ReduceMax": _reduce(_reduce_max),
    "ReduceL1": _reduce(_norm(1)), "ReduceL2": _reduce(_norm(2)),
    "Where": _where, "Pad": _pad, "Trilu": _trilu, "CumSum": _cumsum,
}
