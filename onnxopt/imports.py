"""Loading a user's Python object named on the command line: `package.module:name` or `path/file.py:name`."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

from .errors import OnnxoptError


def import_object(spec: str, purpose: str, hint: str):
    """The object `spec` names; errors say it was wanted for `purpose` (e.g. "calibration data")
    and end with `hint` when the module has no such name."""
    module_name, _, attribute = spec.rpartition(":")
    if not module_name or not attribute:
        raise OnnxoptError(f"'{spec}' for {purpose} is not module:function", "write package.module:function or file.py:function")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise OnnxoptError(f"{purpose} module {file} not found", "give an existing file.py:function")
            module_spec = importlib.util.spec_from_file_location(f"_onnxopt_user_{file.stem}", file)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.append(os.getcwd())  # as `python -m` would: modules beside the user resolve
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise OnnxoptError(f"cannot import '{module_name}' for {purpose} ({exc})",
                           "put it on PYTHONPATH, or write path/to/file.py:function") from exc
    if not hasattr(module, attribute):
        raise OnnxoptError(f"'{module_name}' has no attribute '{attribute}'", hint)
    return getattr(module, attribute)
