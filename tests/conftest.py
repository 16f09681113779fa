"""Shared test helpers: tiny models from onnx text, ORT runs, and the real models built by models/."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return model


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def run_pass(pass_cls, model: onnx.ModelProto, **options):
    """Runs a pass on a copy, the way the manager does."""
    from onnxopt.manager import copy_model
    from onnxopt.options import build_options
    from onnxopt.pass_api import PassContext

    p = pass_cls(build_options(pass_cls.name, pass_cls.Options, options))
    return p.run(copy_model(model), PassContext())


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, feeds, rtol=1e-5, atol=1e-6):
    for ref, got in zip(ort_run(before, feeds), ort_run(after, feeds), strict=True):
        np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol)


@pytest.fixture(scope="session")
def digits_model() -> Path:
    from models import digits

    return digits.build()


@pytest.fixture(scope="session")
def minilm_model() -> Path:
    from models import minilm

    return minilm.build()


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run slow real-model sweeps (CI does)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow real-model sweep: pass --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def optimized_minilm(path: Path, pipeline: str, least_cosine: float) -> onnx.ModelProto:
    """`pipeline` run on a MiniLM export at `path` with the calibration sentences: the result passes the
    checker with strict shape inference (no stale recorded shape) and the report's comparison on
    held-out samples reaches `least_cosine`. For the tests of MiniLM's export forms."""
    import onnxopt
    from models import minilm

    model, report = onnxopt.optimize(str(path), pipeline, calib=str(minilm.calibration_npz()), runs=0)
    onnx.checker.check_model(model, full_check=True)
    assert report.agreement.cosine >= least_cosine, report.agreement
    return model
