"""`prune` on the model families of models/families.py (ShuffleNet's channel shuffle, MobileNetV3's
squeeze-and-excitation and mean-pooled classifier, a U-Net's Resize and ConvTranspose, DenseNet's
concatenations, ResNeXt's grouped Convs, GroupNorm, nn.MultiheadAttention's run-time sizes), each as TorchScript (opset 13 and 17) and dynamo
(opset 18) export it: the exactness oracle on every group the walk finds (dead units removed change
nothing, live ones do), the groups each family must have, and a valid model from every pipeline."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import ort_run
from test_prune import kill

import onnxopt
from onnxopt.passes.prune import Prune, _pruned
from onnxopt.passes.prune.groups import find_groups

pytestmark = pytest.mark.slow

EXPORTS = [(name, 17, False) for name in ("shufflenet", "mobilenetv3", "unet", "densenet", "resnext", "groupnorm",
                                          "audio_attention")]
EXPORTS += [(name, 18, True) for name, _, _ in EXPORTS] + [(name, 13, False) for name, _, _ in EXPORTS[:6]]
# the groups each family must keep (more is fine): each number fell when a rule it needs was missing
LEAST_GROUPS = {"shufflenet": 3, "mobilenetv3": 7, "unet": 6, "densenet": 7, "resnext": 2, "groupnorm": 2,
                "audio_attention": 2}


def _export(name, opset, dynamo):
    """The export as the pass sees it: weights in Constant nodes moved to initializers, shared vectors
    (GroupNorm's unit scales, after fold) copied for each reader."""
    from models import families
    from onnxopt.surgery import constants_to_initializers, unshare_vectors

    model = onnx.load(str(families.build(name, opset, dynamo)))
    constants_to_initializers(model.graph)
    unshare_vectors(model.graph)
    return model


@pytest.mark.parametrize("name, opset, dynamo", EXPORTS)
def test_every_group_of_each_family_prunes_exactly(name, opset, dynamo):
    from models import families

    model = _export(name, opset, dynamo)
    feeds = families.feeds(name, 3, seed=2)
    shapes = Prune()._shapes(model, onnxopt.PassContext(sample_inputs=[feeds]), None)
    groups, blocked = find_groups(model, shapes)
    assert len(groups) >= LEAST_GROUPS[name], blocked
    for group in groups:
        units = list(range(0, group.units, 3))
        dead = kill(model, group, units)
        again = next(g for g in find_groups(dead, shapes)[0] if g.sources == group.sources)
        pruned = _pruned(dead, [(again, units)], {})
        want = ort_run(dead, feeds)[0]
        np.testing.assert_allclose(ort_run(pruned, feeds)[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max(),
                                   err_msg=f"group {group.sources}")
    live = _pruned(model, [(groups[0], list(range(1, groups[0].units, 3)))], {})
    assert np.abs(ort_run(live, feeds)[0] - ort_run(model, feeds)[0]).max() > 1e-4  # the oracle can fail


@pytest.mark.parametrize("name, opset, dynamo", [e for e in EXPORTS if e[1] != 13])
@pytest.mark.parametrize("pipeline", ["prune:ratio=0.5,keep_if_slower=false",
                                      "fold,fuse,prune:ratio=0.5,keep_if_slower=false,quant:keep_if_slower=false",
                                      "prune:structure=2:4"])
def test_each_pipeline_keeps_each_family_valid(name, opset, dynamo, pipeline):
    from models import families

    model = _export(name, opset, dynamo)
    pruned, report = onnxopt.optimize(model, pipeline, calib=families.feeds(name, 32), compare=False, runs=0)
    onnx.checker.check_model(pruned)
    feeds = families.feeds(name, 5, seed=3)  # a batch size the samples did not have
    assert ort_run(pruned, feeds)[0].shape == ort_run(model, feeds)[0].shape
    counts = next(p for p in report.passes if p["name"] == "prune")["counts"]
    assert counts.get("groups pruned", counts.get("layers sparsified", 0)) > 0
