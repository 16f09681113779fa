"""Typed pass options: one frozen dataclass per pass, read by the CLI parser, `onnxopt passes` and config files.

Each field carries its type, default and `metadata={"help": ...}` (see `option`). Values coming from
text (`-p quant:method=entropy`, TOML, YAML) are converted and checked against the field's type here,
so a typo or a wrong type gives the same clear message wherever the pipeline comes from.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal, get_args, get_origin

from .errors import OnnxoptError

LIST_SEPARATOR = ";"


def option(default: Any, help: str, **kwargs) -> Any:
    """A dataclass field with its one-line documentation."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for list-valued option defaults (options are frozen)")
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A pass without options."""


def fields(options_cls: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(options_cls))


def _resolved_types(options_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(options_cls)


def type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "|".join(str(a) for a in get_args(tp))
    if get_origin(tp) is tuple:
        return f"list[{type_name(get_args(tp)[0])}]"
    if get_origin(tp) is typing.Union:
        return " or ".join(type_name(a) for a in get_args(tp) if a is not type(None)) + " (optional)"
    return getattr(tp, "__name__", str(tp))


def convert(value: Any, tp: Any, where: str) -> Any:
    """Converts text or config values to `tp`, raising OnnxoptError that names `where`."""
    origin = get_origin(tp)
    if origin is typing.Union:
        choices = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
            return None
        return convert(value, choices[0], where)
    if origin is Literal:
        allowed = get_args(tp)
        text = str(value).lower() if isinstance(value, str) else value
        if isinstance(value, str) and all(isinstance(a, int) for a in allowed) and value.strip().lstrip("-").isdigit():
            text = int(value)
        if text not in allowed:
            raise OnnxoptError(f"{where}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return text
    if origin is tuple:
        items = value.split(LIST_SEPARATOR) if isinstance(value, str) else list(value)
        return tuple(convert(item, get_args(tp)[0], where) for item in items if item != "")
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise OnnxoptError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise OnnxoptError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            number = tp(value) if tp is float or isinstance(value, int) else int(str(value), 0)
        except (TypeError, ValueError):
            raise OnnxoptError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        return number
    if tp is str:
        return str(value)
    raise TypeError(f"unsupported option type {tp!r}")


def build_options(pass_name: str, options_cls: type, values: dict[str, Any]):
    """Builds the options dataclass from raw values, listing valid options when a name is unknown."""
    types = _resolved_types(options_cls)
    valid = [f.name for f in fields(options_cls)]
    converted = {}
    for key, raw in values.items():
        if key not in types:
            listed = ", ".join(valid) if valid else "none"
            raise OnnxoptError(f"pass '{pass_name}' has no option '{key}'", f"valid options: {listed}")
        converted[key] = convert(raw, types[key], f"option {pass_name}:{key}")
    try:
        return options_cls(**converted)
    except ValueError as exc:
        raise OnnxoptError(f"pass '{pass_name}': {exc}") from None


def describe(options_cls: type) -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) for each option, for listings and docs."""
    types = _resolved_types(options_cls)
    rows = []
    for f in fields(options_cls):
        default = f.default if f.default is not dataclasses.MISSING else "(required)"
        if isinstance(default, tuple):
            default = LIST_SEPARATOR.join(map(str, default))
        rows.append((f.name, type_name(types[f.name]), str(default), f.metadata.get("help", "")))
    return rows
