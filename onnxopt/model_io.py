"""Loading and saving ONNX models: clear errors for bad files, atomic writes, external data past 2 GB."""
from __future__ import annotations

import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import OnnxoptError
from .tempfiles import temporary

PROTOBUF_LIMIT = 2**31 - 1
# Set on models read with external data, so `inspect` can say so after the data was loaded.
EXTERNAL_DATA_MARK = "onnxopt.loaded_external_data"
# Past this many bytes of tensor data a model is saved with external data: protobuf cannot
# serialize a message over 2 GB, and the rest of the model needs some headroom.
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT - 64 * 2**20


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Reads an ONNX file (and its external data), or raises OnnxoptError saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise OnnxoptError(f"no such file: {path}", "check the path")
    if path.is_dir():
        raise OnnxoptError(f"{path} is a directory, not an ONNX file", "pass the .onnx file inside it")
    size = path.stat().st_size
    if size == 0:
        raise OnnxoptError(f"{path} is empty", "re-export the model")
    if size > PROTOBUF_LIMIT:
        raise OnnxoptError(
            f"{path} is {size / 2**30:.1f} GB in one file; protobuf cannot read a message over 2 GB",
            "re-save it with its weights as external data (onnx.save_model(..., save_as_external_data=True))",
        )
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise OnnxoptError(
            f"{path} is not a valid ONNX model (protobuf parse failed: {_first_line(exc)})",
            "is the file truncated, or another format?",
        ) from exc
    if not model.opset_import or not model.HasField("graph"):
        raise OnnxoptError(f"{path} is not an ONNX model (no graph or opset)", "is it another format?")
    if not all(isinstance(n.op_type, str) and isinstance(n.name, str) for n in model.graph.node):
        raise OnnxoptError(f"{path} is corrupt (a node name or op type is not valid text)", "re-export the model")
    _load_external_data(model, path)
    check_tensor_sizes(model, str(path))
    check_opset(model, str(path))
    return model


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    from onnx.external_data_helper import _get_all_tensors, load_external_data_for_model, uses_external_data

    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            _check_external_location(_external_location(tensor), tensor.name, path)
    missing = sorted({
        loc for t in _get_all_tensors(model) if uses_external_data(t)
        for loc in [_external_location(t)] if not (path.parent / loc).exists()
    })
    if missing:
        raise OnnxoptError(
            f"{path} refers to external data file(s) {', '.join(missing)} that are missing",
            f"keep them next to the model in {path.parent}",
        )
    files_read = sorted({str((path.parent / _external_location(t)).resolve()) for t in _get_all_tensors(model)
                         if uses_external_data(t)})
    if files_read:
        try:
            load_external_data_for_model(model, str(path.parent))
        except (ValueError, OSError) as exc:
            files = ", ".join(sorted({_external_location(t) for t in _get_all_tensors(model) if uses_external_data(t)}))
            raise OnnxoptError(f"{path}: its external data ({files}) cannot be read ({str(exc).splitlines()[0][:150]})",
                               "is the .data file truncated or from another model?") from None
        model.metadata_props.add(key=EXTERNAL_DATA_MARK, value="\n".join(files_read))


def _external_location(tensor: onnx.TensorProto) -> str:
    return next((e.value for e in tensor.external_data if e.key == "location"), "")


def _check_external_location(location: str, tensor: str, path: Path) -> None:
    """External data must be a plain file beside the model or below its folder: an absolute path, a
    '..' or a symlink could make a crafted model read any file on the machine (onnx refuses them too)."""
    target = path.parent / location
    if (Path(location).is_absolute() or target.is_symlink()
            or path.parent.resolve() not in target.resolve().parents):
        raise OnnxoptError(f"{path}: tensor '{tensor}' keeps its data at '{location}', outside the model's folder "
                           "(absolute, '..' or a symlink); onnxopt does not read it",
                           f"move the data file next to the model in {path.parent} and point location at it")


def check_tensor_sizes(model: onnx.ModelProto, where: str = "the model") -> None:
    """Every initializer holds as many bytes as its dims and type say (a truncated or crafted file
    otherwise fails deep inside numpy or ORT). Sizing a tensor's message does not copy its data."""
    from .graph import tensor_nbytes

    for tensor in model.graph.initializer:
        if not tensor.HasField("raw_data") or not tensor.data_type:
            continue
        try:
            declared = tensor_nbytes(tensor)
        except Exception:  # an unknown data type: ORT says so later, in its own words
            continue
        held = tensor.ByteSize()  # >= len(raw_data): the message holds the name and dims too
        if held < declared:
            dims = "x".join(map(str, tensor.dims)) or "scalar"
            raise OnnxoptError(f"{where}: initializer '{tensor.name}' declares {_bytes(declared)} ({dims}) but holds "
                               f"{_bytes(held)} of data", "the file is truncated or corrupt: re-export the model")


