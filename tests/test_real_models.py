"""fold,fuse on real models: the onnx package's light models and node cases, MiniLM, the digits CNN.

Tolerances: light models against their stored reference outputs at onnx's own backend-test
tolerances (rtol 1e-3, atol 1e-7; densenet121 rtol 2e-3); node cases at rtol 1e-3, atol 1e-5 (what
ORT itself reaches on the unmodified models); MiniLM and the digits CNN against the unmodified
model under ORT at atol 1e-4 (Conv+BN folding reassociates float sums).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import ort_run

import onnxopt
from models import corpus, light

LIGHT = light.light_models()
NODE_CASES = [c for kind in light.NODE_KINDS for c in light.node_cases(kind)]


@pytest.mark.slow
@pytest.mark.parametrize("name", LIGHT)
def test_light_model_reproduces_reference_after_fold_fuse(name):
    path, feeds, expected = light.light_case(name)
    original = onnx.load(path)
    model, report = onnxopt.optimize(str(path), "fold,fuse", data=feeds, compare=False)
    rtol, atol = light.tolerance(name)
    for got, want in zip(ort_run(model, feeds), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    assert report.optimized.nodes < len(original.graph.node)
    assert "ConstantOfShape" not in report.optimized.ops
    _, again = onnxopt.optimize(model, "fold,fuse", compare=False)  # idempotent on the real graph
    assert not any(p["changed"] for p in again.passes)
    # every BatchNormalization that is the only reader of a Conv output has been folded into it
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    readers = {}
    for n in model.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"
                and producers.get(n.input[0]) == "Conv" and readers[n.input[0]] == 1]


@pytest.mark.slow
@pytest.mark.parametrize("case", NODE_CASES, ids=[c[0] for c in NODE_CASES])
def test_node_case_reproduces_reference(case):
    name, path, data_sets = case
    model, report = onnxopt.optimize(str(path), "fold,fuse", compare=False)
    assert report.optimized.nodes <= report.original.nodes
    for feeds, expected in data_sets:
        for got, want in zip(ort_run(model, feeds), expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=light.NODE_RTOL, atol=light.NODE_ATOL, equal_nan=True)


@pytest.mark.slow
def test_minilm_round_trips(minilm_model):
    from models import minilm

    feeds = minilm.encode(corpus.sentences(8), seq_len=64, pad_to_max=False)
    original = onnx.load(minilm_model)
    model, report = onnxopt.optimize(original, "fold,fuse", data=feeds, runs=0)
    assert report.optimized.nodes < report.original.nodes
    assert report.optimized.parameters <= report.original.parameters
    ref, got = ort_run(original, feeds)[0], ort_run(model, feeds)[0]
    np.testing.assert_allclose(got, ref, atol=1e-4)
    # dynamic batch and sequence survive folding
    other = minilm.encode(corpus.sentences(3, offset=100), seq_len=32, pad_to_max=False)
    np.testing.assert_allclose(ort_run(model, other)[0], ort_run(original, other)[0], atol=1e-4)


def test_digits_cnn_keeps_its_accuracy(digits_model):
    from models import digits

    images, labels = digits.heldout()
    original = onnx.load(digits_model)
    model, report = onnxopt.optimize(original, "fold,fuse", data={"image": images}, runs=0)
    assert "BatchNormalization" in report.original.ops and "BatchNormalization" not in report.optimized.ops
    assert report.agreement.top1 == 1.0
    ref, got = ort_run(original, {"image": images})[0], ort_run(model, {"image": images})[0]
    np.testing.assert_allclose(got, ref, atol=1e-4)
    accuracy = float(np.mean(got.argmax(1) == labels))
    assert accuracy == pytest.approx(float(np.mean(ref.argmax(1) == labels)))
    assert accuracy > 0.95


def test_demo_model_shrinks_and_agrees():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    with np.load(root / "models/demo_inputs.npz") as data:
        feeds = {"image": data["image"]}
    model, report = onnxopt.optimize(str(root / "models/demo.onnx"), "fold,fuse", data=feeds, runs=0)
    assert report.optimized.nodes < report.original.nodes
    assert report.agreement.top1 == 1.0 and report.agreement.max_abs_error < 1e-4
