"""ONNX Runtime sessions on a chosen execution provider, with no silent fallback.

ORT quietly runs on another provider when the one asked for fails to load; `make_session` compares
`get_providers()` with the request and raises (or warns, with `fallback=True`).
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from . import sparsity
from .errors import OnnxoptError
from .model_io import EXTERNAL_DATA_THRESHOLD, save_model, tensor_bytes

ort.set_default_logger_severity(4)

EXECUTION_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    # ORT's documented order: TensorRT first, CUDA for what TensorRT rejects, CPU last.
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
ORT_MIN_OPSET = 7


def resolve_providers(ep: str, fallback: bool = False) -> list[str]:
    """The provider list for `ep`, checked against what this onnxruntime build offers."""
    if ep not in EXECUTION_PROVIDERS:
        raise OnnxoptError(f"unknown execution provider '{ep}'", f"choose one of {', '.join(EXECUTION_PROVIDERS)}")
    wanted = EXECUTION_PROVIDERS[ep]
    available = ort.get_available_providers()
    if wanted[0] not in available:
        message = (f"execution provider '{ep}' ({wanted[0]}) is not available in this onnxruntime "
                   f"(available: {', '.join(available)})")
        hint = "install onnxruntime-gpu with a matching CUDA" + (" and TensorRT" if ep == "tensorrt" else "")
        if not fallback:
            raise OnnxoptError(message, hint + ", or pass --ep-fallback to run on CPU")
        print(f"onnxopt: warning: {message}; using CPU", file=sys.stderr)
        return ["CPUExecutionProvider"]
    return wanted


def effective_ep(ep: str, fallback: bool) -> str:
    """`ep`, or "cpu" when it is unavailable and fallback is allowed (warning once)."""
    providers = resolve_providers(ep, fallback)
    return ep if providers[0] == EXECUTION_PROVIDERS[ep][0] else "cpu"


def make_session(model: onnx.ModelProto | str | Path, ep: str = "cpu", *, fallback: bool = False,
                 threads: int | None = None, optimized_model_path: str | None = None,
                 graph_optimization: ort.GraphOptimizationLevel | None = None) -> ort.InferenceSession:
    """An InferenceSession on `ep`, raising OnnxoptError when ORT cannot run the model there."""
    providers = resolve_providers(ep, fallback)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors come back as exceptions: ORT printing them too makes two messages
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_model_path:
        options.optimized_model_filepath = optimized_model_path
    if graph_optimization is not None:
        options.graph_optimization_level = graph_optimization
    asked = with_provider_options(providers, model)
    try:
        if isinstance(model, onnx.ModelProto) and tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD:
            with tempfile.TemporaryDirectory() as tmp:
                path = save_model(model, Path(tmp) / "model.onnx", external_data=True)
                session = ort.InferenceSession(str(path), options, providers=asked)
        else:
            source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
            session = ort.InferenceSession(source, options, providers=asked)
    except Exception as exc:
        if isinstance(model, onnx.ModelProto):
            check_runnable_opset(model)
        raise OnnxoptError(describe_ort_error(exc), "the model cannot run under ONNX Runtime as is") from exc
    got = session.get_providers()
    if got[0] != providers[0]:
        message = f"ONNX Runtime fell back to {got[0]} instead of {providers[0]} (the provider failed to load)"
        if not fallback:
            raise OnnxoptError(message, "check the CUDA/TensorRT libraries, or pass --ep-fallback")
        print(f"onnxopt: warning: {message}", file=sys.stderr)
    return session


def with_provider_options(providers: list[str], model: onnx.ModelProto | str | Path) -> list:
    """`providers`, with TensorRT's sparse-weights switch on where the model records 2:4 sparsity
    (`onnxopt.sparsity`, written by `prune:structure=2:4`): TensorRT runs 2:4 weights on sparse
    tensor cores (Ampere and newer) only when the engine is built with it."""
    if providers[0] != "TensorrtExecutionProvider":
        return providers
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)  # the metadata is all that is read
    if not any(record.get("pattern") == "2:4" for record in sparsity.read(model).values()):
        return providers
    return [("TensorrtExecutionProvider", {"trt_sparsity_enable": "True"}), *providers[1:]]


def check_runnable_opset(model: onnx.ModelProto) -> None:
    """Called when ORT refused a model: an opset older than ORT supports is the likely cause."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version < ORT_MIN_OPSET:
            raise OnnxoptError(
                f"ONNX Runtime cannot run this opset-{imp.version} model (it supports opset {ORT_MIN_OPSET} and newer)",
                "convert it with onnx.version_converter.convert_version(model, 13)",
            )


def ort_message(exc: BaseException) -> str:
    """ORT's error text on one line, without its "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT :" prefix."""
    return re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", " ".join(str(exc).split()))


def describe_ort_error(exc: BaseException) -> str:
    """ORT's refusal of a model reduced to the line that says what is wrong."""
    text = ort_message(exc)
    missing = re.search(r"Could not find an implementation for (\w+)\((\d+)\)", text)
    if missing:
        return f"ONNX Runtime has no kernel for op {missing.group(1)} (version {missing.group(2)}) on this provider"
    unknown = re.search(r"No Op registered for (\w+) with domain_version of (\d+)", text)
    if unknown:
        return f"op {unknown.group(1)} does not exist in opset {unknown.group(2)}"
    return f"ONNX Runtime rejected the model: {text[:300]}"


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 4))