def _bytes(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def check_opset(model: onnx.ModelProto, where: str = "the model") -> None:
    """Raises when the default-domain opset is one onnx (and so ORT) does not know."""
    newest = onnx.defs.onnx_opset_version()
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not 1 <= imp.version <= newest:
            raise OnnxoptError(
                f"{where} uses opset {imp.version}, but this onnx supports opsets 1 to {newest}",
                "convert it with onnx.version_converter or upgrade onnx/onnxruntime",
            )


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data held by initializers and Constant nodes (what decides external data)."""
    from onnx.external_data_helper import _get_all_tensors

    from .graph import tensor_nbytes

    return sum(tensor_nbytes(t) for t in _get_all_tensors(model))


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Writes atomically (temp file in the same folder, then rename); external data when over 2 GB.

    `external_data=None` decides by size; the data file is `<name>.data` beside the model.
    """
    path = Path(path)
    check_writable(path)
    if external_data is None:
        external_data = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    old_data = _external_files(path) if path.exists() else set()
    data_name, placed = None, False
    try:
        with temporary(path.parent, f".{path.name}.", directory=True) as tmpdir:
            tmp_model = tmpdir / path.name
            if external_data:
                # `<name>.data`, unless the model being replaced uses that name: then the new data goes
                # beside it, so the old model keeps intact data until the new model file is in place.
                data_name = next(n for n in (f"{path.name}.data", f"{path.name}.next.data") if n not in old_data)
                onnx.save_model(_without_mark(model, always_copy=True), str(tmp_model), save_as_external_data=True,
                                all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
                os.replace(tmpdir / data_name, path.parent / data_name)
            else:
                tmp_model.write_bytes(_without_mark(model).SerializeToString())
            os.replace(tmp_model, path)
            placed = True
    except BaseException as exc:  # stopped before the model was in place: no new data file stays behind
        if data_name and data_name not in old_data and not placed:
            (path.parent / data_name).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OnnxoptError(f"cannot write {path}: {exc.strerror or exc}", "choose a writable output path") from exc
        raise
    for stale in old_data - {data_name}:
        (path.parent / stale).unlink(missing_ok=True)
    return path


def _external_files(path: Path) -> set[str]:
    """External data files a model file refers to (read without its data)."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    try:
        existing = onnx.load_model(str(path), load_external_data=False)
    except Exception:
        return set()
    return {_external_location(t) for t in _get_all_tensors(existing) if uses_external_data(t)
            and (path.parent / _external_location(t)).resolve().parent == path.parent.resolve()}


def _without_mark(model: onnx.ModelProto, always_copy: bool = False) -> onnx.ModelProto:
    """The model without onnxopt's bookkeeping metadata (a copy when anything must change)."""
    if not always_copy and not any(p.key == EXTERNAL_DATA_MARK for p in model.metadata_props):
        return model
    copy = _copy(model)
    kept = [p for p in copy.metadata_props if p.key != EXTERNAL_DATA_MARK]
    del copy.metadata_props[:]
    copy.metadata_props.extend(kept)
    return copy


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def loaded_with_external_data(model: onnx.ModelProto) -> bool:
    return any(p.key == EXTERNAL_DATA_MARK for p in model.metadata_props)


def external_data_files(model: onnx.ModelProto) -> list[Path]:
    """The external data files `load_model` read this model's weights from."""
    return [Path(f) for p in model.metadata_props if p.key == EXTERNAL_DATA_MARK for f in p.value.splitlines() if f]


def check_writable(path: Path) -> None:
    """Fails early, before any work, when the output cannot be written: outputs are written to a
    temporary file beside them and renamed, so the folder must take a new file, and the target must
    be a regular file (renaming over a device or a FIFO would replace it)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OnnxoptError(f"output {path} is a directory", "give a file name ending in .onnx")
    if path.exists() and not path.is_file():
        raise OnnxoptError(f"output {path} is not a regular file (a device, FIFO or socket)",
                           "onnxopt writes outputs by renaming a new file over them: give a file path")
    if not parent.is_dir():
        raise OnnxoptError(f"cannot write {path}: folder {parent} does not exist", "create it first")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OnnxoptError(f"cannot write {path}: permission denied", "choose a writable output path")
    try:  # the real test: /proc, read-only mounts and full disks pass the access() check
        with temporary(parent, f".{path.name}."):
            pass
    except OSError as exc:
        raise OnnxoptError(f"cannot write {path}: {exc.strerror or exc}", "choose a writable output path") from None


def file_size(model: onnx.ModelProto) -> int:
    """Bytes the model takes on disk (serialized proto plus its tensor data), to within a few bytes per
    large tensor: the model without its large initializers plus each of those, which is much cheaper
    than sizing the whole message."""
    from .graph import is_large, skeleton, tensor_nbytes

    large = [t for t in model.graph.initializer if is_large(t)]
    # a large tensor's bytes: its data, name and dims plus a few tag/length bytes (sizing it would copy it)
    return skeleton(model, typed_inputs=False).ByteSize() + sum(
        tensor_nbytes(t) + len(t.name) + 10 * len(t.dims) + 16 for t in large)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
