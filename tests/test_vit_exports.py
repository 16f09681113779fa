"""Every pass on a freshly initialized vision transformer (models/vit.py), exported by TorchScript and
by dynamo. Its biases are all zero and its LayerNorm scales all one, so `fold` merges them into a few
shared initializers: `fold` must still name what it makes uniquely (Q, K and V share one reshape
target), and `prune` must not tie the channels of every layer that reads a merged zero bias."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import ort_run
from onnx import numpy_helper

import onnxopt

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")

HEAD_ROWS = [slice(0, 16), slice(32, 48)]  # o_proj's input rows read from heads 0 and 2


@pytest.fixture(scope="module", params=["torchscript", "dynamo"])
def vit_model(request):
    from models import vit

    return vit.build(dynamo=request.param == "dynamo")


@pytest.fixture(scope="module")
def calib():
    from models import vit

    return {"pixel_values": vit.images(64)}


@pytest.fixture(scope="module")
def held_out():
    from models import vit

    return {"pixel_values": vit.images(16, seed=5)}


def centered_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine of each image's logits less the reference's mean logits: an untrained model gives
    every image nearly the same logits, so what differs between images is what is compared."""
    mean = a.mean(axis=0)
    a, b = a - mean, b - mean
    return float(np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def close(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def o_proj_weights(model: onnx.ModelProto) -> list[str]:
    """Each layer's attention output projection: the 64x64 weight read right after the heads merge."""
    names = {t.name: t for t in model.graph.initializer}
    weighted = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in names]
    assert len(weighted) == 12  # q, k, v, o, fc1, fc2 a layer
    return [weighted[6 * layer + 3].input[1] for layer in range(2)]


def test_fold_fuse_is_exact(vit_model, held_out):
    model, _ = onnxopt.optimize(str(vit_model), "fold,fuse", compare=False)
    onnx.checker.check_model(model)
    close(ort_run(model, held_out)[0], ort_run(onnx.load(str(vit_model)), held_out)[0])


# untrained weights: every head matters alike and every matrix's spectrum is flat, so removing half
# the heads or half the rank loses much (0.77 and 0.46 measured); the bounds catch a broken model
@pytest.mark.parametrize("pipeline, least", [("fold,fuse,quant:keep_if_slower=false", 0.99),
                                             ("fold,fuse,prune:ratio=0.5,keep_if_slower=false", 0.95),
                                             ("fold,fuse,prune:structure=heads,ratio=0.5,keep_if_slower=false", 0.6),
                                             ("fold,fuse,lowrank:ratio=0.5,keep_if_slower=false", 0.3)])
def test_each_pipeline_keeps_the_vit_close(vit_model, calib, held_out, pipeline, least):
    model, report = onnxopt.optimize(str(vit_model), pipeline, calib=calib, compare=False)
    onnx.checker.check_model(model)
    assert centered_cosine(ort_run(onnx.load(str(vit_model)), held_out)[0], ort_run(model, held_out)[0]) >= least
    if "prune" in pipeline:  # one group a layer: the merged zero biases tie nothing
        assert report.passes[-1]["counts"]["groups pruned"] == 2


def test_heads_that_contribute_nothing_prune_exactly(vit_model, calib, held_out):
    model, _ = onnxopt.optimize(str(vit_model), "fold,fuse", compare=False)
    dead = onnx.ModelProto.FromString(model.SerializeToString())
    for tensor in dead.graph.initializer:
        if tensor.name in o_proj_weights(dead):
            value = numpy_helper.to_array(tensor).copy()
            for rows in HEAD_ROWS:
                value[rows] = 0
            tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    spec = "prune:structure=heads,ratio=0.5,recover=false,keep_if_slower=false"
    pruned, report = onnxopt.optimize(dead, spec, calib=calib, compare=False)
    assert report.passes[-1]["counts"]["units removed"] == 4
    close(ort_run(pruned, held_out)[0], ort_run(dead, held_out)[0])
    live, _ = onnxopt.optimize(model, spec, calib=calib, compare=False)
    assert centered_cosine(ort_run(model, held_out)[0], ort_run(live, held_out)[0]) < 0.9999


def test_the_vit_runs_in_torch_as_in_onnx_runtime(vit_model, held_out):
    pytest.importorskip("torch")
    from test_distill import assert_matches_ort

    assert_matches_ort(onnx.load(str(vit_model)), held_out)
