"""CUDA execution provider paths: skipped unless onnxruntime-gpu sees a CUDA device."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import onnxopt
from onnxopt.runtime import make_session

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                                                  reason="no CUDAExecutionProvider in this onnxruntime")]


def demo_inputs():
    with np.load(ROOT / "models/demo_inputs.npz") as data:
        return {"image": data["image"]}


def test_sessions_really_run_on_cuda():
    session = make_session(str(ROOT / "models/demo.onnx"), "cuda")
    assert session.get_providers()[0] == "CUDAExecutionProvider"


def test_fold_fuse_on_cuda_agrees_with_cpu():
    _, report = onnxopt.optimize(str(ROOT / "models/demo.onnx"), "fold,fuse", ep="cuda", data=demo_inputs(), runs=5)
    assert report.ep == "cuda"
    assert report.agreement.top1 == 1.0 and report.agreement.max_abs_error < 1e-3


def test_int8_on_cuda_is_flagged(tmp_path, monkeypatch):
    from models import digits

    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    _, report = onnxopt.optimize(str(digits.build()), "quant", ep="cuda", calib=str(digits.calibration_npz()),
                                 compare=False)
    assert any("fp16 is the GPU speed-up" in n for n in report.passes[0]["notes"])
