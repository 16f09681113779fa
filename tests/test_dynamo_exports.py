"""Every pass on models exported by torch's dynamo exporter (torch.onnx.export's default since torch
2.9; models/dynamo.py builds them): opset 18 (and 21, with ONNX's Gelu op), a shape recorded for every
tensor, its own GELU and attention-mask forms. Each pipeline must give a valid model that ONNX Runtime runs, as close to the
original as the same pipeline gets on the TorchScript export (bounds below, measured there)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import optimized_minilm, ort_run

import onnxopt

pytestmark = pytest.mark.slow

# pipeline -> the least cosine of the report's comparison (MiniLM's last_hidden_state, held-out samples)
MINILM_PIPELINES = {
    "fold,fuse": 0.99999,
    "fold,fuse,quant": 0.98,
    "prune:ratio=0.5,keep_if_slower=false": 0.93,
    "prune:structure=heads,ratio=0.5,keep_if_slower=false": 0.95,
    "prune:structure=2:4": 0.85,
    "lowrank:ratio=0.5,keep_if_slower=false": 0.85,
}


@pytest.fixture(scope="module")
def minilm_dynamo():
    from models import dynamo

    return dynamo.minilm()


@pytest.mark.parametrize("pipeline", list(MINILM_PIPELINES))
def test_each_pipeline_keeps_the_dynamo_minilm_valid_and_close(minilm_dynamo, pipeline):
    from models import minilm

    model = optimized_minilm(minilm_dynamo, pipeline, MINILM_PIPELINES[pipeline])
    feeds = minilm.encode(["A sentence of another length than the calibration's."], seq_len=24)
    assert ort_run(model, feeds)[0].shape == (1, 24, 384)  # batch and sequence stay dynamic


def ort_ops(model: onnx.ModelProto, tmp_path) -> list[str]:
    """The ops ONNX Runtime's CPU EP runs after its own graph optimizations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "ort.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def test_after_fold_fuse_ort_fuses_the_gelu_and_keeps_the_fast_layernorm(minilm_dynamo, tmp_path):
    before = ort_ops(onnx.load(str(minilm_dynamo)), tmp_path)
    assert "Erf" in before and before.count("SkipLayerNormalization") == 12  # the oracle: what ORT does unhelped
    model, report = onnxopt.optimize(str(minilm_dynamo), "fold,fuse", compare=False)
    assert report.passes[1]["counts"]["erf GELU reordered for ORT's Gelu fusion"] == 6
    after = ort_ops(model, tmp_path)
    assert "Erf" not in after and after.count("BiasGelu") == 6
    assert "SkipLayerNormalization" not in after and after.count("LayerNormalization") == 13


def test_the_dynamo_minilm_runs_in_torch_as_in_onnx_runtime(minilm_dynamo):
    from models import minilm
    from test_distill import assert_matches_ort  # its GatherND-built mask included

    feeds = {k: v[:4] for k, v in np.load(minilm.calibration_npz()).items()}
    assert_matches_ort(onnx.load(str(minilm_dynamo)), feeds)


def test_the_dynamo_digits_cnn_prunes_and_quantizes_keeping_its_accuracy():
    from models import digits, dynamo

    images, labels = digits.heldout()
    pipeline = "fold,fuse,prune:ratio=0.5,keep_if_slower=false,quant:keep_if_slower=false"
    model, report = onnxopt.optimize(str(dynamo.digits()), pipeline, calib=str(digits.calibration_npz()), runs=0)
    # both Convs and the hidden Linear lose half their units (the second Conv through the Reshape that
    # flattens it): about a quarter of the weights are left, int8 now, plus their scales
    assert report.optimized.parameters < 0.3 * report.original.parameters, report.optimized.parameters
    assert "QuantizeLinear" in {n.op_type for n in model.graph.node}
    top1 = float((ort_run(model, {"image": images})[0].argmax(1) == labels).mean())
    assert top1 >= 0.95, top1


def test_at_opset_21_with_onnx_gelu_quant_and_prune_keep_minilm_close():
    from models import dynamo, minilm

    path = dynamo.minilm(opset=21)
    assert "Gelu" in {n.op_type for n in onnx.load(str(path)).graph.node}  # ONNX's own op since opset 20
    calib = str(minilm.calibration_npz())
    _, report = onnxopt.optimize(str(path), "fold,fuse,quant", calib=calib, runs=0)
    assert report.passes[-1]["counts"]["weights quantized"] == 36 and report.agreement.cosine >= 0.98
    _, report = onnxopt.optimize(str(path), "prune:ratio=0.5,keep_if_slower=false", calib=calib, runs=0)
    assert report.passes[0]["counts"]["groups pruned"] == 6 and report.agreement.cosine >= 0.93


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_heads_prune_through_transformers_default_attention(exporter):
    """transformers' default attention (sdpa) exports through torch's scaled_dot_product_attention:
    TorchScript guards the softmax with IsNaN, dynamo transposes the keys through [batch * heads, seq,
    dim]. Each blocked every head group. Each layer's heads must be one group, as in the eager
    export; the keys' transpose, rewritten as one Transpose, must compute what it did; heads pruned at
    0.5 stay as close as on the eager export."""
    from models import dynamo, minilm
    from onnxopt.passes.prune import Prune
    from onnxopt.passes.prune.canonical import merged_axis_transposes

    path = minilm.build(attention="sdpa") if exporter == "torchscript" else dynamo.minilm(attention="sdpa")
    original = onnx.load(str(path))
    feeds = minilm.encode(["A sentence of another length than the calibration's.", "Short."], seq_len=24)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(original)
    shapes = Prune()._shapes(rewritten, onnxopt.PassContext(sample_inputs=[feeds]), None)
    assert merged_axis_transposes(rewritten, shapes) == (6 if exporter == "dynamo" else 0)
    np.testing.assert_allclose(ort_run(rewritten, feeds)[0], ort_run(original, feeds)[0], atol=1e-5)
    spec = "prune:structure=heads,ratio=0.5,keep_if_slower=false"
    model, report = onnxopt.optimize(str(path), spec, calib=str(minilm.calibration_npz()), runs=0)
    assert report.passes[0]["counts"]["groups pruned"] == 6 and report.agreement.cosine >= MINILM_PIPELINES[spec]
    onnx.checker.check_model(model, full_check=True)
    assert ort_run(model, feeds)[0].shape == (2, 24, 384)
