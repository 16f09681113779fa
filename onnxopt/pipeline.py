"""Pipeline specs: `fold,prune:sparsity=0.5,quant:method=entropy,samples=64` and TOML/YAML config files.

In the text form passes are separated by commas and options follow the pass name after `:`;
`key=value` items after a comma (or another `:`) belong to the pass before them; a `:` followed by
text without `=` stays in the value before it (`eval=package.module:function`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import OnnxoptError
from .options import build_options
from .pass_api import Pass
from .registry import get_pass
from .settings import RunSettings

PassSpec = tuple[str, dict[str, Any]]


def parse_spec(text: str) -> list[PassSpec]:
    """Splits a pipeline string into (pass name, raw options) pairs, without checking them."""
    specs: list[PassSpec] = []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        head, *items = token.split(":")
        if "=" in head:
            if not specs:
                raise OnnxoptError(f"pipeline '{text}' starts with an option '{head}'", "write pass:option=value")
            items.insert(0, head)
        else:
            specs.append((head.strip(), {}))
        last_key = None
        for item in items:
            key, sep, value = item.partition("=")
            if not sep and last_key is not None:  # a colon inside a value: eval=package.module:function
                specs[-1][1][last_key] += ":" + item.strip()
                continue
            if not sep or not key.strip():
                raise OnnxoptError(f"malformed option '{item}' in pipeline '{text}'", "write pass:option=value")
            last_key = key.strip()
            specs[-1][1][last_key] = value.strip()
    if not specs:
        raise OnnxoptError("the pipeline is empty", "give passes with -p, e.g. -p fold,fuse")
    return specs


def build_pipeline(specs: list[PassSpec] | str) -> list[Pass]:
    """Instantiates passes with type-checked options."""
    if isinstance(specs, str):
        specs = parse_spec(specs)
    passes = []
    for name, values in specs:
        pass_cls = get_pass(name)
        passes.append(pass_cls(build_options(name, pass_cls.Options, values)))
    return passes


def load_config(path: str | Path) -> tuple[list[PassSpec], RunSettings]:
    """Reads a pipeline config (TOML or YAML): `passes` plus any run setting a config may hold
    (see `RunSettings`; the command line's flags override them).

    ```toml
    passes = ["fold", "fuse", { name = "quant", method = "entropy" }]
    ep = "cpu"
    runs = 50
    calib = "calib.npz"
    [shapes]
    input_ids = "1x128"
    ```
    """
    path = Path(path)
    if not path.is_file():
        raise OnnxoptError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            config = yaml.safe_load(text) or {}
        else:
            import tomllib

            config = tomllib.loads(text)
    except ImportError as exc:
        raise OnnxoptError(f"cannot read {path}: {exc}", "pip install pyyaml for YAML configs") from exc
    except Exception as exc:
        raise OnnxoptError(f"cannot parse {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(config, dict):
        raise OnnxoptError(f"{path} must hold a table/mapping at the top level")
    passes = _config_passes(config.pop("passes", None), path)
    return passes, RunSettings.build(config, str(path), config=True)


def _config_passes(entries: Any, path: Path) -> list[PassSpec]:
    if isinstance(entries, str):
        return parse_spec(entries)
    if not isinstance(entries, list) or not entries:
        raise OnnxoptError(f"{path}: 'passes' must be a non-empty list", 'e.g. passes = ["fold", "fuse"]')
    specs: list[PassSpec] = []
    for entry in entries:
        if isinstance(entry, str):
            specs.extend(parse_spec(entry))
        elif isinstance(entry, dict) and "name" in entry:
            specs.append((entry["name"], {k: v for k, v in entry.items() if k != "name"}))
        else:
            raise OnnxoptError(f"{path}: pass entry {entry!r} needs a 'name'")
    return specs
