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
    from models import minilm

    model, report = onnxopt.optimize(str(fused_minilm), "fold,fuse,quant", calib=str(minilm.calibration_npz()),
                                     runs=0)
    counts = report.passes[-1]["counts"]
    assert counts["weights quantized"] == 18 and counts["biases corrected"] == 18  # inside SkipLN and BiasGelu
    assert report.agreement.cosine >= 0.98, report.agreement  # 0.952 without the corrections
    assert {"Attention", "SkipLayerNormalization", "BiasGelu"} <= {n.op_type for n in model.graph.node}


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
