"""Model inputs generated from the input signature (for validation and timing when no data is given).

Generated values are plausible rather than meaningful: floats ~ N(0, 1); integer inputs named like a
mask are ones, like token types zeros, other integers (token ids, indices) small non-negative values
so that any Gather/Embedding stays in range.
"""
from __future__ import annotations

import os

import numpy as np
import onnx

from .errors import OnnxoptError


def real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (the ones a caller feeds)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def parse_shapes(items: list[str] | None) -> dict[str, tuple[int, ...]]:
    """`input_ids=1x128` (or `1,128`) -> {"input_ids": (1, 128)}."""
    shapes = {}
    for item in items or []:
        name, sep, dims = item.partition("=")
        try:
            if not sep:
                raise ValueError
            shapes[name.strip()] = tuple(int(d) for d in dims.replace(",", "x").split("x"))
            if any(d < 1 for d in shapes[name.strip()]):
                raise ValueError
        except ValueError:
            raise OnnxoptError(f"malformed --shape '{item}'",
                               "write NAME=DIMxDIM with positive dims, e.g. input_ids=1x128") from None
    return shapes


def input_shape(vi: onnx.ValueInfoProto, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    declared = vi.type.tensor_type.shape.dim
    if vi.name in shapes:
        shape = shapes[vi.name]
        if vi.type.tensor_type.HasField("shape") and len(shape) != len(declared):
            raise OnnxoptError(f"--shape {vi.name} has {len(shape)} dims, the input has rank {len(declared)}")
        fixed = [(i, d.dim_value) for i, d in enumerate(declared) if d.HasField("dim_value") and d.dim_value > 0]
        for i, want in fixed:
            if shape[i] != want:
                raise OnnxoptError(f"--shape {vi.name}: dim {i} is fixed to {want} in the model, not {shape[i]}")
        return shape
    dims = []
    for d in declared:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(d.dim_value)
        elif d.dim_param and len(shapes.get(d.dim_param, ())) == 1:
            dims.append(shapes[d.dim_param][0])  # a dynamic dim given by name: --shape batch=1
        else:
            label = d.dim_param or "?"
            example = "x".join(str(x.dim_value) if x.HasField("dim_value") and x.dim_value > 0 else "N"
                               for x in declared)
            by_name = f", or name the dim: --shape {d.dim_param}=N" if d.dim_param else ""
            raise OnnxoptError(f"input '{vi.name}' has a dynamic dimension '{label}'",
                               f"give its shape with --shape {vi.name}={example}{by_name}")
    return tuple(dims)


def generate_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None,
                    seed: int = 0) -> dict[str, np.ndarray]:
    shapes = shapes or {}
    dim_names = {d.dim_param for i in real_inputs(model) for d in i.type.tensor_type.shape.dim if d.dim_param}
    unknown = set(shapes) - {i.name for i in real_inputs(model)} - dim_names
    if unknown:
        raise OnnxoptError(f"--shape names unknown input(s) {', '.join(sorted(unknown))}",
                           f"inputs are {', '.join(i.name for i in real_inputs(model))}"
                           + (f"; dynamic dims are {', '.join(sorted(dim_names))}" if dim_names else ""))
    rng = np.random.default_rng(seed)
    planned = {}
    for vi in real_inputs(model):
        if not vi.type.HasField("tensor_type"):
            raise OnnxoptError(f"input '{vi.name}' is not a tensor", "pass its values with --data")
        planned[vi.name] = (np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)),
                            input_shape(vi, shapes))
    need = sum(int(np.prod(shape, dtype=object)) * dtype.itemsize for dtype, shape in planned.values())
    available = available_memory()
    if available is not None and need > available // 2:  # the model's own activations need room too
        listed = ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, (_, shape) in planned.items())
        raise OnnxoptError(f"the sample inputs would take {need / 2**30:.1f} GB ({listed}); this machine has "
                           f"{available / 2**30:.1f} GB available", "give a smaller --shape")
    return {name: _values(name.lower(), dtype, shape, rng) for name, (dtype, shape) in planned.items()}


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux: MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _values(name: str, dtype: np.dtype, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if dtype == np.bool_:
        return np.ones(shape, dtype=bool)
    if np.issubdtype(dtype, np.integer):
        if "mask" in name:
            return np.ones(shape, dtype=dtype)
        if "type" in name or "segment" in name or "position" in name:
            return np.zeros(shape, dtype=dtype)
        return rng.integers(0, 100, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)

