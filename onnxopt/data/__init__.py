"""Representative data: samples of a model's inputs, streamed batch by batch to every lossy pass.

One `RepresentativeData` is opened per run from the `calib` setting (`--calib` on the command
line) and handed to the comparison and to every pass that asks (quantization calibrates on it;
pruning, low-rank and distillation measure on it). It accepts
  - an `.npz` of arrays named by input, first axis = samples (read once per run);
  - a directory of `.npy` files (memory-mapped) or `.pb` TensorProtos named by input (`input_ids.npy`),
    first axis = samples;
  - a directory of ONNX `test_data_set_*` folders, or one such folder: `input_0.pb`, `input_1.pb`, ...
    map to the model's real inputs in order, each folder is one batch;
  - `"module:function"` or `"file.py:function"`: the function returns an iterable of feed dicts (batches);
  - from the API, a callable (as above), a dict of arrays (like an .npz), or an iterable of feed dicts;
  - `"random"`: generated from the input signature, for smoke tests only (a loud warning says so).

Arrays either stack samples on their first axis (an array with the input's rank: a batch of 100
images as [100, 3, 224, 224]) or hold one whole feed per entry (an array of the input's rank + 1:
for an input [seq, features], or a state [layers, batch, hidden] whose batch is not axis 0, or a
scalar, entry i of every array is the i-th feed). One source uses one layout for all its inputs;
feeds held per entry are run one at a time.

A pass asks for `Batches` (`data.batches(model, batch_size=8, samples=128, trim_padding=True)`):
a re-iterable stream in which every batch is validated against the model before it is yielded
(so before any inference on it): names, element type (never cast silently), rank, and every fixed
dimension; dynamic dimensions may change from batch to batch (sequence lengths). Batches larger
than `batch_size` are split along the first axis; a model whose first dimension is fixed to d gets
batches of exactly d. `samples` caps the samples used. The first batch is checked when the stream
is made.

With `trim_padding`, sequence models with a 0/1 attention-mask input get their batches cut after
the longest real sequence (see `padding`), and samples held in arrays are batched in order of
length so each batch is cut as short as it can be; `untrimmed()` yields the batches as given.

`Batches.fingerprint()` = sha256 over the yielded batches in order, per input sorted by name:
name, dtype, shape, then the bytes; it keys on-disk caches of what was computed from the data.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx

from ..errors import OnnxoptError
from ..imports import import_object
from ..inputs import generate_inputs, real_inputs
from . import padding as padding_
from .readers import Feeds, load_feeds, numeric_suffix, read_npy, read_npz, read_pb, read_test_set, validate_feeds

__all__ = ["Batches", "Feeds", "RepresentativeData", "load_feeds", "open_batches", "validate_feeds"]

RANDOM_SAMPLES = 32
SOURCES_HINT = ("give an .npz, a directory of .npy/.pb files or test_data_set_* folders, "
                "MODULE:FUNCTION, or 'random'")
_CALLABLE_SPEC = re.compile(r"[\w./\\-]+:[A-Za-z_]\w*")
_CAST_HINT = "; onnxopt does not cast representative data"


@dataclasses.dataclass
class _Source:
    """Where raw batches come from: `read(model, batch_size, samples)` returns an iterable of feed
    dicts (only generated data needs the batch size and sample count)."""

    read: Callable[[onnx.ModelProto, int, int | None], Iterable[Feeds]]  # (model, batch_size, samples)
    description: str
    uniform: bool = False  # named arrays with a sample axis: every sample comes in the first raw batch
    reiterable: bool = True
    random: bool = False


class RepresentativeData:
    """The user's samples of the model's inputs, opened once per run (see the module docstring)."""

    def __init__(self, source, shapes: dict[str, tuple[int, ...]] | None = None):
        self._source = _open(source, shapes or {})
        self.description = self._source.description
        # Stored data (a file, folder or dict) is real input of the right shapes: the comparison can
        # run on its first batch. "random" and a module:function (run again on each read) are not.
        self.stored = source.stored if isinstance(source, RepresentativeData) else (
            isinstance(source, dict) or (isinstance(source, (str, os.PathLike)) and not self._source.random
                                         and Path(source).exists()))

    def batches(self, model: onnx.ModelProto, batch_size: int = 8, samples: int | None = None, *,
                trim_padding: bool = False, check: bool = True) -> Batches:
        """A validated stream of batches for `model`; with `check`, its first batch is checked now."""
        if batch_size < 1 or (samples is not None and samples < 1):
            raise OnnxoptError(f"batch size {batch_size} and samples {samples} must be positive")
        for vi in real_inputs(model):
            if not vi.type.HasField("tensor_type"):
                raise OnnxoptError(f"input '{vi.name}' is not a tensor", "representative data supports tensor inputs only")
        source = self._source
        batch_size = _batch_limit(model, batch_size)
        batches = Batches(model, lambda: source.read(model, batch_size, samples), description=source.description,
                          batch_size=batch_size, samples=samples, uniform=source.uniform or source.random,
                          num_samples=(samples or RANDOM_SAMPLES) if source.random else None,
                          reiterable=source.reiterable,
                          padding=padding_.padding_layout(model) if trim_padding else None)
        if check:
            batches.check_first_batch()
        return batches

    def held_out(self, model: onnx.ModelProto, after: int, count: int = 8) -> tuple[Feeds, int | None] | None:
        """(feeds, samples): up to `count` samples following the first `after` in the order given
        (untrimmed; for data of one feed per entry, the one feed after them and None), or None when
        the data holds no more than `after`: inputs a pass that read `after` samples at most has not fit.
        A model with a fixed first dimension d gets exactly d samples, or None when fewer are left."""
        fixed = fixed_batch(model)
        count = fixed or count
        # a fixed batch takes whole batches (a cap would cut the last one short) and stops once it has enough
        batches = self.batches(model, count, None if fixed else after + count, check=False)
        seen, parts = 0, []
        for chunk in batches.untrimmed():
            size = 1 if batches.per_entry else _sample_count(chunk, self.description)
            if seen + size > after:
                if batches.per_entry:
                    return chunk, None
                start = max(0, after - seen)
                parts.append({k: v[start:] if v.ndim else v for k, v in chunk.items()})
            seen += size
            if seen >= after + count:
                break
        taken = min(seen, after + count) - after
        if not parts or (fixed and taken != fixed):
            return None
        feeds = {k: np.concatenate([part[k] for part in parts])[:taken] if parts[0][k].ndim else parts[0][k]
                 for k in parts[0]}
        return feeds, taken


def open_batches(source, model: onnx.ModelProto, batch_size: int = 8, samples: int | None = None, *,
                 shapes: dict[str, tuple[int, ...]] | None = None, trim_padding: bool = False) -> Batches:
    """`RepresentativeData(source, shapes).batches(model, ...)`; a `Batches` is returned as it is."""
    if isinstance(source, Batches):
        return source
    data = source if isinstance(source, RepresentativeData) else RepresentativeData(source, shapes)
    return data.batches(model, batch_size, samples, trim_padding=trim_padding)


class Batches:
    """A re-iterable, validated stream of feed dicts of at most `batch_size` samples each."""

    def __init__(self, model: onnx.ModelProto, batches: Callable[[], Iterable[Feeds]], *, description: str,
                 batch_size: int, samples: int | None = None, num_samples: int | None = None,
                 uniform: bool = False, reiterable: bool = True, padding: padding_.PaddingLayout | None = None):
        self.description = description
        self.batch_size = batch_size
        self.reiterable = reiterable
        self._model = model
        self._batches = batches
        self._cap = samples
        self._num_samples = num_samples if samples is None or num_samples is None else min(num_samples, samples)
        self._uniform = uniform  # every raw batch splits predictably: num_batches is known up front
        self._num_batches: int | None = None
        self._fingerprint: str | None = None
        self.padding = padding
        self.positions = [0, 0]  # sequence positions used, and given, over the last trimmed pass
        self._first: Feeds | None = None
        self._ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in real_inputs(model)
                       if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}
        self.per_entry: bool | None = None  # the layout of the data, once its first batch was read

    @property
    def num_samples(self) -> int | None:
        """Samples this stream yields: known once the first batch was read for arrays, else after one full pass."""
        return self._num_samples

    @property
    def num_batches(self) -> int | None:
        if self._uniform and self._num_samples is not None:
            return self._num_samples if self.per_entry else -(-self._num_samples // self.batch_size)
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
                raise OnnxoptError(f"representative data {self.description} holds no samples", SOURCES_HINT) from None
            finally:
                batches.close()
        return self._first

    def _iterate(self, padding: padding_.PaddingLayout | None) -> Iterator[Feeds]:
        seen = batches = 0
        if padding is not None:
            self.positions = [0, 0]
        for index, raw in enumerate(self._batches()):
            where = f"{self.description} (batch {index})"
            feeds = _as_feeds(raw, where)
            size = _sample_count(feeds, where)
            per_entry = self._layout(feeds, where)
            if self._uniform and self._num_samples is None:  # one raw batch holds every sample
                self._num_samples = size if self._cap is None else min(size, self._cap)
            if not size:
                self._validate(feeds, where)  # names and types are wrong before being empty
            step = 1 if per_entry else self.batch_size
            order = self._by_length(feeds, size, seen, padding) if size > step and not per_entry else None
            for start in range(0, size, step):
                take = min(step, size - start, size if self._cap is None else self._cap - seen)
                rows = slice(start, start + take) if order is None else order[start:start + take]
                if per_entry:
                    chunk = {k: np.array(v[start]) for k, v in feeds.items()}  # a copy; 0-d stays 0-d
                else:
                    chunk = {k: np.ascontiguousarray(v[rows]) if v.ndim else v for k, v in feeds.items()}
                self._validate(chunk, where)
                seen += take
                batches += 1
                if padding is not None:  # validated: the mask input is in every chunk
                    trimmed = padding_.trim(chunk, padding)
                    self.positions[0] += trimmed[padding.mask].size
                    self.positions[1] += chunk[padding.mask].size
                    chunk = trimmed
                yield chunk
                if self._cap is not None and seen >= self._cap:
                    break
            if self._cap is not None and seen >= self._cap:
                break
        if seen == 0:
            raise OnnxoptError(f"representative data {self.description} holds no samples", SOURCES_HINT)
        self._num_samples, self._num_batches = seen, batches

    def _layout(self, feeds: Feeds, where: str) -> bool:
        """Whether this raw batch holds one feed per entry (every array of its input's rank + 1), or
        stacks samples (every array of its input's rank); a mix is refused."""
        extra = {name: feeds[name].ndim - rank for name, rank in self._ranks.items() if name in feeds}
        per_entry = sorted(name for name, d in extra.items() if d == 1)
        stacked = sorted(name for name, d in extra.items() if d == 0)
        if per_entry and stacked:
            raise OnnxoptError(f"{where} mixes layouts: {', '.join(per_entry)} hold one feed per entry (rank + 1), "
                               f"{', '.join(stacked)} stack samples on axis 0 (the input's own rank)",
                               "give every input the same layout")
        layout = bool(per_entry)
        if self.per_entry is not None and layout != self.per_entry:
            raise OnnxoptError(f"{where} changes layout from the batches before it", "give every batch the same layout")
        self.per_entry = layout
        return layout

    def _by_length(self, feeds: Feeds, size: int, seen: int, padding) -> np.ndarray | None:
        """The samples to use from this raw batch, shortest real sequence first (stable)."""
        if padding is None or padding.mask not in feeds:
            return None
        usable = size if self._cap is None else max(0, min(size, self._cap - seen))
        lengths = padding_.real_lengths({padding.mask: feeds[padding.mask][:usable]}, padding)
        return None if lengths is None else np.argsort(lengths, kind="stable")

    def fingerprint(self) -> str:
        """sha256 of the data content (streamed, batch by batch), memoized."""
        if self._fingerprint is None:
            if not self.reiterable:
                raise OnnxoptError(f"representative data {self.description} can be read only once",
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
        """Validates the first batch now (a one-shot iterator cannot be: that would consume it)."""
        if self.reiterable:
            batches = iter(self)
            try:
                next(batches)
            finally:
                batches.close()

    def _validate(self, feeds: Feeds, where: str) -> None:
        validate_feeds(feeds, self._model, where, cast_hint=_CAST_HINT)


def _open(source, shapes: dict) -> _Source:
    if isinstance(source, RepresentativeData):
        return source._source
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if text == "random":
            return _random_source(shapes)
        if Path(text).exists():
            return _from_path(Path(text))
        if _CALLABLE_SPEC.fullmatch(text):
            function = import_object(text, "representative data", "name the function that yields feed dicts")
            return _from_object(function, text)
        raise OnnxoptError(f"calibration data not found: {text}", SOURCES_HINT)
    return _from_object(source, getattr(source, "__name__", type(source).__name__))


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The model's fixed first dimension, if it has one: every batch fed to it must hold that many."""
    for vi in real_inputs(model):
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return dims[0].dim_value
    return None


def _batch_limit(model: onnx.ModelProto, batch_size: int) -> int:
    """The model's fixed first dimension if it has one (batches must match it), else `batch_size`."""
    return fixed_batch(model) or batch_size


def _from_path(path: Path) -> _Source:
    if path.is_file():
        if path.suffix != ".npz":
            raise OnnxoptError(f"calibration file {path} is not an .npz", SOURCES_HINT)
        arrays = read_npz(path)  # once per run; its errors come before any work
        return _Source(lambda *_: iter([arrays]), str(path), uniform=True)
    sets = sorted((p for p in path.glob("test_data_set_*") if p.is_dir()), key=numeric_suffix)
    if sets:
        return _Source(lambda model, *_: (read_test_set(s, model) for s in sets), str(path))
    npy, pb = sorted(path.glob("*.npy")), sorted(path.glob("*.pb"))
    if npy:
        return _Source(lambda *_: iter([{f.stem: read_npy(f) for f in npy}]), str(path), uniform=True)
    if pb and all(re.fullmatch(r"input_\d+", f.stem) for f in pb):
        def one_test_set(model, *_):
            names = {vi.name for vi in real_inputs(model)}
            if {f.stem for f in pb} <= names:  # inputs that happen to be named input_0, input_1...
                return iter([{f.stem: read_pb(f) for f in pb}])
            return iter([read_test_set(path, model)])
        return _Source(one_test_set, str(path))
    if pb:
        return _Source(lambda *_: iter([{f.stem: read_pb(f) for f in pb}]), str(path), uniform=True)
    raise OnnxoptError(f"calibration directory {path} holds no .npy, .pb or test_data_set_* folders", SOURCES_HINT)


def _from_object(source, description: str) -> _Source:
    if isinstance(source, np.ndarray):
        raise OnnxoptError("calibration data is a bare array", "pass a dict {input_name: array}")
    if isinstance(source, dict):
        return _Source(lambda *_: iter([source]), description, uniform=True)
    if callable(source):
        def batches(*_):
            produced = source()
            return iter([produced]) if isinstance(produced, dict) else iter(produced)
        return _Source(batches, description)
    if isinstance(source, Iterable):
        if iter(source) is not source:
            return _Source(lambda *_: iter(source), description)
        used = []

        def once(*_):
            if used:
                raise OnnxoptError(f"calibration data {description} is an iterator that was already consumed",
                                   "pass a callable that returns a fresh iterable, or a list")
            used.append(True)
            return source
        return _Source(once, description, reiterable=False)
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


def _random_source(shapes: dict) -> _Source:
    for line in ("=" * 78,
                 "calibrating on RANDOM data: the ranges it gives, and any accuracy measured or",
                 "obtained with them, are MEANINGLESS. Pass real samples with --calib for real use.",
                 "=" * 78):
        print(f"onnxopt: WARNING: {line}", file=sys.stderr)

    def batches(model, batch_size, samples):
        total = samples or RANDOM_SAMPLES
        for index, start in enumerate(range(0, total, batch_size)):
            count = min(batch_size, total - start)
            yield generate_inputs(model, _batch_shapes(model, shapes, count), seed=index)
    return _Source(batches, "random", random=True)


def _batch_shapes(model: onnx.ModelProto, shapes: dict, count: int) -> dict[str, tuple[int, ...]]:
    """Shapes for one random batch: the dynamic first dimension becomes `count`; other dynamic
    dimensions come from `shapes` (a missing one makes generate_inputs ask for a shape)."""
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
