"""Every pass on MiniLM exported at opset 11 (models/minilm.py `build(opset=11)`), the form many BERT
exports on model hubs still have: axes as attributes, Softmax over a 2-D coercion, LayerNorm written out,
and an attention mask built by a Reshape to a computed shape that onnx's shape inference cannot rank.
Each pipeline must give a valid model that ONNX Runtime runs, as close to the original as on the
opset-17 export (bounds as in test_dynamo_exports.py), and `fuse` must find the same Softmaxes to floor."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import optimized_minilm, ort_run

import onnxopt

pytestmark = pytest.mark.slow

# pipeline -> the least cosine of the report's comparison (MiniLM's last_hidden_state, held-out samples)
MINILM_PIPELINES = {
    "fold,fuse,quant": 0.98,
    "prune:ratio=0.5,keep_if_slower=false": 0.93,
    "prune:structure=heads,ratio=0.5,keep_if_slower=false": 0.95,
    "lowrank:ratio=0.5,keep_if_slower=false": 0.85,
}


@pytest.fixture(scope="module")
def minilm_opset11():
    from models import minilm

    return minilm.build(opset=11)


def test_fold_fuse_finds_every_attention_softmax_and_static_reshape(minilm_opset11):
    model, report = onnxopt.optimize(str(minilm_opset11), "fold,fuse", compare=False)
    assert report.passes[1]["counts"]["Softmax floor"] == 6  # one per layer: each layer's rank is known
    # the heads' Reshapes copy the input's batch and sequence dims (0 in the target), as at opset 17
    assert report.passes[0]["counts"]["reshape shapes made constant"] == 18


@pytest.mark.parametrize("pipeline", list(MINILM_PIPELINES))
def test_each_pipeline_keeps_the_opset11_minilm_valid_and_close(minilm_opset11, pipeline):
    from models import minilm

    model = optimized_minilm(minilm_opset11, pipeline, MINILM_PIPELINES[pipeline])
    feeds = minilm.encode(["A sentence of another length than the calibration's."], seq_len=24)
    assert ort_run(model, feeds)[0].shape == (1, 24, 384)  # batch and sequence stay dynamic


def test_the_opset11_minilm_runs_in_torch_as_in_onnx_runtime(minilm_opset11):
    from models import minilm
    from test_distill import assert_matches_ort  # axes attributes, the 2-D Softmax, the written-out LayerNorm

    feeds = {k: v[:4] for k, v in np.load(minilm.calibration_npz()).items()}
    assert_matches_ort(onnx.load(str(minilm_opset11)), feeds)
