"""The teacher-output cache for knowledge distillation: the teacher runs once over the data under
ONNX Runtime; later epochs and later runs read its outputs from disk, memory-mapped read-only, so the
outputs of a large data set never have to fit in RAM.

An entry `cache.root/teacher/<key>` is content-addressed (teacher, data, output names, format
version: a change is a miss, never a stale hit). It holds one raw file per output (`0.bin`, ... by
index: names can hold '/' or ':'), appended batch by batch, and `index.json` with each batch's
shapes, dtypes, offsets and crc32s. After each batch the data is fsynced and the index replaced
atomically, so an interrupted fill resumes where the index ends (later bytes are cut off, recorded
batches are read from the stream but not run) and equals an uninterrupted fill bit for bit. Opening
checks every length and checksum: a damaged entry is deleted and filled again. An unwritable cache
costs time, never correctness: the entry goes to a temporary folder.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import weakref
import zlib
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import onnx

from .cache import Cache, key, model_fingerprint
from .errors import OnnxoptError
from .fetch import defined_values, fetching_session
from .progress import Progress
from .runtime import describe_ort_error
from .tempfiles import temporary

try:
    import fcntl
except ImportError:  # no advisory locks (Windows): concurrent fills of one entry are not excluded there
    fcntl = None

FORMAT_VERSION = 1
KIND = "teacher"
_DAMAGED = (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError)
_warned_roots: set[str] = set()


class TeacherOutputs:
    """Read side of a complete entry: memory-mapped, read-only."""

    def __init__(self, directory: Path, names: list[str], records: list[dict]):
        self.directory = directory
        self.names = names
        self._records = records
        ends = _ends(records, len(names))
        self.nbytes = sum(ends)
        # One map per file, sliced per batch: each map holds a file descriptor, so a map per batch
        # could exhaust them when a caller keeps many batches.
        self._maps = [np.memmap(directory / f"{i}.bin", np.uint8, mode="r") if end else None
                      for i, end in enumerate(ends)]

    def __len__(self) -> int:
        return len(self._records)

    def batch(self, index: int) -> dict[str, np.ndarray]:
        record = self._records[index]
        result = {}
        for i, name in enumerate(self.names):
            dtype, shape, start = np.dtype(record["dtypes"][i]), tuple(record["shapes"][i]), record["offsets"][i]
            size = _nbytes(shape, dtype)
            if size:
                result[name] = self._maps[i][start:start + size].view(dtype).reshape(shape)
            else:  # a memmap cannot be empty
                result[name] = np.empty(shape, dtype)
                result[name].flags.writeable = False
        return result


def teacher_outputs(teacher: onnx.ModelProto, batches, cache: Cache, *, outputs: Sequence[str] | None = None,
                    ep: str = "cpu", progress: Progress | None = None) -> tuple[TeacherOutputs, dict]:
    """Fill (or reuse, or resume) the cache entry of `teacher` on `batches`; returns the outputs and facts
    for the report: {"hit": bool, "resumed_from": int (batches already there), "batches": n, "seconds": float, "bytes": n}."""
    started = time.perf_counter()
    names = _output_names(teacher, outputs)
    entry_key = key(model_fingerprint(teacher), batches.fingerprint(), ",".join(names), f"v{FORMAT_VERSION}")
    directory = cache.root / KIND / entry_key
    fill = _Fill(teacher, batches, names, entry_key, ep, progress or Progress(enabled=False))
    unwritable = scratch = None
    with _entry_lock(directory):
        records, complete = _open_entry(directory, entry_key, names)
        resumed_from = len(records)
        if not complete:
            try:
                records = fill(directory, records)
            except _Unwritable as exc:
                unwritable = exc.__cause__
    if unwritable is not None:
        if str(cache.root) not in _warned_roots:
            _warned_roots.add(str(cache.root))
            print(f"onnxopt: warning: teacher outputs not cached in {directory.parent} ({unwritable}); "
                  "using a temporary folder", file=sys.stderr)
        scratch = directory = Path(tempfile.mkdtemp(prefix="onnxopt-teacher-"))
        try:
            records, resumed_from = fill(scratch, []), 0
        except BaseException as exc:
            shutil.rmtree(scratch, ignore_errors=True)
            if isinstance(exc, _Unwritable):
                raise OnnxoptError(f"teacher outputs cannot be written ({exc.__cause__})",
                                   "free disk space or set $ONNXOPT_CACHE to a writable folder") from exc
            raise
    result = TeacherOutputs(directory, names, records)
    if scratch is not None:
        weakref.finalize(result, shutil.rmtree, str(scratch), True)
    return result, {"hit": complete, "resumed_from": resumed_from, "batches": len(result),
                    "seconds": time.perf_counter() - started, "bytes": result.nbytes}


class _Unwritable(Exception):
    """Writing the entry failed (the OSError is its cause); distinct from an OSError of the data stream."""


@contextmanager
def _writing() -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise _Unwritable() from exc


class _Fill:
    """Runs the teacher on the batches an entry lacks and appends their outputs to it."""

    def __init__(self, teacher, batches, names, entry_key, ep, progress):
        self.teacher, self.batches, self.names, self.key, self.ep, self.progress = (
            teacher, batches, names, entry_key, ep, progress)
        self.session = None

    def __call__(self, directory: Path, records: list[dict]) -> list[dict]:
        records, ends = list(records), _ends(records, len(self.names))
        with ExitStack() as files:
            with _writing():
                directory.mkdir(parents=True, exist_ok=True)
                handles = [files.enter_context(open(directory / f"{i}.bin", "ab")) for i in range(len(self.names))]
                for handle, end in zip(handles, ends):
                    handle.truncate(end)  # bytes of a batch the index does not record; "ab" appends after them
                _write_index(directory, self.key, self.names, records, complete=False)
            stream = self.progress(self.batches, "caching teacher outputs", "batch", total=self.batches.num_batches)
            for index, feeds in enumerate(stream):
                if index < len(records):
                    continue  # recorded by an earlier fill: the stream is read, the teacher not run
                records.append(self._append(handles, ends, self._run(feeds, index)))
                with _writing():
                    for handle in handles:
                        handle.flush()
                        os.fsync(handle.fileno())
                    _write_index(directory, self.key, self.names, records, complete=False)
            with _writing():
                _write_index(directory, self.key, self.names, records, complete=True)
        return records

    @staticmethod
    def _append(handles, ends: list[int], values: list[np.ndarray]) -> dict:
        """Appends one batch's outputs to their files (advancing `ends`) and returns its record."""
        record = {"shapes": [], "dtypes": [], "offsets": [], "crc32": []}
        for i, (handle, value) in enumerate(zip(handles, values)):
            data = value.tobytes()
            record["shapes"].append(list(value.shape))
            record["dtypes"].append(value.dtype.str)
            record["offsets"].append(ends[i])
            record["crc32"].append(zlib.crc32(data))
            ends[i] += len(data)
            with _writing():
                handle.write(data)
        return record

    def _run(self, feeds: dict, index: int) -> list[np.ndarray]:
        if self.session is None:  # made only when a batch needs it: a hit or a finished resume runs nothing
            self.session, fetch = fetching_session(self.teacher, self.names, self.ep)
            self.fetched = [fetch[n] for n in self.names]
            self.wanted = {i.name for i in self.session.get_inputs()}
        try:
            values = self.session.run(self.fetched, {k: v for k, v in feeds.items() if k in self.wanted})
        except Exception as exc:
            raise OnnxoptError(describe_ort_error(exc),
                               f"the teacher failed on batch {index} of {self.batches.description}") from exc
        for name, value in zip(self.names, values):
            if not isinstance(value, np.ndarray) or value.dtype.hasobject:
                raise OnnxoptError(f"teacher output '{name}' is not a numeric tensor", "cache numeric tensors only")
        return values


