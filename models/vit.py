"""A small vision transformer (transformers' ``ViTForImageClassification``) as it comes from its
initializer, exported by TorchScript (opset 17) and by dynamo (opset 18).

Untrained on purpose: a freshly initialized transformer has every bias zero and every LayerNorm
scale one, so `fold` merges them into a few shared initializers, which is what a pass sees in any
model with such layers (and in checkpoints exported before training, as pipelines do for tests).
The graph holds what the text models do not: a patch-embedding Conv flattened and transposed into
tokens, a class token concatenated before them, position embeddings added, the class token's row
sliced out for the classifier. 32x32 RGB images, patches of 8 (16 tokens and the class token),
width 64, 4 heads, 2 layers, 10 classes.

``build()`` writes ``build/vit.onnx``, ``build(dynamo=True)`` ``build/vit_dynamo.onnx``: input
``pixel_values`` [batch, 3, 32, 32], output ``logits`` [batch, 10]; each checked against torch.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models._common import BUILD_DIR, atomic_path, is_fresh

ONNX_PATH = BUILD_DIR / "vit.onnx"
DYNAMO_PATH = BUILD_DIR / "vit_dynamo.onnx"
SEED, HEADS, HEAD_DIM = 0, 4, 16
_SOURCES = (__file__, Path(__file__).with_name("_common.py"))


def torch_model():
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(SEED)
    config = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=HEADS * HEAD_DIM,
                       num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=128, num_labels=10,
                       attn_implementation="eager")
    return ViTForImageClassification(config).eval()


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def build(force: bool = False, dynamo: bool = False) -> Path:
    import onnxruntime as ort
    import torch

    dest = DYNAMO_PATH if dynamo else ONNX_PATH
    if not force and is_fresh([dest], _SOURCES):
        return dest
    module = torch_model()
    example = (torch.from_numpy(images(2)),)
    with atomic_path(dest) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(module, example, tmp, dynamo=True, opset_version=18, input_names=["pixel_values"],
                              output_names=["logits"], external_data=False,
                              dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}})
        else:
            torch.onnx.export(module, example, tmp, dynamo=False, opset_version=17, input_names=["pixel_values"],
                              output_names=["logits"], dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
        feeds = images(5, seed=1)
        got = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": feeds})[0]
        with torch.no_grad():
            want = module(torch.from_numpy(feeds)).logits.numpy()
        if not np.allclose(got, want, atol=1e-4, rtol=1e-4):
            raise RuntimeError(f"{dest.name}: the export differs from torch by {np.abs(got - want).max():.3g}")
    return dest


if __name__ == "__main__":
    for kind in (False, True):
        print(build(force="--force" in sys.argv, dynamo=kind))
