"""Model inputs for validation and timing: generated from the input signature or read from files.

Generated values are plausible rather than meaningful: floats ~ N(0, 1); integer inputs named like a
mask are ones, like token types zeros, other integers (token ids, indices) small non-negative values
so that any Gather/Embedding stays in range.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

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
    feeds = {}
    for vi in real_inputs(model):
        if not vi.type.HasField("tensor_type"):
            raise OnnxoptError(f"input '{vi.name}' is not a tensor", "pass its values with --data")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        shape = input_shape(vi, shapes)
        feeds[vi.name] = _values(vi.name.lower(), dtype, shape, rng)
    return feeds


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


def load_data(path: str | Path, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Feeds from an .npz of arrays named like the inputs, or a `test_data_set_*` folder of .pb tensors."""
    path = Path(path)
    names = [i.name for i in real_inputs(model)]
    if path.is_dir():
        files = sorted(path.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
        if not files:
            raise OnnxoptError(f"{path} holds no input_*.pb tensors", "pass an .npz or a test_data_set_* folder")
        feeds = {}
        for name, file in zip(names, files):
            tensor = onnx.TensorProto()
            tensor.ParseFromString(file.read_bytes())
            feeds[name] = numpy_helper.to_array(tensor)
    elif path.suffix == ".npz" and path.is_file():
        feeds = {k: v for k, v in read_npz(path).items() if k in names}
    else:
        raise OnnxoptError(f"data file not found or not .npz: {path}", "pass an .npz named by input")
    check_feeds(feeds, model, str(path))
    return feeds


def read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise OnnxoptError(f"{path} is not a readable .npz file ({str(exc).splitlines()[0][:100]})",
                           "write it with numpy.savez") from None


def check_feeds(feeds: dict[str, np.ndarray], model: onnx.ModelProto, where: str) -> None:
    """Every input present, with its element type and rank; raises one clear line otherwise."""
    for vi in real_inputs(model):
        if vi.name not in feeds:
            raise OnnxoptError(f"{where} has no array for input '{vi.name}'",
                               f"inputs are {', '.join(i.name for i in real_inputs(model))}")
        want = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        got = feeds[vi.name]
        if got.dtype != want:
            raise OnnxoptError(f"{where}: input '{vi.name}' is {got.dtype}, the model wants {want}")
        rank = len(vi.type.tensor_type.shape.dim)
        if vi.type.tensor_type.HasField("shape") and got.ndim != rank:
            raise OnnxoptError(f"{where}: input '{vi.name}' has rank {got.ndim}, the model wants rank {rank}")
