"""onnxopt: an ONNX model-compression compiler built around a pass manager."""
from .errors import OnnxoptError, PassFailedError
from .options import option
from .pass_api import Pass, PassContext, PassResult, Reference
from .registry import register
from .table import Table

__version__ = "0.1.0"

__all__ = ["OnnxoptError", "Pass", "PassContext", "PassFailedError", "PassResult", "Reference", "Table", "option",
           "optimize", "register", "__version__"]


def optimize(model, passes, **kwargs):
    """Runs a pipeline on a model (ModelProto or path); returns (model, report). See `onnxopt.api`."""
    from .api import optimize as _optimize

    return _optimize(model, passes, **kwargs)
