"""Calibration data: sample inputs streamed batch by batch to passes that observe activations.

`open_calibration(source, model)` accepts
  - an `.npz` of arrays named by input, first axis = samples;
  - a directory of `.npy` files (memory-mapped) or `.pb` TensorProtos named by input (`input_ids.npy`),
    first axis = samples;
  - a directory of ONNX `test_data_set_*` folders, or one such folder: `input_0.pb`, `input_1.pb`, ...
    map to the model's real inputs in order, each folder is one batch;
  - `"module:function"` or `"file.py:function"`: the function returns an iterable of feed dicts (batches);
  - from the API, a callable (as above), a dict of arrays (like an .npz), or an iterable of feed dicts;
  - `"random"`: generated from the input signature, for smoke tests only (a loud warning says so).

Every batch is validated against the model before it is yielded (so before any inference on it):
names, element type (never cast silently), rank, and every fixed dimension; dynamic dimensions may
change from batch to batch (sequence lengths). Batches larger than `batch_size` are split along the
first axis; a model whose first dimension is fixed to d gets batches of exactly d. `samples` caps
the samples used. The first batch is checked when the data is opened.

With `trim_padding`, sequence models with a 0/1 attention-mask input get their batches cut after
the longest real sequence (see `calib_padding`), and samples held in arrays are batched in order of
length so each batch is cut as short as it can be; `untrimmed()` yields the batches as given.

`fingerprint()` = sha256 over the yielded batches in order, per input sorted by name:
name, dtype, shape, then the bytes; it keys on-disk caches of what was computed from the data.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import re
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from . import calib_padding
from .errors import OnnxoptError
from .imports import import_object
from .inputs import generate_inputs, real_inputs

Feeds = dict[str, np.ndarray]
RANDOM_SAMPLES = 32
SOURCES_HINT = ("pass an .npz, a directory of .npy/.pb files or test_data_set_* folders, "
                "MODULE:FUNCTION, or 'random'")
_CALLABLE_SPEC = re.compile(r"[\w./\\-]+:[A-Za-z_]\w*")


class CalibrationData:
    """A re-iterable, validated stream of feed dicts of at most `batch_size` samples each."""

    def __init__(self, model: onnx.ModelProto, batches: Callable[[], Iterable[Feeds]], *, description: str,
                 batch_size: int, samples: int | None = None, num_samples: int | None = None,
                 uniform: bool = False, reiterable: bool = True,
                 padding: calib_padding.PaddingLayout | None = None):
        self.description = description
        self.batch_size = batch_size
        self.reiterable = reiterable
        self._inputs = {vi.name: vi for vi in real_inputs(model)}
        self._batches = batches
        self._cap = samples
        self._num_samples = num_samples if samples is None or num_samples is None else min(num_samples, samples)
        self._uniform = uniform  # every raw batch splits predictably: num_batches is known up front
        self._num_batches: int | None = None
        self._fingerprint: str | None = None
        self.padding = padding
        self.positions = [0, 0]  # sequence positions calibrated, and given, over the last trimmed pass
        self._first: Feeds | None = None

    @property
    def num_samples(self) -> int | None:
        """Samples this data yields: known up front for arrays and random data, else after one full pass."""
        return self._num_samples

    @property
    def num_batches(self) -> int | None:
        if self._uniform and self._num_samples is not None:
            return -(-self._num_samples // self.batch_size)
        return self._num_batches

    def __iter__(self) -> Iterator[Feeds]:
        return self._iterate(self.padding)

    def untrimmed(self) -> Iterator[Feeds]:
        """The batches with their padding, as the user gave them."""
        return self._iterate(None)

    def first_batch(self) -> Feeds:
        """The first batch with its padding (for reports and timing). A one-shot source is read ahead
        by one raw batch, which its single pass then gets again."""
        if self._first is None:
            if not self.reiterable:
                self._batches = _read_ahead(self._batches)
            batches = self.untrimmed()
            try:
                self._first = next(batches)
            except StopIteration:
                raise OnnxoptError(f"calibration data {self.description} holds no samples", SOURCES_HINT) from None
            finally:
                batches.close()
        return self._first

    def _iterate(self, padding: calib_padding.PaddingLayout | None) -> Iterator[Feeds]:
        seen = batches = 0
        if padding is not None:
            self.positions = [0, 0]
        for index, raw in enumerate(self._batches()):
            where = f"{self.description} (batch {index})"
            feeds = _as_feeds(raw, where)
            size = _sample_count(feeds, where)
            if self._uniform and self._num_samples is None:  # one raw batch holds every sample
                self._num_samples = size if self._cap is None else min(size, self._cap)
            if not size:
                self._validate(feeds, where)  # names and types are wrong before being empty
            order = self._by_length(feeds, size, seen, padding) if size > self.batch_size else None
            for start in range(0, size, self.batch_size):
                take = min(self.batch_size, size - start, size if self._cap is None else self._cap - seen)
                rows = slice(start, start + take) if order is None else order[start:start + take]
                chunk = {k: np.ascontiguousarray(v[rows]) if v.ndim else v for k, v in feeds.items()}
                self._validate(chunk, where)
                seen += take
                batches += 1
                if padding is not None:  # validated: the mask input is in every chunk
                    trimmed = calib_padding.trim(chunk, padding)
                    self.positions[0] += trimmed[padding.mask].size
                    self.positions[1] += chunk[padding.mask].size
                    chunk = trimmed
                yield chunk
                if self._cap is not None and seen >= self._cap:
                    break
            if self._cap is not None and seen >= self._cap:
                break
        if seen == 0:
            raise OnnxoptError(f"calibration data {self.description} holds no samples", SOURCES_HINT)
        self._num_samples, self._num_batches = seen, batches

    def _by_length(self, feeds: Feeds, size: int, seen: int, padding) -> np.ndarray | None:
        """The samples to use from this raw batch, shortest real sequence first (stable)."""
        if padding is None or padding.mask not in feeds:
            return None
        usable = size if self._cap is None else max(0, min(size, self._cap - seen))
        lengths = calib_padding.real_lengths({padding.mask: feeds[padding.mask][:usable]}, padding)
        return None if lengths is None else np.argsort(lengths, kind="stable")

    def fingerprint(self) -> str:
        """sha256 of the data content (streamed, batch by batch), memoized."""
        if self._fingerprint is None:
            if not self.reiterable:
                raise OnnxoptError(f"calibration data {self.description} can be read only once",
                                   "pass a callable or a list instead of an iterator")
            digest = hashlib.sha256()
            for feeds in self:
                for name in sorted(feeds):
                    array = feeds[name]
                    digest.update(f"{name}|{array.dtype.str}|{array.shape}\n".encode())
                    digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def check_first_batch(self) -> None:
        """Validates the first batch now (opening a one-shot iterator cannot: that would consume it)."""
        if self.reiterable:
            batches = iter(self)
            try:
                next(batches)
            finally:
                batches.close()

    def _validate(self, feeds: Feeds, where: str) -> None:
        expected = ", ".join(self._inputs)
        unknown = sorted(set(feeds) - set(self._inputs))
        if unknown:
            raise OnnxoptError(f"{where} has data for unknown input(s) {', '.join(unknown)}",
                               f"the model's inputs are {expected}")
        missing = [name for name in self._inputs if name not in feeds]
        if missing:
            raise OnnxoptError(f"{where} has no data for input(s) {', '.join(missing)}",
                               f"the model's inputs are {expected}")
        for name, vi in self._inputs.items():
            tensor_type, array = vi.type.tensor_type, feeds[name]
            want = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
            if array.dtype != want:
                raise OnnxoptError(f"{where}: input '{name}' is {array.dtype}, the model wants {want}",
                                   f"convert it with .astype(np.{want}); onnxopt does not cast calibration data")
            if not tensor_type.HasField("shape"):
                continue
            dims = tensor_type.shape.dim
            if array.ndim != len(dims):
                raise OnnxoptError(f"{where}: input '{name}' has rank {array.ndim} {list(array.shape)}, "
                                   f"the model wants rank {len(dims)} {_model_shape(vi)}")
            for axis, (dim, got) in enumerate(zip(dims, array.shape)):
                if dim.HasField("dim_value") and dim.dim_value > 0 and dim.dim_value != got:
                    raise OnnxoptError(f"{where}: input '{name}' has shape {list(array.shape)}, the model wants "
                                       f"{_model_shape(vi)} (dimension {axis} is {got}, not {dim.dim_value})")


def open_calibration(source, model: onnx.ModelProto, batch_size: int = 8, samples: int | None = None, *,
                     shapes: dict[str, tuple[int, ...]] | None = None, trim_padding: bool = False) -> CalibrationData:
    """Opens calibration data from any supported source (see the module docstring) and checks its
    first batch. `shapes` gives the dynamic dimensions of random data (like `--shape`)."""
    if isinstance(source, CalibrationData):
        return source
    if batch_size < 1 or (samples is not None and samples < 1):
        raise OnnxoptError(f"calibration batch size {batch_size} and samples {samples} must be positive")
    for vi in real_inputs(model):
        if not vi.type.HasField("tensor_type"):
            raise OnnxoptError(f"input '{vi.name}' is not a tensor", "calibration supports tensor inputs only")
    options = {"batch_size": _batch_limit(model, batch_size), "samples": samples,
               "padding": calib_padding.padding_layout(model) if trim_padding else None}
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if text == "random":
            data = _random_data(model, shapes or {}, **options)
        elif Path(text).exists():
            data = _from_path(Path(text), model, options)
        elif _CALLABLE_SPEC.fullmatch(text):
            data = _from_object(import_object(text, "calibration data", "name the function that yields feed dicts"),
                                model, text, options)
        else:
            raise OnnxoptError(f"calibration data not found: {text}", SOURCES_HINT)
    else:
        data = _from_object(source, model, getattr(source, "__name__", type(source).__name__), options)
    data.check_first_batch()
    return data


def is_stored(source) -> bool:
    """Whether `source` is data held in a dict or at a path (a missing path too: opening it says it
    is missing), as opposed to "random" or a `module:function` whose function runs on each open."""
    if isinstance(source, dict):
        return True
    if not isinstance(source, (str, os.PathLike)) or os.fspath(source) == "random":
        return False
    return Path(source).exists() or not _CALLABLE_SPEC.fullmatch(os.fspath(source))


def _batch_limit(model: onnx.ModelProto, batch_size: int) -> int:
    """The model's fixed first dimension if it has one (batches must match it), else `batch_size`."""
    for vi in real_inputs(model):
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return dims[0].dim_value
    return batch_size


