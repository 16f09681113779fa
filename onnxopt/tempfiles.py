"""Temporary files beside an output, removed however the block ends (error, Ctrl-C, SIGTERM).

Outputs are written to a temporary name in the target folder and renamed over the target. A signal
can arrive between the moment the file exists and the moment the code that would remove it holds
its name (inside `mkstemp`, or between it and the `try`). So the name is taken with SIGINT and
SIGTERM held back: the signal is acted on after the name is known to the cleanup, never before.
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_HELD = {signal.SIGINT, signal.SIGTERM}


@contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside the block are acted on when it ends.

    Python runs signal handlers in the main thread whichever thread the kernel delivered the signal
    to (ONNX Runtime's and torch's pools leave it unblocked in theirs), so blocking it with
    pthread_sigmask in this thread is not enough: the handlers themselves are swapped for one that
    notes the signal, and the original handler runs once the block is left."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread runs handlers, and only it may change them
        return
    noted: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: noted.append(signum)) for signum in _HELD}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(noted):
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)  # the default action, now


@contextmanager
def temporary(parent: str | os.PathLike, prefix: str, directory: bool = False) -> Iterator[Path]:
    """A new empty file (or folder) `<prefix>XXXX.tmp` in `parent`, gone when the block is left
    unless the block renamed it away. OSError from creating it propagates."""
    path = None
    try:
        with signals_held():
            if directory:
                path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=".tmp"))
            else:
                fd, name = tempfile.mkstemp(dir=parent, prefix=prefix, suffix=".tmp")
                os.close(fd)
                path = Path(name)
        yield path
    finally:
        if path is not None:
            if directory:
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
