"""MiniLM as ONNX Runtime's transformer optimizer writes it (models/ort_fused.py: com.microsoft
Attention, SkipLayerNormalization, BiasGelu around 18 plain MatMuls), the form many deployed BERT-like
models come in. onnx's shape inference does not know those ops: the passes must still see the
MatMuls after them as float, and say what they leave alone."""
from __future__ import annotations

import onnx
import pytest

import onnxopt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fused_minilm():
    from models import ort_fused

    return ort_fused.minilm()


def test_quant_quantizes_the_plain_matmuls_and_corrects_the_biases_inside_fused_ops(fused_minilm):
    """With the fused ops kept (as `fuse` does for GPU EPs, whose fused kernels are fast)."""
    from models import minilm

    model, report = onnxopt.optimize(str(fused_minilm), "fold,fuse:ort_attention=keep,skip_layernorm=keep,quant",
                                     calib=str(minilm.calibration_npz()), runs=0)
    counts = report.passes[-1]["counts"]
    assert counts["weights quantized"] == 18 and counts["biases corrected"] == 18  # inside SkipLN and BiasGelu
    assert report.agreement.cosine >= 0.98, report.agreement  # 0.952 without the corrections
    assert {"Attention", "SkipLayerNormalization", "BiasGelu"} <= {n.op_type for n in model.graph.node}


def test_for_the_cpu_ep_fuse_writes_attention_and_skip_layernorm_as_onnx_ops(fused_minilm, tmp_path):
    """ORT's CPU kernels for both are slower than the ONNX ops (fuse_attention.py, fuse_layernorm.py);
    written out, quant quantizes Q, K and V too and prune finds the heads."""
    from models import minilm
    from test_fuse_ort_ops import ort_ops

    calib = str(minilm.calibration_npz())
    model, report = onnxopt.optimize(str(fused_minilm), "fold,fuse", calib=calib, runs=0)
    assert report.passes[1]["counts"] == {"com.microsoft Attention -> ONNX ops": 6,
                                          "com.microsoft SkipLayerNormalization -> Add, Sum, LayerNormalization": 12}
    assert report.agreement.max_abs_error < 1e-3, report.agreement
    ran = ort_ops(model, tmp_path)
    assert "Attention" not in ran and "SkipLayerNormalization" not in ran and ran.count("Max") == 6  # the floor
    model, report = onnxopt.optimize(str(fused_minilm), "fold,fuse,quant", calib=calib, runs=0)
    assert report.passes[-1]["counts"]["weights quantized"] == 36 and report.agreement.cosine >= 0.98
    model, report = onnxopt.optimize(str(fused_minilm), "fold,fuse,prune:structure=heads,ratio=0.5,keep_if_slower=false",
                                     calib=calib, runs=0)
    # heads go as on the TorchScript export (the same 24 of 72, cosine 0.981 there)
    assert report.passes[-1]["counts"]["units removed"] == 24 and report.agreement.cosine >= 0.95


def test_lowrank_factors_them_and_prune_shrinks_the_ffns_through_biasgelu(fused_minilm):
    from models import minilm

    calib = str(minilm.calibration_npz())
    model, report = onnxopt.optimize(str(fused_minilm), "lowrank:ratio=0.5,keep_if_slower=false", calib=calib,
                                     runs=0)
    onnx.checker.check_model(model)
    assert report.passes[0]["counts"]["matrices factored"] == 18 and report.agreement.cosine >= 0.85
    model, report = onnxopt.optimize(str(fused_minilm), "prune:ratio=0.5,keep_if_slower=false", calib=calib, runs=0)
    record = report.passes[0]
    assert record["counts"]["groups pruned"] == 6 and report.agreement.cosine >= 0.93  # the 6 FFNs, 1536 -> 768
    biases = [t for t in model.graph.initializer if t.name.endswith("intermediate.dense.bias")]
    assert biases and all(tuple(t.dims) == (768,) for t in biases)  # BiasGelu's bias shrank with its FFN
    assert any("SkipLayerNormalization (domain com.microsoft) has no pruning rule" in s for s in record["skipped"])


def test_the_fused_minilm_runs_in_torch_as_in_onnx_runtime_so_distill_can_train_it(fused_minilm):
    pytest.importorskip("torch")
    import numpy as np
    from models import minilm
    from test_distill import assert_matches_ort

    feeds = {k: v[:4] for k, v in np.load(minilm.calibration_npz()).items()}
    assert_matches_ort(onnx.load(str(fused_minilm)), feeds)  # Attention, SkipLN, EmbedLN, BiasGelu in torch
    written_out, _ = onnxopt.optimize(str(fused_minilm), "fold,fuse", compare=False)
    assert_matches_ort(written_out, feeds)  # what distill meets after fold,fuse
