"""The disk cache every pass shares: content-addressed entries under `$ONNXOPT_CACHE` (default
`~/.cache/onnxopt`), one folder per kind of entry (`calib/` for calibration statistics; teacher
outputs and per-layer sensitivities next).

An entry's key is the sha256 of everything its content depends on (`key(...)`: model and data
fingerprints, options, a format version), so a changed input is a miss, never a stale hit. Writes
go to a temporary file in the same folder and are renamed into place: a reader never sees half an
entry, and concurrent runs writing the same key write the same bytes. A truncated, corrupted or
invalid entry (the pass's `validate` says so) is deleted and reported as a miss: the caller
computes it again. A cache that cannot be written costs time, never correctness: a warning, no error.
"""
from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx

from .tempfiles import temporary

T = TypeVar("T")
_UNREADABLE = (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile)


def default_root() -> Path:
    root = os.environ.get("ONNXOPT_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "onnxopt"


def key(*parts: str) -> str:
    """The sha256 of `parts` (joined by newlines): an entry's content address."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class Cache:
    """Arrays stored as `.npz` entries under `root/<kind>/<key>.npz`."""

    def __init__(self, root: str | Path | None = None):
        self._root = Path(root) if root is not None else None

    @property
    def root(self) -> Path:
        # read when used, not when made: tests and users set $ONNXOPT_CACHE after import
        return self._root if self._root is not None else default_root()

    def path(self, kind: str, entry_key: str, suffix: str = ".npz") -> Path:
        return self.root / kind / f"{entry_key}{suffix}"

    def load(self, kind: str, entry_key: str, decode: Callable[[dict[str, np.ndarray]], T | None]) -> T | None:
        """`decode(arrays)` of the entry, or None when it is absent, unreadable, or `decode` finds
        it invalid (returns None or raises): such an entry is removed, to be written again."""
        path = self.path(kind, entry_key)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as archive:
                value = decode({name: archive[name] for name in archive.files})
        except _UNREADABLE:
            value = None
        if value is None:
            path.unlink(missing_ok=True)
        return value

    def save(self, kind: str, entry_key: str, arrays: dict[str, np.ndarray]) -> None:
        """Writes the entry atomically; warns (and goes on) when the cache folder is not writable."""
        path = self.path(kind, entry_key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with temporary(path.parent, f".{path.stem}.") as tmp:
                with open(tmp, "wb") as handle:
                    np.savez(handle, **arrays)
                os.replace(tmp, path)
        except OSError as exc:
            print(f"onnxopt: warning: cache entry not written to {path.parent} ({exc})", file=sys.stderr)


def model_fingerprint(model: onnx.ModelProto) -> str:
    """sha256 of the graph and its weights, without serializing the whole (possibly > 2 GB) model."""
    digest = hashlib.sha256()
    for opset in model.opset_import:
        digest.update(opset.SerializeToString())
    graph = model.graph
    for part in (*graph.node, *graph.input, *graph.output, *graph.sparse_initializer):
        digest.update(part.SerializeToString())
    for tensor in graph.initializer:
        digest.update(f"{tensor.name}|{tensor.data_type}|{list(tensor.dims)}".encode())
        digest.update(tensor.raw_data if tensor.raw_data else tensor.SerializeToString())
    return digest.hexdigest()
