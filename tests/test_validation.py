"""Timing two models against each other: the speed guard's measurements."""
from __future__ import annotations

import numpy as np
from conftest import parse

from onnxopt.guard import speed_check


def chain(matmuls: int):
    """x @ W repeated: a model whose cost grows with `matmuls`."""
    weight = ", ".join(["0.01"] * 128 * 128)
    body = "\n".join(f"h{i + 1} = MatMul(h{i}, w)" for i in range(matmuls))
    return parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 128] h0) => (float[N, 128] h{matmuls}) <float[128, 128] w = {{{weight}}}> {{ {body} }}
    """)


def test_a_clear_win_is_decided_quickly_and_skips_larger_batches():
    feeds = {"h0": np.ones((8, 128), np.float32)}
    checks = speed_check(chain(40), chain(1), feeds, min_seconds=0.05, clear_win=1.15, decisive=1.3)
    assert [(c.threads, c.batch) for c in checks] == [(1, 1), (2, 1)]
    assert all(c.speedup > 1.3 for c in checks)


def test_a_loss_is_timed_at_every_batch_and_thread_count():
    feeds = {"h0": np.ones((8, 128), np.float32)}
    checks = speed_check(chain(1), chain(40), feeds, min_seconds=0.05, clear_win=1.15, decisive=1.3)
    assert [(c.threads, c.batch) for c in checks] == [(1, 1), (1, 8), (2, 1), (2, 8)]
    assert all(c.speedup < 1 for c in checks)
