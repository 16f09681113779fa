"""Finding passes: the `onnxopt.passes` entry-point group (built-ins register there too) and plugin files."""
from __future__ import annotations

import importlib.util
import inspect
import sys
from importlib.metadata import entry_points
from pathlib import Path

from .errors import OnnxoptError
from .pass_api import Pass

ENTRY_POINT_GROUP = "onnxopt.passes"

_registered: dict[str, type[Pass]] = {}
_entry_points_loaded = False


def register(pass_cls: type[Pass]) -> type[Pass]:
    """Registers a pass class under its `name` (usable as a decorator)."""
    if not (inspect.isclass(pass_cls) and issubclass(pass_cls, Pass) and pass_cls.name):
        raise TypeError(f"{pass_cls!r} is not a Pass subclass with a name")
    existing = _registered.get(pass_cls.name)
    if existing is not None and existing is not pass_cls and _qualname(existing) != _qualname(pass_cls):
        raise OnnxoptError(f"two passes are named '{pass_cls.name}': {_qualname(existing)} and {_qualname(pass_cls)}")
    _registered[pass_cls.name] = pass_cls
    return pass_cls


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            register(ep.load())
        except Exception as exc:  # a broken third-party plugin must not hide the others
            print(f"onnxopt: warning: could not load pass '{ep.name}' ({ep.value}): {exc}", file=sys.stderr)


def load_plugin(path: str | Path) -> list[str]:
    """Imports a Python file and registers every Pass subclass it defines; returns their names."""
    path = Path(path)
    if not path.is_file():
        raise OnnxoptError(f"plugin file not found: {path}", "pass the path of a .py file defining a Pass")
    module_name = f"onnxopt_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SystemExit as exc:  # a plugin that exits would end onnxopt silently
        raise OnnxoptError(f"plugin {path} called sys.exit({exc.code}) while it was imported",
                           "a plugin file should only define passes") from None
    except Exception as exc:
        raise OnnxoptError(f"plugin {path} failed to import: {type(exc).__name__}: {exc}") from exc
    names = []
    for _, obj in inspect.getmembers(module, inspect.isclass):
        if issubclass(obj, Pass) and obj.name and obj.__module__ == module_name:
            register(obj)
            names.append(obj.name)
    if not names:
        raise OnnxoptError(f"plugin {path} defines no Pass subclass with a name")
    return names


def all_passes() -> dict[str, type[Pass]]:
    _load_entry_points()
    return dict(sorted(_registered.items()))


def get_pass(name: str) -> type[Pass]:
    passes = all_passes()
    if name not in passes:
        raise OnnxoptError(f"unknown pass '{name}'", f"valid passes: {', '.join(passes) or 'none installed'}")
    return passes[name]
