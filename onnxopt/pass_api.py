"""The pass contract: a small class with a `name`, an `Options` dataclass and one `run` method.

A pass rewrites the model it is given (the manager hands it a copy it may mutate) and returns a
`PassResult` saying whether anything changed, what it did (counts per rewrite) and what it skipped
and why. Ordering, verification, timing and reporting belong to the manager, not to passes.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import numpy as np
import onnx

from .options import NoOptions


@dataclasses.dataclass
class PassResult:
    model: onnx.ModelProto
    changed: bool
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PassContext:
    """What a pass may need beyond the model: sample/calibration data, the target EP, a logger."""

    ep: str = "cpu"
    sample_inputs: list[dict[str, np.ndarray]] | None = None
    calibration: Any = None
    cache_dir: str | None = None
    progress: bool = True
    logger: logging.Logger = dataclasses.field(default_factory=lambda: logging.getLogger("onnxopt"))


class Pass:
    """Base class of every pass, built-in or third-party. Subclasses set `name`, `Options`, and `run`."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    # Cleanup passes are rerun with their neighbours until nothing changes.
    fixed_point: ClassVar[bool] = False
    # Lossy passes change numerics on purpose: numeric verification reports their error, not fails.
    lossy: ClassVar[bool] = False

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"
