"""Small transformers architectures as their initializers leave them, exported by TorchScript at
opset 17: the graph shapes of model families the other builders do not cover. Nothing is trained, so
they test what a pass does to a graph (groups found, exactness, validity), not accuracy.

- ``t5_encoder``: T5's encoder (RMS-style LayerNorm, no biases, a relative position bias looked up
  per head in a [buckets, heads] table and shared by every layer); inputs ``input_ids`` and
  ``attention_mask`` [batch, seq].
- ``whisper_encoder``: Whisper's audio encoder (two Conv1d with GELU, sinusoidal positions,
  pre-LayerNorm blocks); input ``input_features`` [batch, 16 mel bins, 64 frames].
- ``gpt2``: GPT-2 (Q, K and V from one fused projection and a Split, GELU written out, Conv1D
  layers exported as Gemm between Reshapes); inputs ``input_ids`` and ``attention_mask``; logits out.
- ``phi3``: Phi-3 (grouped-query attention, 4 query heads over 2 key/value heads, from one fused
  Q/K/V projection cut by Slices, and a fused gate/up projection cut by Slices); inputs as GPT-2's.
- ``convnext``: ConvNeXt (patchify Conv, depthwise 7x7 Convs, LayerNorm and the MLP in channels-last
  order between two Transposes, layer scale); input ``pixel_values`` [batch, 3, 32, 32].

``build(name)`` writes ``build/zoo_<name>.onnx`` once and checks it against torch;
``feeds(name, n, seed)`` gives inputs for it.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models._common import BUILD_DIR, atomic_path, is_fresh

NAMES = ("t5_encoder", "whisper_encoder", "gpt2", "phi3", "convnext")
_SOURCES = (__file__, Path(__file__).with_name("_common.py"))


def _module(name: str):
    import torch
    import transformers as hf

    torch.manual_seed(0)
    if name == "t5_encoder":
        model = hf.T5EncoderModel(hf.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                              num_heads=4))
    elif name == "whisper_encoder":
        config = hf.WhisperConfig(vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  decoder_start_token_id=1, d_model=64, encoder_layers=2, decoder_layers=1,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                  decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=32)
        model = hf.WhisperModel(config).get_encoder()
    elif name == "gpt2":
        model = hf.GPT2LMHeadModel(hf.GPT2Config(vocab_size=100, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                                 bos_token_id=0, eos_token_id=0, attn_implementation="eager"))
    elif name == "phi3":
        model = hf.Phi3ForCausalLM(hf.Phi3Config(
            vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False, attn_implementation="eager"))
    elif name == "convnext":
        model = hf.ConvNextForImageClassification(hf.ConvNextConfig(
            num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=10, image_size=32))
    else:
        raise ValueError(f"unknown model {name}; one of {', '.join(NAMES)}")

    class FirstOutput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model.eval()

        def forward(self, *args):
            if name in ("gpt2", "phi3"):  # their second positional argument is the cache
                out = self.model(input_ids=args[0], attention_mask=args[1], use_cache=False)
            else:
                out = self.model(*args)
            return out.logits if name in ("convnext", "gpt2", "phi3") else out.last_hidden_state

    return FirstOutput().eval()


def feeds(name: str, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if name in ("t5_encoder", "gpt2", "phi3"):
        mask = np.ones((n, 12), np.int64)
        mask[:, 9:] = 0
        return {"input_ids": rng.integers(0, 100, (n, 12)), "attention_mask": mask}
    if name == "whisper_encoder":
        return {"input_features": rng.standard_normal((n, 16, 64)).astype(np.float32)}
    return {"pixel_values": rng.standard_normal((n, 3, 32, 32)).astype(np.float32)}


def build(name: str, force: bool = False) -> Path:
    import onnxruntime as ort
    import torch

    dest = BUILD_DIR / f"zoo_{name}.onnx"
    if not force and is_fresh([dest], _SOURCES):
        return dest
    module = _module(name)
    example = feeds(name, 2)
    names = list(example)
    axes = {k: {0: "batch", 1: "seq"} if name in ("t5_encoder", "gpt2", "phi3") else {0: "batch"} for k in names}
    with atomic_path(dest) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(torch.from_numpy(v) for v in example.values()), tmp, dynamo=False,
                          opset_version=17, input_names=names, output_names=["output"], dynamic_axes=axes)
        check = feeds(name, 3, seed=1)
        got = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"]).run(None, check)[0]
        with torch.no_grad():
            want = module(*(torch.from_numpy(v) for v in check.values())).numpy()
        if not np.allclose(got, want, atol=1e-4, rtol=1e-4):
            raise RuntimeError(f"{dest.name}: the export differs from torch by {np.abs(got - want).max():.3g}")
    return dest


if __name__ == "__main__":
    for model_name in NAMES:
        print(build(model_name, force="--force" in sys.argv))
