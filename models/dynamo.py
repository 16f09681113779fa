"""MiniLM and the digits CNN exported by torch's dynamo exporter, the default of ``torch.onnx.export``
since torch 2.9 (it needs onnxscript, in the ``models`` extra). Its graphs differ from TorchScript's in
ways that reach the passes: opset 18, a shape recorded for every tensor (weights too), the GELU
written x * (0.5 * (1 + erf)), the attention mask built with GatherND, names like ``val_121``.

``minilm()`` and ``digits()`` write ``build/minilm_dynamo.onnx`` and ``build/digits_dynamo.onnx``
(single files) once, each checked against the model's TorchScript export under ONNX Runtime;
``minilm(opset=21)`` writes ``build/minilm_dynamo21.onnx``, where GELU is ONNX's own Gelu op (opset 20).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import digits as digits_builder
from models import minilm as minilm_builder
from models._common import BUILD_DIR, atomic_path, is_fresh

OPSET = 18
MINILM_PATH = BUILD_DIR / "minilm_dynamo.onnx"
DIGITS_PATH = BUILD_DIR / "digits_dynamo.onnx"
_SOURCES = (__file__, Path(__file__).with_name("_common.py"))


def _export(module, args: tuple, dest: Path, input_names: list[str], output_name: str, dims: tuple,
            opset: int = OPSET) -> None:
    """`dims`: each argument's dynamic axes, {axis: torch.export.Dim}, in the order of `args`."""
    import onnx
    import torch

    with atomic_path(dest) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=input_names,
                                    output_names=[output_name], dynamic_shapes=dims, external_data=False,
                                    verbose=False)
        program.save(str(tmp), external_data=False)
        onnx.checker.check_model(str(tmp), full_check=True)


def _check_against(path: Path, reference: Path, feeds: dict[str, np.ndarray], atol: float) -> None:
    import onnxruntime as ort

    got, want = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
                 for p in (path, reference))
    if not np.allclose(got, want, atol=atol):
        raise RuntimeError(f"{path.name} differs from {reference.name} by {np.abs(got - want).max():.3g}")


def minilm(force: bool = False, opset: int = OPSET, attention: str = "eager") -> Path:
    """all-MiniLM-L6-v2's encoder, inputs and output named as in ``minilm.build()``; `attention="sdpa"`
    (transformers' default) writes ``build/minilm_dynamo_sdpa.onnx``."""
    path = MINILM_PATH if opset == OPSET else MINILM_PATH.with_name(f"minilm_dynamo{opset}.onnx")
    path = path if attention == "eager" else path.with_name(path.stem + f"_{attention}.onnx")
    if not force and is_fresh([path], (*_SOURCES, minilm_builder.__file__)):
        return path
    import torch

    encoder = minilm_builder._encoder_module(minilm_builder.torch_model(attention))
    feeds = minilm_builder.encode(["Export sample sentence.", "Another, slightly longer, example input."], seq_len=16)
    names = list(minilm_builder.INPUT_NAMES)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    _export(encoder, tuple(torch.from_numpy(feeds[n]) for n in names), path, names,
            minilm_builder.OUTPUT_NAME, tuple({0: batch, 1: sequence} for _ in names), opset)
    other = minilm_builder.encode(["A third sentence, to check the export on other shapes than it saw."], seq_len=32)
    _check_against(path, minilm_builder.build(), other, minilm_builder.ATOL)
    return path


def digits(force: bool = False) -> Path:
    """The trained digits CNN (BatchNorm kept), input ``image``, output ``logits``."""
    if not force and is_fresh([DIGITS_PATH], (*_SOURCES, digits_builder.__file__)):
        return DIGITS_PATH
    import torch

    _export(digits_builder.trained_module(), (torch.zeros(2, 1, 8, 8),), DIGITS_PATH, ["image"], "logits",
            ({0: torch.export.Dim("batch")},))
    _check_against(DIGITS_PATH, digits_builder.build(), {"image": digits_builder.heldout()[0][:16]}, 1e-4)
    return DIGITS_PATH


if __name__ == "__main__":
    print(minilm(force="--force" in sys.argv), digits(force="--force" in sys.argv))
