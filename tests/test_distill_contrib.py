"""distill's torch interpreter runs ONNX Runtime's own ops (com.microsoft: EmbedLayerNormalization,
SkipLayerNormalization, Attention, BiasGelu, FastGelu, Gelu) as ORT does, so that a model its
transformer optimizer fused trains like any other (tests/test_ort_fused.py runs the fused MiniLM)."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("torch")
from test_distill import assert_matches_ort  # noqa: E402
from test_fuse_ort_ops import (BATCH, HIDDEN, SEQ, attention_feeds, attention_model, model_of,  # noqa: E402
                               skip_layernorm, tensor)

rng = np.random.default_rng(1)


@pytest.mark.parametrize("mask", ["none", "raw", "lengths"])
def test_attention_and_embed_layernorm_run_in_torch_as_in_ort(mask):
    model = attention_model(mask)
    feeds = {k: v for k, v in attention_feeds().items() if k in {i.name for i in model.graph.input}}
    assert_matches_ort(model, feeds, rtol=1e-5)


@pytest.mark.parametrize("bias, beta, sum_output", [(True, True, False), (False, True, False), (True, False, True)])
def test_skip_layernorm_runs_in_torch_as_in_ort(bias, beta, sum_output):
    feeds = {"x": rng.standard_normal((BATCH, SEQ, HIDDEN)).astype(np.float32),
             "skip": rng.standard_normal((BATCH, SEQ, HIDDEN)).astype(np.float32)}
    assert_matches_ort(skip_layernorm(bias, beta, sum_output), feeds)


@pytest.mark.parametrize("op, with_bias", [("BiasGelu", True), ("FastGelu", True), ("FastGelu", False),
                                           ("Gelu", False)])
def test_ort_gelus_run_in_torch_as_in_ort(op, with_bias):
    node = helper.make_node(op, ["x", "b"] if with_bias else ["x"], ["y"], domain="com.microsoft")
    bias = [numpy_helper.from_array(rng.standard_normal(HIDDEN).astype(np.float32), "b")]
    model = model_of([node], [tensor("x", [BATCH, SEQ, HIDDEN])], [tensor("y", [BATCH, SEQ, HIDDEN])],
                     bias if with_bias else [])
    assert_matches_ort(model, {"x": (rng.standard_normal((BATCH, SEQ, HIDDEN)) * 3).astype(np.float32)})


def test_an_embed_layernorm_without_segments_runs_too():
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("words", (20, HIDDEN)), ("positions", (16, HIDDEN)), ("gamma", (HIDDEN,)),
                                 ("beta", (HIDDEN,)))]
    node = helper.make_node("EmbedLayerNormalization", ["ids", "", "words", "positions", "", "gamma", "beta", "mask"],
                            ["y", "lengths"], domain="com.microsoft", epsilon=1e-12)
    model = model_of([node], [tensor("ids", ["b", "s"], TensorProto.INT32), tensor("mask", ["b", "s"], TensorProto.INT32)],
                     [tensor("y", ["b", "s", HIDDEN]), tensor("lengths", ["b"], TensorProto.INT32)], inits)
    feeds = {"ids": rng.integers(0, 20, (BATCH, SEQ)).astype(np.int32),
             "mask": (np.arange(SEQ)[None, :] < np.array([[SEQ], [2]])).astype(np.int32)}
    assert_matches_ort(model, feeds)
