"""Every pass on untrained T5 and Whisper encoders and a ConvNeXt (models/zoo.py): the graph shapes of
those families as TorchScript exports them. Untrained, their outputs say little about accuracy, so
these check what each pass finds and that the result stays valid and runs; `fold,fuse` is exact,
and so is the torch interpreter distill trains with."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import ort_run

import onnxopt

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")

PIPELINES = ["fold,fuse,quant:keep_if_slower=false", "fold,fuse,prune:ratio=0.5,keep_if_slower=false",
             "fold,fuse,prune:structure=heads,ratio=0.5,keep_if_slower=false",
             "fold,fuse,lowrank:ratio=0.5,keep_if_slower=false", "fold,fuse,prune:structure=2:4"]
# (model, structure) -> groups the prune pass must find and prune at ratio 0.5
GROUPS = {("t5_encoder", "channels"): 2,  # the FFNs
          ("t5_encoder", "heads"): 1,  # the position bias, shared by both layers, ties their heads
          ("whisper_encoder", "channels"): 3,  # the first Conv1d's channels and the FFNs
          ("whisper_encoder", "heads"): 2,
          ("gpt2", "channels"): 2,  # the FFNs (c_fc's width read at run time by the next Reshape)
          ("gpt2", "heads"): 2,  # through the Split of the fused Q/K/V projection
          ("phi3", "channels"): 2,  # the fused gate/up projections, cut by Slices
          ("phi3", "heads"): 2,  # key/value groups, out of the fused Q/K/V projection cut by Slices
          ("convnext", "channels"): 2}  # the channels-last MLPs


@pytest.fixture(scope="module", params=["t5_encoder", "whisper_encoder", "gpt2", "phi3", "convnext"])
def zoo_model(request):
    from models import zoo

    return request.param, zoo.build(request.param)


def test_fold_fuse_is_exact(zoo_model):
    from models import zoo

    name, path = zoo_model
    model, _ = onnxopt.optimize(str(path), "fold,fuse", compare=False)
    held = zoo.feeds(name, 4, seed=3)
    want = ort_run(onnx.load(str(path)), held)[0]
    np.testing.assert_allclose(ort_run(model, held)[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_each_pipeline_keeps_the_model_valid(zoo_model, pipeline):
    from models import zoo

    name, path = zoo_model
    model, report = onnxopt.optimize(str(path), pipeline, calib=zoo.feeds(name, 64), compare=False)
    onnx.checker.check_model(model)
    held = zoo.feeds(name, 4, seed=3)
    before, after = ort_run(onnx.load(str(path)), held)[0], ort_run(model, held)[0]
    assert after.shape == before.shape and np.all(np.isfinite(after))
    structure = "heads" if "heads" in pipeline else "channels" if "prune:ratio" in pipeline else None
    if structure:
        assert report.passes[-1]["counts"].get("groups pruned", 0) == GROUPS.get((name, structure), 0)


def test_the_model_runs_in_torch_as_in_onnx_runtime(zoo_model):
    pytest.importorskip("torch")
    from models import zoo
    from test_distill import assert_matches_ort

    name, path = zoo_model
    assert_matches_ort(onnx.load(str(path)), zoo.feeds(name, 4, seed=3))


def test_gpt2_heads_that_contribute_nothing_prune_exactly_through_the_fused_projection():
    """Q, K and V come out of one Gemm and a Split: heads 0 and 2 silenced in c_proj's input rows must
    go with their Q, K and V columns and the Split's sizes, leaving the logits as they were."""
    from onnx import numpy_helper

    from models import zoo

    model = onnx.load(str(zoo.build("gpt2")))
    c_proj = [n for n in model.graph.node if n.op_type == "Gemm" and "attn/c_proj" in n.name]
    fused = [n for n in model.graph.node if n.op_type == "Gemm" and "attn/c_attn" in n.name]
    assert len(c_proj) == 2 and len(fused) == 2
    dead = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name: t for t in dead.graph.initializer}
    for node in c_proj:
        weight = numpy_helper.to_array(inits[node.input[1]]).copy()  # [in, out]: GPT-2's Conv1D, transB=0
        weight[0:16] = weight[32:48] = 0
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(weight, node.input[1]))
    spec = "prune:structure=heads,ratio=0.5,recover=false,keep_if_slower=false"
    pruned, report = onnxopt.optimize(dead, spec, calib=zoo.feeds("gpt2", 32), compare=False)
    assert report.passes[-1]["counts"]["units removed"] == 4
    shapes = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    assert [shapes[n.input[1]] for n in fused] == [(64, 96)] * 2  # 2 of 4 heads of Q, K and V each
    held = zoo.feeds("gpt2", 4, seed=3)
    want = ort_run(dead, held)[0]
    np.testing.assert_allclose(ort_run(pruned, held)[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("first", ["", "fold,fuse,"])
@pytest.mark.parametrize("structure, layer, rows, removed", [("heads", "o_proj", slice(32, 64), 2),
                                                             ("channels", "down_proj", slice(0, 64), 128)])
def test_phi3_units_that_contribute_nothing_prune_exactly_through_the_sliced_projections(structure, layer, rows,
                                                                                        removed, first):
    """Phi-3 cuts Q, K and V (and gate and up) out of fused projections with Slices, whose bounds must
    move with what is removed before them: key/value group 1 (query heads 2 and 3, o_proj's rows
    32-63) or FFN neurons 0-63 (down_proj's rows) silenced, then pruned, leave the logits as they were.
    The plain export computes chunk()'s bounds from the projection's width at run time; after pruning
    they are constants."""
    from onnx import numpy_helper

    from models import zoo

    model = onnx.load(str(zoo.build("phi3")))
    dead = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name: t for t in dead.graph.initializer}
    for node in [n for n in dead.graph.node if n.op_type == "MatMul" and f"/{layer}/" in n.name]:
        weight = numpy_helper.to_array(inits[node.input[1]]).copy()
        weight[rows] = 0
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(weight, node.input[1]))
    spec = f"{first}prune:structure={structure},ratio=0.5,recover=false,keep_if_slower=false"
    pruned, report = onnxopt.optimize(dead, spec, calib=zoo.feeds("phi3", 32), compare=False)
    assert report.passes[-1]["counts"]["units removed"] == removed
    held = zoo.feeds("phi3", 4, seed=3)
    want = ort_run(dead, held)[0]
    np.testing.assert_allclose(ort_run(pruned, held)[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