def _from_path(path: Path, model: onnx.ModelProto, options: dict) -> CalibrationData:
    if path.is_file():
        if path.suffix != ".npz":
            raise OnnxoptError(f"calibration file {path} is not an .npz", SOURCES_HINT)
        return _arrays(model, lambda: _read_npz(path), str(path), options)
    sets = sorted((p for p in path.glob("test_data_set_*") if p.is_dir()), key=_numeric_suffix)
    if sets:
        return CalibrationData(model, lambda: (_read_test_set(s, model) for s in sets), description=str(path),
                               **options)
    npy, pb = sorted(path.glob("*.npy")), sorted(path.glob("*.pb"))
    names = {vi.name for vi in real_inputs(model)}
    if npy:
        return _arrays(model, lambda: {f.stem: _read_npy(f) for f in npy}, str(path), options)
    if pb and not {f.stem for f in pb} <= names and all(re.fullmatch(r"input_\d+", f.stem) for f in pb):
        return CalibrationData(model, lambda: iter([_read_test_set(path, model)]), description=str(path),
                               **options)
    if pb:
        return _arrays(model, lambda: {f.stem: _read_pb(f) for f in pb}, str(path), options)
    raise OnnxoptError(f"calibration directory {path} holds no .npy, .pb or test_data_set_* folders", SOURCES_HINT)


