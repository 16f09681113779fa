"""Reading model inputs from files, one reader per format, and the one check every feed passes.

Formats: `.npz` (arrays named by input), `.npy` (one array, memory-mapped), `.pb` (a TensorProto),
and ONNX `test_data_set_*` folders (`input_0.pb`, `input_1.pb`, ... mapped to the model's real
inputs in order). Both `--data` (sample inputs for the comparison) and representative data
(`--calib`) read through these functions, so a file is read and refused the same way whichever
flag named it.
"""
from __future__ import annotations

import contextlib
import re
import zipfile
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from ..errors import OnnxoptError
from ..inputs import real_inputs

Feeds = dict[str, np.ndarray]


@contextlib.contextmanager
def readable(path: Path, kind: str, hint: str):
    """Turns a reader's failure on a corrupt file into one OnnxoptError line."""
    try:
        yield
    except (OSError, ValueError, TypeError, EOFError, zipfile.BadZipFile, DecodeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:150]
        raise OnnxoptError(f"cannot read {path} as {kind} ({first})", hint) from exc


def read_npz(path: Path) -> Feeds:
    if path.is_file() and not zipfile.is_zipfile(path):  # numpy would try to unpickle it
        raise OnnxoptError(f"{path} is not an .npz (not a zip archive)",
                           "write it with numpy.savez(path, input_name=array, ...)")
    with readable(path, ".npz", "write it with numpy.savez(path, input_name=array, ...)"), \
            np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def read_npy(path: Path) -> np.ndarray:
    with readable(path, ".npy", "write it with numpy.save"):
        return np.load(path, mmap_mode="r", allow_pickle=False)  # memory-mapped: only sliced batches are read


def read_pb(path: Path, vi: onnx.ValueInfoProto | None = None):
    """A TensorProto as an array; for an input typed as a sequence or an optional, the SequenceProto
    (a list) or OptionalProto (its value, or None) the onnx test data writes for it."""
    kind = vi.type.WhichOneof("value") if vi is not None else "tensor_type"
    proto, convert, hint = {
        "sequence_type": (onnx.SequenceProto, numpy_helper.to_list, "onnx.numpy_helper.from_list"),
        "optional_type": (onnx.OptionalProto, numpy_helper.to_optional, "onnx.numpy_helper.from_optional"),
    }.get(kind, (onnx.TensorProto, numpy_helper.to_array, "onnx.numpy_helper.from_array"))
    with readable(path, proto.__name__, f"write it with {hint}"):
        message = proto()
        message.ParseFromString(path.read_bytes())
        return convert(message)


def numeric_suffix(path: Path) -> int:
    digits = re.search(r"(\d+)$", path.stem)
    return int(digits.group(1)) if digits else -1


def test_set_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("input_*.pb"), key=numeric_suffix)


def read_test_set(folder: Path, model: onnx.ModelProto) -> Feeds:
    """One ONNX test_data_set_* folder: input_i.pb is the model's i-th real input."""
    files = test_set_files(folder)
    inputs = real_inputs(model)
    names = [vi.name for vi in inputs]
    if not files and inputs:
        raise OnnxoptError(f"{folder} holds no input_*.pb tensors", "pass an .npz or a test_data_set_* folder")
    if len(files) > len(names):
        raise OnnxoptError(f"{folder} has {len(files)} input_*.pb tensors, the model takes {len(names)}",
                           f"the model's inputs are {', '.join(names)}")
    return {vi.name: read_pb(file, vi) for vi, file in zip(inputs, files)}


def model_shape(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]


def validate_feeds(feeds: Feeds, model: onnx.ModelProto, where: str, *, cast_hint: str = "") -> None:
    """Every real input present and nothing else, each with the model's element type (never cast
    silently), rank and fixed dimensions; raises one line naming `where` otherwise."""
    inputs = {vi.name: vi for vi in real_inputs(model)}
    expected = ", ".join(inputs)
    unknown = sorted(set(feeds) - set(inputs))
    if unknown:
        raise OnnxoptError(f"{where} has data for unknown input(s) {', '.join(unknown)}",
                           f"the model's inputs are {expected}")
    missing = [name for name in inputs if name not in feeds]
    if missing:
        raise OnnxoptError(f"{where} has no data for input(s) {', '.join(missing)}", f"the model's inputs are {expected}")
    for name, vi in inputs.items():
        if not vi.type.HasField("tensor_type"):
            _validate_other(feeds[name], vi, where)
            continue
        tensor_type, array = vi.type.tensor_type, feeds[name]
        want = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        if array.dtype != want:
            raise OnnxoptError(f"{where}: input '{name}' is {array.dtype}, the model wants {want}",
                               f"convert it with .astype(np.{want}){cast_hint}")
        if not tensor_type.HasField("shape"):
            continue
        dims = tensor_type.shape.dim
        if array.ndim != len(dims):
            raise OnnxoptError(f"{where}: input '{name}' has rank {array.ndim} {list(array.shape)}, "
                               f"the model wants rank {len(dims)} {model_shape(vi)}")
        for axis, (dim, got) in enumerate(zip(dims, array.shape)):
            if dim.HasField("dim_value") and dim.dim_value > 0 and dim.dim_value != got:
                raise OnnxoptError(f"{where}: input '{name}' has shape {list(array.shape)}, the model wants "
                                   f"{model_shape(vi)} (dimension {axis} is {got}, not {dim.dim_value})")


def _validate_other(value, vi: onnx.ValueInfoProto, where: str) -> None:
    """A sequence input needs a list; an optional one a value or None (ORT judges the elements)."""
    kind = vi.type.WhichOneof("value")
    if kind == "sequence_type" and not isinstance(value, (list, tuple)):
        raise OnnxoptError(f"{where}: input '{vi.name}' is a sequence, not a {type(value).__name__}",
                           "give a list of arrays (a SequenceProto in a test_data_set folder)")


def load_feeds(path: str | Path, model: onnx.ModelProto) -> Feeds:
    """Sample inputs (`--data`): an .npz of arrays named like the inputs (other arrays are ignored),
    or one test_data_set_* folder; validated against the model."""
    path = Path(path)
    if path.is_dir():
        feeds = read_test_set(path, model)
    elif path.suffix == ".npz" and path.is_file():
        names = {vi.name for vi in real_inputs(model)}
        feeds = {k: v for k, v in read_npz(path).items() if k in names}
    else:
        raise OnnxoptError(f"data file not found or not .npz: {path}", "pass an .npz named by input")
    validate_feeds(feeds, model, str(path))
    return feeds
