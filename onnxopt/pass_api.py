"""The pass contract: a small class with a `name`, an `Options` dataclass and one `run` method.

A pass rewrites the model it is given (the manager hands it a copy it may mutate) and returns a
`PassResult` saying whether anything changed, what it did (counts per rewrite), what it skipped and
why, and any tables and notes for the report. Ordering, verification, timing and reporting belong
to the manager, not to passes.

The `PassContext` lends every pass the services lossy techniques share: the representative data
(`data`) and the training data (`train`), the reference model (`reference`: the pipeline's input),
the speed guard (`guard`), the disk cache (`cache`) and progress bars (`progress`); the error budget
is `onnxopt.budget`, the teacher-output cache `onnxopt.teacher`.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import onnx

from .cache import Cache
from .errors import SettingError
from .options import NoOptions
from .progress import Progress, as_progress
from .table import Table

if TYPE_CHECKING:
    from .data import RepresentativeData
    from .guard import SpeedGuard
    from .tensor_compare import TensorView

Feeds = dict[str, np.ndarray]


@dataclasses.dataclass
class PassResult:
    model: onnx.ModelProto
    changed: bool
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    # free-form facts for the JSON report (timings, chosen settings); the text report shows `tables`
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    tables: list[Table] = dataclasses.field(default_factory=list)


class Reference:
    """The pipeline's input model, for error budgets and as a distillation teacher. Loaded from its
    file only when a pass asks: holding a second copy of a large model for the whole run otherwise
    costs its size in memory for nothing."""

    def __init__(self, model: onnx.ModelProto | None = None, path: str | Path | None = None):
        if model is None and path is None:
            raise ValueError("a Reference needs a model or a path")
        self._model, self.path = model, path

    @property
    def model(self) -> onnx.ModelProto:
        if self._model is None:
            from .model_io import load_model

            self._model = load_model(self.path)
        return self._model


@dataclasses.dataclass
class PassContext:
    """What a pass may need beyond the model (see the module docstring)."""

    ep: str = "cpu"
    sample_inputs: list[Feeds] | None = None
    data: RepresentativeData | None = None
    train: RepresentativeData | None = None  # training data (distill); None: passes that train fall back to `data`
    reference: Reference | None = None
    cache: Cache = dataclasses.field(default_factory=Cache)
    progress: Progress = dataclasses.field(default_factory=Progress)
    logger: logging.Logger = dataclasses.field(default_factory=lambda: logging.getLogger("onnxopt"))

    def __post_init__(self):
        self.progress = as_progress(self.progress)

    @property
    def guard(self) -> SpeedGuard:
        from .guard import SpeedGuard

        return SpeedGuard(self.ep)

    def require_data(self, who: str) -> RepresentativeData:
        """The representative data, or a clear error saying that `who` needs it."""
        if self.data is None:
            raise SettingError(f"{who} needs representative data", setting="calib",
                               example="data.npz (or 'random' to try it out)")
        return self.data


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
        """The docstring's first paragraph, on one line."""
        doc = (cls.__doc__ or "").strip().split("\n\n")[0]
        return " ".join(line.strip() for line in doc.splitlines())

    @classmethod
    def tensor_views(cls, model: onnx.ModelProto) -> dict[str, TensorView]:
        """Where `model`, if this pass produced it, holds tensors of the model it was given under
        other names (for tensor-by-tensor comparisons); none by default."""
        return {}

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"