def _arrays(model: onnx.ModelProto, load: Callable[[], Feeds], description: str, options: dict) -> CalibrationData:
    """Named arrays with a sample axis, re-read from the source on each pass."""
    return CalibrationData(model, lambda: iter([load()]), description=description, uniform=True, **options)


def _read_npz(path: Path) -> Feeds:
    with _readable(path, ".npz", "write it with numpy.savez(path, input_name=array, ...)"), np.load(path) as archive:
        return {name: archive[name] for name in archive.files}


def _read_npy(path: Path) -> np.ndarray:
    with _readable(path, ".npy", "write it with numpy.save"):
        return np.load(path, mmap_mode="r")  # memory-mapped: only the sliced batches are read


def _read_pb(path: Path) -> np.ndarray:
    with _readable(path, "TensorProto", "write it with onnx.numpy_helper.from_array"):
        tensor = onnx.TensorProto()
        tensor.ParseFromString(path.read_bytes())
        return numpy_helper.to_array(tensor)


@contextlib.contextmanager
def _readable(path: Path, kind: str, hint: str):
    """Turns a reader's failure on a corrupt file into one OnnxoptError line."""
    try:
        yield
    except (OSError, ValueError, TypeError, EOFError, zipfile.BadZipFile, DecodeError) as exc:
        raise OnnxoptError(f"cannot read calibration data {path} as {kind} ({exc})", hint) from exc


