"""A small decoder-only language model of the Llama family, trained here, exported as decoders are
deployed: the shape of the models most ONNX files on model hubs hold today, in miniature.

The network is transformers' ``LlamaForCausalLM`` at a tiny size: 2 layers, width 128, 4 query heads
sharing 2 key/value heads (grouped-query attention), rotary positions, RMSNorm, a SwiGLU FFN of 384
and a causal mask combined with the padding mask. Its graph holds what MiniLM's does not: the rotary
embedding's Slice/Neg/Concat of each head's dims and its Cos/Sin, the key/value heads repeated by
Unsqueeze/Expand/Reshape, the RMSNorm written as Pow/ReduceMean/Sqrt/Div, the mask built with Range,
LessOrEqual and Where. It reads bytes (ASCII, vocabulary 128) and is trained for about 20 seconds
on the stdlib text of ``models/corpus.py`` (training sentences, disjoint from the calibration and
evaluation ones), so that its weights and activations have the structure of a trained model; the
trained weights are cached in ``build/decoder_lm.pt``.

``build()`` writes ``build/decoder_lm.onnx`` (TorchScript exporter, opset 17) and
``build(dynamo=True)`` ``build/decoder_lm_dynamo.onnx`` (dynamo exporter, opset 18): inputs
``input_ids`` and ``attention_mask`` [batch, seq] int64, output ``logits`` [batch, seq, 128]; each
checked against torch under ONNX Runtime. ``build_with_past()`` writes ``build/decoder_lm_past.onnx``,
the form generation runs (Optimum's ``decoder_with_past``): also ``past_key_values.{i}.key/value``
[batch, 2, past, 32] in, ``present.{i}.key/value`` [batch, 2, past + seq, 32] out;
``decode_step_feeds`` gives it real past keys and values, one new byte each.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models._common import BUILD_DIR, atomic_path, is_fresh, save_npz

ONNX_PATH = BUILD_DIR / "decoder_lm.onnx"
DYNAMO_PATH = BUILD_DIR / "decoder_lm_dynamo.onnx"
WEIGHTS_PATH = BUILD_DIR / "decoder_lm.pt"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
VOCAB, SEQ_LEN = 128, 64
SEED, STEPS, BATCH, LR = 0, 400, 32, 3e-3
EVAL_OFFSET = 1000  # evaluation sentences start here, as MiniLM's do
_SOURCES = (__file__, Path(__file__).with_name("_common.py"))


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=False, attn_implementation="eager", use_cache=False)


def _as_bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("ascii", "replace"), np.uint8).astype(np.int64)


def _train():
    """The network trained on next-byte prediction (seeded; the weights are cached)."""
    import torch
    from transformers import LlamaForCausalLM

    from models import corpus

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(_config())
    if is_fresh([WEIGHTS_PATH], _SOURCES):
        model.load_state_dict(torch.load(WEIGHTS_PATH))
        return model.eval()
    data = _as_bytes("\n".join(corpus.training_sentences(8000)))
    rng = np.random.default_rng(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    for _ in range(STEPS):
        starts = rng.integers(0, len(data) - SEQ_LEN - 1, BATCH)
        x = torch.from_numpy(np.stack([data[s:s + SEQ_LEN] for s in starts]))
        y = torch.from_numpy(np.stack([data[s + 1:s + SEQ_LEN + 1] for s in starts]))
        loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits.reshape(-1, VOCAB), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with atomic_path(WEIGHTS_PATH) as tmp:
        torch.save(model.state_dict(), tmp)
    return model.eval()


def _logits_module(model):
    import torch

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return Logits().eval()


def encode(texts, seq_len: int = SEQ_LEN) -> dict[str, np.ndarray]:
    """Each text's first `seq_len` bytes, padded at the end: {input_ids, attention_mask}."""
    ids = np.zeros((len(texts), seq_len), np.int64)
    mask = np.zeros((len(texts), seq_len), np.int64)
    for i, text in enumerate(texts):
        codes = _as_bytes(text)[:seq_len]
        ids[i, :len(codes)], mask[i, :len(codes)] = codes, 1
    return {"input_ids": ids, "attention_mask": mask}


