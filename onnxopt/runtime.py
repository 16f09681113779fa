"""ONNX Runtime sessions on a chosen execution provider, with no silent fallback.

ORT quietly runs on another provider when the one asked for fails to load; `make_session` compares
`get_providers()` with the request and raises (or warns, with `fallback=True`).
"""
from __future__ import annotations

import functools
import os
import platform
import re
import sys
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from .errors import OnnxoptError
from .model_io import EXTERNAL_DATA_THRESHOLD, save_model, tensor_bytes

ort.set_default_logger_severity(3)

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
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_model_path:
        options.optimized_model_filepath = optimized_model_path
    if graph_optimization is not None:
        options.graph_optimization_level = graph_optimization
    try:
        if isinstance(model, onnx.ModelProto) and tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD:
            with tempfile.TemporaryDirectory() as tmp:
                path = save_model(model, Path(tmp) / "model.onnx", external_data=True)
                session = ort.InferenceSession(str(path), options, providers=providers)
        else:
            source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
            session = ort.InferenceSession(source, options, providers=providers)
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


def session_with_outputs(model: onnx.ModelProto, names, ep: str = "cpu") -> ort.InferenceSession:
    """A session that also returns the tensors `names` (intermediate values, for calibration and
    comparisons). They are added to the model's outputs only while the session is built: a copy of
    a large model would double its memory. A name-only output is enough: ORT infers the type."""
    outputs = model.graph.output
    count = len(outputs)
    present = {o.name for o in outputs}
    outputs.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names) if n not in present)
    try:
        return make_session(model, ep)
    finally:
        del outputs[count:]


def check_runnable_opset(model: onnx.ModelProto) -> None:
    """Called when ORT refused a model: an opset older than ORT supports is the likely cause."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version < ORT_MIN_OPSET:
            raise OnnxoptError(
                f"ONNX Runtime cannot run this opset-{imp.version} model (it supports opset {ORT_MIN_OPSET} and newer)",
                "convert it with onnx.version_converter.convert_version(model, 13)",
            )


def describe_ort_error(exc: BaseException) -> str:
    """ORT's error reduced to the line that says what is wrong."""
    text = " ".join(str(exc).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    missing = re.search(r"Could not find an implementation for (\w+)\((\d+)\)", text)
    if missing:
        return f"ONNX Runtime has no kernel for op {missing.group(1)} (version {missing.group(2)}) on this provider"
    unknown = re.search(r"No Op registered for (\w+) with domain_version of (\d+)", text)
    if unknown:
        return f"op {unknown.group(1)} does not exist in opset {unknown.group(2)}"
    return f"ONNX Runtime rejected the model: {text[:300]}"


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 4))


@functools.lru_cache(maxsize=1)
def int8_products_saturate() -> bool:
    """Whether ORT's uint8 x int8 GEMMs can saturate on this CPU.

    x86 CPUs without VNNI (AVX2, AVX-512F) multiply u8 by s8 with `vpmaddubsw`, which adds each pair
    of products into a saturating int16: 2 x 255 x 127 overflows it, so large activations meeting
    large weights come out wrong. VNNI (`avx512_vnni`, `avx_vnni`) accumulates in int32, and ARM's
    kernels do not pair-saturate. 7-bit weights (|q| <= 63) keep every pair inside int16.
    Where the flags cannot be read on x86, assume the worst.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return True
    return not ({"avx512_vnni", "avx_vnni"} & set(flags))