def _read_test_set(folder: Path, model: onnx.ModelProto) -> Feeds:
    files = sorted(folder.glob("input_*.pb"), key=_numeric_suffix)
    names = [vi.name for vi in real_inputs(model)]
    if len(files) > len(names):
        raise OnnxoptError(f"{folder} has {len(files)} input_*.pb tensors, the model takes {len(names)}",
                           f"the model's inputs are {', '.join(names)}")
    return {name: _read_pb(file) for name, file in zip(names, files)}


def _numeric_suffix(path: Path) -> int:
    digits = re.search(r"(\d+)$", path.stem)
    return int(digits.group(1)) if digits else -1


def _from_object(source, model: onnx.ModelProto, description: str, options: dict) -> CalibrationData:
    if isinstance(source, np.ndarray):
        raise OnnxoptError("calibration data is a bare array", "pass a dict {input_name: array}")
    if isinstance(source, dict):
        return _arrays(model, lambda: source, description, options)
    if callable(source):
        def batches():
            produced = source()
            return iter([produced]) if isinstance(produced, dict) else iter(produced)
        return CalibrationData(model, batches, description=description, **options)
    if isinstance(source, Iterable):
        if iter(source) is not source:
            return CalibrationData(model, lambda: iter(source), description=description, **options)
        used = []

        def once():
            if used:
                raise OnnxoptError(f"calibration data {description} is an iterator that was already consumed",
                                   "pass a callable that returns a fresh iterable, or a list")
            used.append(True)
            return source
        return CalibrationData(model, once, description=description, reiterable=False, **options)
    raise OnnxoptError(f"cannot use a {type(source).__name__} as calibration data", SOURCES_HINT)


def _read_ahead(batches: Callable[[], Iterable[Feeds]]) -> Callable[[], Iterable[Feeds]]:
    """A one-shot source that can be started twice: first it yields its first raw batch alone, then
    that batch again followed by the rest; a third start reaches the original (which refuses)."""
    source = iter(batches())
    head = list(itertools.islice(source, 1))
    starts = []

    def replay() -> Iterable[Feeds]:
        starts.append(1)
        if len(starts) == 1:
            return iter(head)
        return itertools.chain(head, source) if len(starts) == 2 else batches()
    return replay


def _random_data(model: onnx.ModelProto, shapes: dict, *, batch_size: int, samples: int | None,
                 padding: calib_padding.PaddingLayout | None) -> CalibrationData:
    for line in ("=" * 78,
                 "calibrating on RANDOM data: the ranges it gives, and any accuracy measured or",
                 "obtained with them, are MEANINGLESS. Pass real samples with --calib for real use.",
                 "=" * 78):
        print(f"onnxopt: WARNING: {line}", file=sys.stderr)
    total = samples or RANDOM_SAMPLES

    def batches():
        for index, start in enumerate(range(0, total, batch_size)):
            count = min(batch_size, total - start)
            yield generate_inputs(model, _batch_shapes(model, shapes, count), seed=index)
    return CalibrationData(model, batches, description="random", batch_size=batch_size, samples=samples,
                           num_samples=total, uniform=True, padding=padding)


def _batch_shapes(model: onnx.ModelProto, shapes: dict, count: int) -> dict[str, tuple[int, ...]]:
    """Shapes for one random batch: the dynamic first dimension becomes `count`; other dynamic
    dimensions come from `shapes` (a missing one makes generate_inputs ask for --shape)."""
    result = {}
    for vi in real_inputs(model):
        dims = vi.type.tensor_type.shape.dim
        if not dims or (dims[0].HasField("dim_value") and dims[0].dim_value > 0):
            if vi.name in shapes:
                result[vi.name] = tuple(shapes[vi.name])
            continue
        rest = (shapes[vi.name][1:] if vi.name in shapes
                else [d.dim_value if d.dim_value > 0 else None for d in dims[1:]])
        if None not in rest:
            result[vi.name] = (count, *rest)
    return result


def _as_feeds(batch, where: str) -> Feeds:
    if not isinstance(batch, dict):
        raise OnnxoptError(f"{where} is a {type(batch).__name__}, not a dict of input name -> array",
                           "yield {input_name: numpy array, ...} per batch")
    return {str(name): value if isinstance(value, np.ndarray) else np.asarray(value) for name, value in batch.items()}


def _sample_count(feeds: Feeds, where: str) -> int:
    """The length of the first axis, which must agree across inputs (rank-0 inputs have none)."""
    counts = {name: array.shape[0] for name, array in feeds.items() if array.ndim}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name}: {count}" for name, count in counts.items())
        raise OnnxoptError(f"{where}: inputs have different numbers of samples ({listed})",
                           "the first axis of every array counts samples")
    return next(iter(counts.values()), 1 if feeds else 0)


def _model_shape(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]

