"""Progress bars for long work (calibration, sensitivity sweeps, teacher caching, training).

Passes get a `Progress` on their context and wrap their loops in it; none imports tqdm. Bars go to
stderr, only when it is a terminal (a log file or a pipe gets no carriage-return noise), and
vanish when done.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Progress:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def __call__(self, items: Iterable[T], desc: str, unit: str = "it", total: int | None = None,
                 status: Callable[[], str] | None = None) -> Iterator[T]:
        """`items`, with a bar while they are consumed; `status()` (a running loss, say) is shown beside it."""
        if not self.enabled or not sys.stderr.isatty():
            return iter(items)
        from tqdm import tqdm

        bar = tqdm(items, desc=desc, unit=unit, total=total, leave=False)
        return iter(bar) if status is None else _with_status(bar, status)

    def __bool__(self) -> bool:
        return self.enabled


def _with_status(bar, status: Callable[[], str]) -> Iterator:
    for item in bar:
        yield item
        bar.set_postfix_str(status(), refresh=False)


def as_progress(value: Progress | bool) -> Progress:
    return value if isinstance(value, Progress) else Progress(bool(value))
