"""What a benchmark ran on: CPU model, the SIMD flags int8 and fp32 kernels care about, cores, versions."""
from __future__ import annotations

import os
import platform
from pathlib import Path

FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def describe() -> str:
    import numpy
    import onnx
    import onnxruntime

    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    present = [f for f in FLAGS if f in flags] or ["(flags unknown)"]
    return (f"CPU: {model}, {os.cpu_count()} logical cores; flags: {' '.join(present)}"
            f"{'' if 'avx512_vnni' in flags else ' (no AVX512-VNNI: int8 runs without VNNI)'}\n"
            f"onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}, numpy {numpy.__version__}")
