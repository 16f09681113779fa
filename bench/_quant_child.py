"""One quantization in a fresh process, so wall time and peak RSS are the tool's own.

usage: _quant_child.py TOOL FP32_PATH CALIB_NPZ OUT_PATH BATCH   -> prints one JSON line
"""
from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def batches(calib: str, batch: int) -> list[dict]:
    with np.load(calib) as data:
        arrays = {k: data[k] for k in data.files}
    n = len(next(iter(arrays.values())))
    return [{k: v[i:i + batch] for k, v in arrays.items()} for i in range(0, n, batch)]


def ort_static(src: str, out: str, calib: str, batch: int, method: str, op_types=None) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(batches(calib, batch))

        def get_next(self):
            return next(self.items, None)

    pre = str(Path(out).with_suffix(".pre.onnx"))
    try:
        quant_pre_process(src, pre)
    except Exception:
        try:
            quant_pre_process(src, pre, auto_merge=True)
        except Exception:
            pre = src  # quantize without pre-processing (said in the table legend)
    quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method), op_types_to_quantize=op_types)


def quantize(tool: str, src: str, calib: str, out: str, batch: int) -> dict | None:
    """Quantizes with `tool`; onnxopt also returns where its time went."""
    import onnx

    if tool.startswith("ort-dynamic"):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(src, out, per_channel=tool.endswith("-pc"), weight_type=QuantType.QInt8)
    elif tool.startswith("ort-static-"):
        kind = tool.removeprefix("ort-static-")
        method = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy", "matmul": "MinMax"}[kind]
        ort_static(src, out, calib, batch, method, ["MatMul"] if kind == "matmul" else None)
    elif tool.startswith("onnxsim-"):
        import onnxsim

        # onnxsim's quantizers find nothing to quantize in a raw export (weights behind Constant/Shape
        # arithmetic); after onnxsim.simplify they work, which is how its users run them.
        simplified, _ = onnxsim.simplify(onnx.load(src))
        if tool == "onnxsim-dynamic":
            model = onnxsim.quantize_dynamic(simplified)
        else:
            model = onnxsim.quantize_static(simplified, calibration_data=batches(calib, batch),
                                            method=tool.removeprefix("onnxsim-static-"))
        onnx.save(model, out)
    elif tool.startswith("onnxopt"):
        import onnxopt

        samples = len(np.load(calib)[np.load(calib).files[0]])
        variant = tool.removeprefix("onnxopt").lstrip("-")
        if variant == "dynamic":
            spec = "fold,fuse,quant:mode=dynamic"
        elif variant == "skipln-kept":  # without fuse's residual Sum: ORT runs its SkipLayerNormalization kernel
            spec = f"fold,fuse:skip_layernorm=keep,quant:samples={samples}"
        else:
            spec = f"fold,fuse,quant:samples={samples}" + (f",method={variant}" if variant else "")
        _, report = onnxopt.optimize(src, spec, output=out, calib=calib if variant != "dynamic" else None,
                                     compare=False, verify="none")
        details = report.passes[-1]["details"]
        return {k: details[k] for k in ("calibration_seconds", "speed_check_seconds", "report_seconds") if k in details}
    else:
        raise ValueError(f"unknown tool {tool}")


def peak_rss_mb() -> float:
    """This process's peak RSS. Not RUSAGE_SELF's maxrss: on Linux it keeps the forking parent's peak
    across exec; /proc's VmHWM starts afresh with the new program."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    tool, src, calib, out, batch = sys.argv[1:6]
    os.environ["ONNXOPT_CACHE"] = tempfile.mkdtemp()  # a cold calibration every time
    start = time.perf_counter()
    breakdown = None
    try:
        breakdown = quantize(tool, src, calib, out, int(batch))
        error = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ''}"
    seconds = time.perf_counter() - start
    peak_mb = peak_rss_mb()
    print(json.dumps({"seconds": seconds, "peak_mb": peak_mb, "error": error, "breakdown": breakdown}))


if __name__ == "__main__":
    main()
