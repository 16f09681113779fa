"""A small CNN trained in seconds on scikit-learn's 8x8 digits, exported to ONNX with BatchNorm kept.

The model gives the optimizer real weights with something to fold and fuse (Conv+BatchNorm+ReLU,
MaxPool, Gemm+ReLU) and a held-out set to measure accuracy after compression. The digits dataset
ships with scikit-learn, so nothing is downloaded. Training is seeded and deterministic; the trained
weights are cached in ``build/digits_cnn.pt`` so ``demo.py`` reuses exactly the same network.

Outputs (in ``models/build/``): ``digits_cnn.onnx`` (input ``image`` [batch,1,8,8] float32, output
``logits`` [batch,10]), ``digits_heldout.npz`` (``image``, ``label``), ``digits_cnn.json`` (accuracies
and sample counts) and, via :func:`calibration_npz`, ``digits_calib.npz`` (200 training images).
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models._common import BUILD_DIR, atomic_path, is_fresh, save_json, save_npz

ONNX_PATH = BUILD_DIR / "digits_cnn.onnx"
WEIGHTS_PATH = BUILD_DIR / "digits_cnn.pt"
HELDOUT_PATH = BUILD_DIR / "digits_heldout.npz"
INFO_PATH = BUILD_DIR / "digits_cnn.json"
CALIB_PATH = BUILD_DIR / "digits_calib.npz"
_SOURCES = (__file__, Path(__file__).with_name("_common.py"))
SEED, EPOCHS, BATCH, LR, N_CALIB = 0, 30, 64, 2e-3, 200


def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified 70/30 split of the digits as float32 images in [0,1] shaped [N,1,8,8], int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=0.3, stratify=labels, random_state=0
    )
    return x_tr, y_tr, x_te, y_te


def _net(flatten_via_reshape: bool = False):
    """The CNN: Conv-BN-ReLU x2, MaxPool, Flatten, Linear-ReLU, Dropout, Linear.

    With ``flatten_via_reshape`` the flatten is ``x.reshape(x.shape[0], -1)``, which the TorchScript
    exporter turns into a Shape/Gather/Unsqueeze/Concat/Reshape subgraph (used by ``demo.py``).
    """
    import torch
    from torch import nn

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.MaxPool2d(2),
            )
            self.flatten = nn.Flatten()
            self.classifier = nn.Sequential(
                nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 10),
            )
            self.flatten_via_reshape = flatten_via_reshape

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.features(x)
            x = x.reshape(x.shape[0], -1) if self.flatten_via_reshape else self.flatten(x)
            return self.classifier(x)

    return DigitsCNN()


def _train():
    """Train the CNN with Adam from a fixed seed; returns the module in eval mode."""
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    x_tr, y_tr, _, _ = _split()
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    x, y = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(EPOCHS):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), BATCH):
            idx = perm[i : i + BATCH]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def trained_module(flatten_via_reshape: bool = False, force: bool = False):
    """The trained CNN (eval mode), training it once and caching the weights in ``build/digits_cnn.pt``."""
    import torch

    if force or not is_fresh([WEIGHTS_PATH], _SOURCES):
        state = _train().state_dict()
        with atomic_path(WEIGHTS_PATH) as tmp:
            torch.save(state, tmp)
    model = _net(flatten_via_reshape)
    model.load_state_dict(torch.load(WEIGHTS_PATH, weights_only=True))
    return model.eval()


def export(model, dest: Path) -> Path:
    """Export `model` to ONNX opset 17 with BatchNorm kept (no constant folding, EVAL mode)."""
    import onnx
    import torch

    with atomic_path(dest) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (torch.zeros(2, 1, 8, 8),), str(tmp), dynamo=False, opset_version=17,
            input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=False, training=torch.onnx.TrainingMode.EVAL,
        )
        onnx.checker.check_model(str(tmp), full_check=True)
    return dest


def onnx_accuracy(path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of an ONNX digits model run with onnxruntime on CPU."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"image": images})[0]
    return float((logits.argmax(1) == labels).mean())


def build(force: bool = False) -> Path:
    """Train (or reuse) the CNN and write the ONNX model, held-out set and info JSON; returns the ONNX path."""
    import onnx
    import torch

    if not force and is_fresh([ONNX_PATH, HELDOUT_PATH, INFO_PATH], _SOURCES):
        return ONNX_PATH
    model = trained_module(force=force)
    x_tr, _, x_te, y_te = _split()
    with torch.no_grad():
        torch_acc = float((model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())
    export(model, ONNX_PATH)
    ops = {n.op_type for n in onnx.load(str(ONNX_PATH)).graph.node}
    if "BatchNormalization" not in ops:
        raise RuntimeError(f"exporter removed BatchNormalization; ops: {sorted(ops)}")
    save_npz(HELDOUT_PATH, image=x_te, label=y_te)
    info = {
        "heldout_accuracy": torch_acc,
        "train_samples": int(len(x_tr)),
        "heldout_samples": int(len(x_te)),
        "onnx_heldout_accuracy": onnx_accuracy(ONNX_PATH, x_te, y_te),
    }
    save_json(INFO_PATH, info)
    return ONNX_PATH


def calibration_npz(force: bool = False) -> Path:
    """Path of ``build/digits_calib.npz``: key ``image`` holds the first 200 training images."""
    if force or not is_fresh([CALIB_PATH], _SOURCES):
        save_npz(CALIB_PATH, image=_split()[0][:N_CALIB])
    return CALIB_PATH


TRAIN_PATH = BUILD_DIR / "digits_train.npz"


def training_npz(force: bool = False) -> Path:
    """Path of ``build/digits_train.npz``: key ``image`` holds the whole training split (unlabelled:
    training data for distillation, disjoint from the held-out set)."""
    if force or not is_fresh([TRAIN_PATH], _SOURCES):
        save_npz(TRAIN_PATH, image=_split()[0])
    return TRAIN_PATH


def heldout() -> tuple[np.ndarray, np.ndarray]:
    """Held-out (images float32 [N,1,8,8], labels int64 [N]), building them if needed."""
    build()
    with np.load(HELDOUT_PATH) as data:
        return data["image"], data["label"]


if __name__ == "__main__":
    import json

    import onnx

    start = time.perf_counter()
    path = build(force="--force" in sys.argv)
    calib = calibration_npz()
    ops = sorted({n.op_type for n in onnx.load(str(path)).graph.node})
    print(f"built {path} ({path.stat().st_size} bytes) in {time.perf_counter() - start:.1f}s")
    print(f"ops: {ops}")
    print(f"info: {json.loads(INFO_PATH.read_text())}")
    print(f"calibration: {calib}, held-out: {HELDOUT_PATH}")
