"""Shared helpers for the model builders: the build directory, freshness checks and atomic writes.

Builders are idempotent: an output is reused when it exists and is newer than every source file it
depends on, and every output is written to a temporary file in the same directory and then moved
into place with os.replace, so a crashed or concurrent build never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

MODELS_DIR = Path(__file__).resolve().parent
BUILD_DIR = MODELS_DIR / "build"


def is_fresh(outputs: Iterable[Path], sources: Iterable[str | Path]) -> bool:
    """True when every output exists and is at least as new as every source file."""
    outputs = [Path(p) for p in outputs]
    if not all(p.exists() for p in outputs):
        return False
    newest_source = max(Path(s).stat().st_mtime for s in sources)
    return min(p.stat().st_mtime for p in outputs) >= newest_source


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path next to `dest`; on success move it onto `dest`, else delete it."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)
    try:
        yield Path(tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_npz(dest: Path, **arrays: np.ndarray) -> Path:
    """Atomically write a compressed .npz archive."""
    with atomic_path(dest) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    return Path(dest)


def save_json(dest: Path, obj: object) -> Path:
    """Atomically write `obj` as indented JSON."""
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
    return Path(dest)


def save_onnx(dest: Path, model) -> Path:
    """Atomically write an ONNX ModelProto as a single file (no external data)."""
    import onnx

    with atomic_path(dest) as tmp:
        onnx.save_model(model, str(tmp), save_as_external_data=False)
    return Path(dest)
