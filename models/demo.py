"""Build ``models/demo.onnx`` and ``models/demo_inputs.npz``: the small, committed model of the README demo.

It is the trained digits CNN (same weights as ``digits.build``) exported with constant folding off
and the flatten written as ``x.reshape(x.shape[0], -1)``, so the graph keeps BatchNormalization
nodes to fold into the convolutions and a Shape/Gather/Unsqueeze/Concat subgraph feeding Reshape
for the ``fold`` pass to work on. ``demo_inputs.npz`` holds 16 held-out images under key ``image``.
Both files are small enough to commit, so the demo runs without building anything.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import digits
from models._common import MODELS_DIR, is_fresh, save_npz

DEMO_PATH = MODELS_DIR / "demo.onnx"
INPUTS_PATH = MODELS_DIR / "demo_inputs.npz"
N_INPUTS = 16
MAX_BYTES = 200_000
_SOURCES = (__file__, digits.__file__, Path(__file__).with_name("_common.py"))


def build(force: bool = False) -> Path:
    """Write ``demo.onnx`` and ``demo_inputs.npz`` (if stale or `force`); returns the model path."""
    if not force and is_fresh([DEMO_PATH, INPUTS_PATH], _SOURCES):
        return DEMO_PATH
    import onnx

    model = digits.trained_module(flatten_via_reshape=True)
    digits.export(model, DEMO_PATH)
    ops = {n.op_type for n in onnx.load(str(DEMO_PATH)).graph.node}
    missing = {"BatchNormalization", "Shape", "Gather", "Reshape"} - ops
    if missing:
        raise RuntimeError(f"demo graph lacks {sorted(missing)}; ops: {sorted(ops)}")
    if DEMO_PATH.stat().st_size > MAX_BYTES:
        raise RuntimeError(f"{DEMO_PATH} is {DEMO_PATH.stat().st_size} bytes, over {MAX_BYTES}")
    images, _ = digits.heldout()
    save_npz(INPUTS_PATH, image=images[:N_INPUTS])
    return DEMO_PATH


def inputs() -> dict[str, np.ndarray]:
    """The demo feeds: ``{"image": float32 [16,1,8,8]}``."""
    build()
    with np.load(INPUTS_PATH) as data:
        return {"image": data["image"]}


if __name__ == "__main__":
    import collections

    import onnx

    start = time.perf_counter()
    path = build(force="--force" in sys.argv)
    graph = onnx.load(str(path)).graph
    counts = collections.Counter(n.op_type for n in graph.node)
    feeds = inputs()
    _, labels = digits.heldout()
    acc = digits.onnx_accuracy(path, feeds["image"], labels[:N_INPUTS])
    print(f"built {path} ({path.stat().st_size} bytes) in {time.perf_counter() - start:.1f}s")
    print(f"{len(graph.node)} nodes: {dict(sorted(counts.items()))}")
    print(f"inputs: {INPUTS_PATH} ({INPUTS_PATH.stat().st_size} bytes), accuracy on them {acc:.3f}")