def build(force: bool = False, dynamo: bool = False) -> Path:
    """The trained model exported to ONNX (TorchScript at opset 17, or dynamo at opset 18)."""
    import torch

    dest = DYNAMO_PATH if dynamo else ONNX_PATH
    if not force and is_fresh([dest], _SOURCES) and WEIGHTS_PATH.exists():
        return dest
    module = _logits_module(_train())
    feeds = encode(["def build(force):", "x"], seq_len=16)
    args = tuple(torch.from_numpy(feeds[name]) for name in INPUT_NAMES)
    with atomic_path(dest) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
            torch.onnx.export(module, args, tmp, dynamo=True, opset_version=18, input_names=list(INPUT_NAMES),
                              output_names=[OUTPUT_NAME], external_data=False,
                              dynamic_shapes={name: {0: batch, 1: seq} for name in INPUT_NAMES})
        else:
            axes = {name: {0: "batch", 1: "seq"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
            torch.onnx.export(module, args, tmp, dynamo=False, opset_version=17, input_names=list(INPUT_NAMES),
                              output_names=[OUTPUT_NAME], dynamic_axes=axes)
        _verify(tmp, module)
    return dest


PAST_PATH = BUILD_DIR / "decoder_lm_past.onnx"
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 32
PAST_NAMES = [f"past_key_values.{i}.{kind}" for i in range(LAYERS) for kind in ("key", "value")]
PRESENT_NAMES = [f"present.{i}.{kind}" for i in range(LAYERS) for kind in ("key", "value")]


def _with_past_module(model):
    import torch
    from transformers import DynamicCache

    class WithPast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, *past):
            cache = DynamicCache()
            for layer in range(LAYERS):
                cache.update(past[2 * layer], past[2 * layer + 1], layer)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
            present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    return WithPast().eval()


def build_with_past(force: bool = False) -> Path:
    """The model with its key/value cache as inputs and outputs (TorchScript, opset 17)."""
    import torch

    if not force and is_fresh([PAST_PATH], _SOURCES) and WEIGHTS_PATH.exists():
        return PAST_PATH
    module = _with_past_module(_train())
    ids, mask = torch.zeros((2, 1), dtype=torch.int64), torch.ones((2, 6), dtype=torch.int64)
    past = [torch.zeros((2, KV_HEADS, 5, HEAD_DIM)) for _ in PAST_NAMES]
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
            OUTPUT_NAME: {0: "batch", 1: "seq"}}
    axes |= {n: {0: "batch", 2: "past"} for n in PAST_NAMES} | {n: {0: "batch", 2: "total"} for n in PRESENT_NAMES}
    with atomic_path(PAST_PATH) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (ids, mask, *past), tmp, dynamo=False, opset_version=17,
                          input_names=[*INPUT_NAMES, *PAST_NAMES], output_names=[OUTPUT_NAME, *PRESENT_NAMES],
                          dynamic_axes=axes)
        feeds = decode_step_feeds(4, path=tmp)
        import onnxruntime as ort

        got = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"]).run(None, feeds)
        with torch.no_grad():
            want = module(*(torch.from_numpy(feeds[n]) for n in (*INPUT_NAMES, *PAST_NAMES)))
        if any(not np.allclose(g, w.numpy(), atol=1e-4, rtol=1e-4) for g, w in zip(got, want)):
            raise RuntimeError(f"{PAST_PATH.name}: the export differs from torch")
    return PAST_PATH


def decode_step_feeds(n: int, offset: int = 0, prefix: int = 24, path: Path | None = None) -> dict[str, np.ndarray]:
    """Feeds of one decoding step for `n` corpus sentences (from `offset`): each sentence's first
    `prefix` bytes run through the model with an empty cache give the past keys and values, and the
    next byte is the new input."""
    import onnxruntime as ort

    from models import corpus

    session = ort.InferenceSession(str(path or build_with_past()), providers=["CPUExecutionProvider"])
    ids = encode(corpus.sentences(n, offset=offset), seq_len=prefix + 1)["input_ids"]
    empty = np.zeros((n, KV_HEADS, 0, HEAD_DIM), np.float32)
    prompt = {"input_ids": ids[:, :prefix], "attention_mask": np.ones((n, prefix), np.int64)}
    present = session.run(PRESENT_NAMES, prompt | {name: empty for name in PAST_NAMES})
    return {"input_ids": ids[:, prefix:], "attention_mask": np.ones((n, prefix + 1), np.int64),
            **dict(zip(PAST_NAMES, present))}


def decode_step_npz(n: int = 256) -> Path:
    """`n` decoding steps (`decode_step_feeds` over the first corpus sentences) as an .npz of feeds."""
    if n > EVAL_OFFSET:
        raise ValueError(f"decode_step_npz({n}) would overlap the evaluation sentences (from {EVAL_OFFSET})")
    dest = BUILD_DIR / f"decoder_steps_{n}.npz"
    if not is_fresh([dest], _SOURCES):
        save_npz(dest, **decode_step_feeds(n))
    return dest


def _verify(path: Path, module) -> None:
    """The export agrees with torch on padded sentences of another length than the export's."""
    import onnxruntime as ort
    import torch

    feeds = evaluation_feeds(4)
    feeds["attention_mask"][0, 20:] = 0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, feeds)[0]
    with torch.no_grad():
        want = module(*(torch.from_numpy(feeds[n]) for n in INPUT_NAMES)).numpy()
    if not np.allclose(got, want, atol=1e-4, rtol=1e-4):
        raise RuntimeError(f"{path.name}: the export differs from torch by {np.abs(got - want).max():.3g}")


def calibration_npz(n: int = 256) -> Path:
    """`n` corpus sentences (the first ones, disjoint from the evaluation sentences) as an .npz of feeds."""
    from models import corpus

    if n > EVAL_OFFSET:
        raise ValueError(f"calibration_npz({n}) would overlap the evaluation sentences (from {EVAL_OFFSET})")
    dest = BUILD_DIR / f"decoder_calib_{n}x{SEQ_LEN}.npz"
    if not dest.exists():
        save_npz(dest, **encode(corpus.sentences(n)))
    return dest


def evaluation_feeds(n: int = 200) -> dict[str, np.ndarray]:
    from models import corpus

    return encode(corpus.sentences(n, offset=EVAL_OFFSET))


def next_byte_agreement(reference: np.ndarray, candidate: np.ndarray, mask: np.ndarray) -> float:
    """How often two models' logits [batch, seq, vocab] predict the same next byte, over real tokens."""
    same = reference.argmax(-1) == candidate.argmax(-1)
    return float(same[mask.astype(bool)].mean())


if __name__ == "__main__":
    for kind in (False, True):
        print(build(force="--force" in sys.argv, dynamo=kind))
    print(build_with_past(force="--force" in sys.argv))
