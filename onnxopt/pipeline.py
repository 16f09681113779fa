"""Pipeline specs: `fold,prune:sparsity=0.5,quant:method=entropy,samples=64` and TOML/YAML config files.

In the text form passes are separated by commas and options follow the pass name after `:`;
`key=value` items after a comma (or another `:`) belong to the pass before them; a `:` followed by
text without `=` stays in the value before it (`eval=package.module:function`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from .errors import OnnxoptError
from .options import build_options, convert
from .pass_api import Pass
from .registry import get_pass

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


def load_config(path: str | Path) -> dict[str, Any]:
    """Reads a pipeline config (TOML or YAML): `passes` plus optional run settings.

    ```toml
    passes = ["fold", "fuse", { name = "quant", method = "entropy" }]
    ep = "cpu"
    runs = 50
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
    config["passes"] = _config_passes(config.get("passes"), path)
    return _checked_settings(config, path)


# Run settings a config file may carry, with their types (command-line flags override them).
SETTINGS = {"ep": Literal["cpu", "cuda", "tensorrt"], "runs": int, "threads": Optional[int],
            "verify": Literal["none", "structure", "numeric"], "data": Optional[str]}


def _checked_settings(config: dict[str, Any], path: Path) -> dict[str, Any]:
    from .inputs import parse_shapes

    unknown = set(config) - set(SETTINGS) - {"passes", "shapes"}
    if unknown:
        raise OnnxoptError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}",
                           f"valid: passes, shapes, {', '.join(SETTINGS)}")
    for key, tp in SETTINGS.items():
        if key in config:
            config[key] = convert(config[key], tp, f"{path}: {key}")
    shapes = config.get("shapes", {})
    if not isinstance(shapes, dict):
        raise OnnxoptError(f"{path}: 'shapes' must be a table of NAME = \"DIMxDIM\"")
    config["shapes"] = parse_shapes([f"{k}={v}" for k, v in shapes.items()])
    return config


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
