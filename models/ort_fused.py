"""MiniLM as ONNX Runtime's transformer optimizer writes it, the form many deployed BERT-like models
come in (``model_optimized.onnx``): com.microsoft EmbedLayerNormalization, Attention (Q, K and V
packed in one weight), SkipLayerNormalization and BiasGelu around 18 plain MatMuls.

``minilm()`` writes ``build/minilm_ort_fused.onnx`` once from ``minilm.build()``, checked against it
under ONNX Runtime.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import minilm as minilm_builder
from models._common import BUILD_DIR, atomic_path, is_fresh

PATH = BUILD_DIR / "minilm_ort_fused.onnx"
_SOURCES = (__file__, Path(__file__).with_name("_common.py"), minilm_builder.__file__)


def minilm(force: bool = False) -> Path:
    if not force and is_fresh([PATH], _SOURCES):
        return PATH
    import onnxruntime as ort
    from onnxruntime.transformers import optimizer

    source = minilm_builder.build()
    fused = optimizer.optimize_model(str(source), model_type="bert", num_heads=12, hidden_size=384, opt_level=1)
    ops = {n.op_type for n in fused.model.graph.node}
    if not {"Attention", "SkipLayerNormalization", "BiasGelu"} <= ops:
        raise RuntimeError(f"ORT's optimizer did not fuse MiniLM as expected: {sorted(ops)}")
    with atomic_path(PATH) as tmp:
        fused.save_model_to_file(str(tmp))
        feeds = minilm_builder.encode(["A sentence to check the fused model against the export."], seq_len=32)
        got, want = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
                     for p in (tmp, source))
        if not np.allclose(got, want, atol=minilm_builder.ATOL):
            raise RuntimeError(f"the fused MiniLM differs from the export by {np.abs(got - want).max():.3g}")
    return PATH


if __name__ == "__main__":
    print(minilm(force="--force" in sys.argv))
