"""Run settings, declared once: the command line's flags, the config file's keys and `optimize()`'s
keywords are all read from `RunSettings`.

Each field carries its type, default and help, plus how it is spelled on the command line
(`flags`) and whether a config file may set it. Values from text (flags, TOML, YAML) and from Python
are checked here with the same messages; a flag given on the command line wins over the config.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal, Optional

from .errors import OnnxoptError
from .options import convert, type_name

EP = Literal["cpu", "cuda", "tensorrt"]
Verify = Literal["none", "structure", "numeric"]


def setting(default: Any, help: str, *, flags: tuple[str, ...], config: bool = True, metavar: str | None = None,
            inverted_flag: bool = False, shown_type: str | None = None) -> Any:
    """A run setting. `inverted_flag`: the flag turns a default-true setting off (`--no-compare`);
    `shown_type`: the type as docs show it, where the Python type says little (Any, dict)."""
    metadata = {"help": help, "flags": flags, "config": config, "metavar": metavar, "inverted_flag": inverted_flag,
                "shown_type": shown_type}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=dict, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class RunSettings:
    output: Optional[str] = setting(None, "where to write the optimized model (atomic write)",
                                    flags=("-o", "--output"), config=False)
    in_place: bool = setting(False, "allow the output to be the input file", flags=("--in-place",), config=False)
    report: Optional[str] = setting(None, "write the report as JSON to this path", flags=("--report",))
    data: Any = setting(None, "sample inputs to compare the models on: an .npz named by input, or a "
                              "test_data_set_* folder (from Python also a dict of arrays)", flags=("--data",),
                  shown_type="path")
    calib: Any = setting(None, "representative data: samples of the model's inputs for the passes that measure "
                               "activations (quant calibrates on them, prune and lowrank measure layer inputs; "
                               "distill trains on them when no --train is given): an .npz, a folder of .npy/.pb or test_data_set_*, "
                               "module:function, or 'random'",
                         flags=("--calib",), shown_type="path or spec")
    train: Any = setting(None, "training data for distill, in any form --calib takes (usually more of it); keep it "
                               "apart from your evaluation data", flags=("--train",), shown_type="path or spec")
    shapes: dict = setting({}, "shape of a dynamic input (NAME=DIMS, e.g. input_ids=1x128), or of a named dynamic "
                               "dim (batch=1)", flags=("--shape",), metavar="NAME=DIMS",
                          shown_type="NAME=DIMS, repeatable")
    ep: EP = setting("cpu", "ONNX Runtime execution provider", flags=("--ep",))
    ep_fallback: bool = setting(False, "warn and use the CPU when the execution provider is unavailable",
                                flags=("--ep-fallback",))
    runs: int = setting(50, "timed runs per model (0 skips timing)", flags=("--runs",))
    threads: Optional[int] = setting(None, "ORT intra-op threads for timing (0 or unset: ORT's default, one per "
                                           "core)", flags=("--threads",))
    verify: Verify = setting("structure", "check after each pass: the onnx checker and shape inference "
                                          "(structure), plus outputs under ORT (numeric)", flags=("--verify",))
    compare: bool = setting(True, "run both models under ORT and compare them", flags=("--no-compare",),
                            inverted_flag=True)
    plugins: tuple[str, ...] = setting((), "a .py file defining extra passes (repeatable)", flags=("--plugin",),
                                     metavar="FILE.py")
    external_data: Optional[bool] = setting(None, "save weights as external data (default: only past 2 GB)",
                                            flags=("--external-data",))

    def __post_init__(self):
        if self.runs < 0:
            raise ValueError(f"runs must be >= 0, not {self.runs}")
        if self.threads is not None and self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: ONNX Runtime's default), not {self.threads}")

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    @classmethod
    def types(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def build(cls, values: dict[str, Any], where: str, *, config: bool = False,
              base: RunSettings | None = None) -> RunSettings:
        """Settings from raw values (text from flags or config files, or Python objects), checked;
        `config`: only the keys a config file may set; `base`: the settings they override."""
        types = cls.types()
        allowed = [f.name for f in cls.fields() if f.metadata["config"] or not config]
        converted = {}
        for name, value in values.items():
            if name not in allowed:
                raise OnnxoptError(f"{where}: unknown setting '{name}'", f"valid: {', '.join(allowed)}")
            converted[name] = _convert(name, value, types[name], where)
        try:
            return dataclasses.replace(base or cls(), **converted)
        except ValueError as exc:
            raise OnnxoptError(f"{where}: {exc}") from None

    @classmethod
    def flag(cls, name: str) -> str:
        """The long command-line flag of setting `name`."""
        return next(f.metadata["flags"][-1] for f in cls.fields() if f.name == name)


def _convert(name: str, value: Any, tp: Any, where: str) -> Any:
    label = f"{where}: {name}"
    if name == "shapes":
        from .inputs import parse_shapes

        if isinstance(value, dict):
            items = [f"{k}={'x'.join(map(str, v)) if isinstance(v, (tuple, list)) else v}" for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise OnnxoptError(f"{label} must be a table of NAME = \"DIMxDIM\"")
        return parse_shapes(items)
    if name == "plugins":
        return tuple(str(v) for v in ([value] if isinstance(value, str) else value))
    if tp is Any or value is None:
        return value
    return convert(value, tp, label)


def add_flags(parser, settings_cls: type[RunSettings] = RunSettings) -> None:
    """Adds one argparse flag per setting; a flag left out parses as None (the config or default then holds)."""
    types = settings_cls.types()
    for field in settings_cls.fields():
        meta, tp = field.metadata, types[field.name]
        kwargs: dict[str, Any] = {"dest": field.name, "help": _help(field), "default": None}
        if meta["inverted_flag"]:
            kwargs.update(action="store_const", const=False)
        elif tp is bool or tp == Optional[bool]:
            kwargs.update(action="store_const", const=True)
        elif field.name in ("shapes", "plugins"):
            kwargs.update(action="append", metavar=meta["metavar"])
        else:
            base = typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Union else tp
            if typing.get_origin(base) is Literal:
                kwargs["choices"] = list(typing.get_args(base))
            elif base in (int, float):
                kwargs["type"] = base
            if meta["metavar"]:
                kwargs["metavar"] = meta["metavar"]
        parser.add_argument(*meta["flags"], **kwargs)


def _default(field: dataclasses.Field) -> Any:
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def _help(field: dataclasses.Field) -> str:
    default = _default(field)
    shown = "" if default in (None, (), {}, False) or field.metadata["inverted_flag"] else f" (default {default})"
    return field.metadata["help"] + shown


def describe() -> list[tuple[str, str, str, str, str, bool]]:
    """(flags, key in config files and optimize(), type, default, help, settable in a config file)
    per setting, for listings and docs."""
    types = RunSettings.types()
    rows = []
    for f in RunSettings.fields():
        default = "" if _default(f) in (None, (), {}) else str(_default(f))
        shown = f.metadata["shown_type"] or type_name(types[f.name])
        rows.append((", ".join(f.metadata["flags"]), f.name, shown, default, f.metadata["help"], f.metadata["config"]))
    return rows