def _output_names(teacher: onnx.ModelProto, outputs: Sequence[str] | None) -> list[str]:
    if outputs is None:
        names = [o.name for o in teacher.graph.output]
    else:
        names = list(dict.fromkeys([outputs] if isinstance(outputs, str) else outputs))
    if not names:
        raise OnnxoptError("no teacher outputs asked for", "name at least one, or pass outputs=None for the graph outputs")
    known = defined_values(teacher.graph) | {o.name for o in teacher.graph.output}
    for name in names:
        if name not in known:
            raise OnnxoptError(f"teacher has no tensor '{name}'",
                               "name a graph input, a weight, or the output of one of its nodes")
    return names


def _nbytes(shape, dtype: np.dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _ends(records: list[dict], count: int) -> list[int]:
    """Where each data file ends after the batches `records` describes."""
    if not records:
        return [0] * count
    last = records[-1]
    return [last["offsets"][i] + _nbytes(last["shapes"][i], np.dtype(last["dtypes"][i])) for i in range(count)]


def _open_entry(directory: Path, entry_key: str, names: list[str]) -> tuple[list[dict], bool]:
    """The entry's batch records and whether it is complete; ([], False) when it is absent or damaged
    (a damaged one is deleted)."""
    try:
        return _read_index(directory, entry_key, names)
    except _DAMAGED as exc:
        print(f"onnxopt: warning: damaged teacher-output cache entry {directory.name[:12]} removed ({exc})",
              file=sys.stderr)
        shutil.rmtree(directory, ignore_errors=True)
        return [], False


def _read_index(directory: Path, entry_key: str, names: list[str]) -> tuple[list[dict], bool]:
    """Raises one of `_DAMAGED` when the index, a file length or a checksum disagrees."""
    path = directory / "index.json"
    if not path.exists():
        return [], False
    index = json.loads(path.read_text())
    records, complete = index["batches"], index["complete"]
    if (index["version"], index["key"], index["names"]) != (FORMAT_VERSION, entry_key, names):
        raise ValueError("index.json is of another version, key or output list")
    if not isinstance(records, list) or not isinstance(complete, bool):
        raise ValueError("index.json is malformed")
    ends = [0] * len(names)
    for record in records:
        if any(len(record[field]) != len(names) for field in ("shapes", "dtypes", "offsets", "crc32")):
            raise ValueError("a batch record does not list every output")
        for i in range(len(names)):
            dtype, shape = np.dtype(record["dtypes"][i]), record["shapes"][i]
            if dtype.hasobject or record["offsets"][i] != ends[i] or not all(type(d) is int and d >= 0 for d in shape):
                raise ValueError(f"index.json describes {i}.bin inconsistently")
            ends[i] += _nbytes(shape, dtype)
    for i, end in enumerate(ends):
        file = directory / f"{i}.bin"
        size = file.stat().st_size if end or file.exists() else 0
        if size < end or (complete and size != end):
            raise ValueError(f"{file.name} holds {size} bytes, the index records {end}")
        if not end:
            continue
        with open(file, "rb") as handle:
            for number, record in enumerate(records):  # one batch in memory at a time
                handle.seek(record["offsets"][i])
                data = handle.read(_nbytes(record["shapes"][i], np.dtype(record["dtypes"][i])))
                if zlib.crc32(data) != record["crc32"][i]:
                    raise ValueError(f"batch {number} of {file.name} fails its checksum")
    return records, complete


def _write_index(directory: Path, entry_key: str, names: list[str], records: list[dict], complete: bool) -> None:
    text = json.dumps({"version": FORMAT_VERSION, "key": entry_key, "names": names, "batches": records,
                       "complete": complete}, separators=(",", ":"))
    with temporary(directory, ".index.") as tmp:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, directory / "index.json")


@contextmanager
def _entry_lock(directory: Path) -> Iterator[None]:
    """Excludes other runs filling the same entry (they would append to the same files). The lock
    file sits beside the entry folder, which removing a damaged entry takes away."""
    with ExitStack() as stack:
        try:
            directory.parent.mkdir(parents=True, exist_ok=True)
            handle = stack.enter_context(open(directory.parent / f"{directory.name}.lock", "a"))
        except OSError:
            handle = None  # an unwritable cache: this run writes nothing there to exclude others from
        if handle is not None and fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"onnxopt: waiting for another run filling teacher outputs in {directory}", file=sys.stderr)
                fcntl.flock(handle, fcntl.LOCK_EX)
        yield
