"""Bias correction: the mean shift weight rounding causes is taken out of the bias after a MatMul/Gemm."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import ort_run, parse

import onnxopt

rng = np.random.default_rng(7)
K, N = 64, 16


def _values(array: np.ndarray) -> str:
    return ", ".join(f"{v:.5f}" for v in array.ravel())


def linear(op: str) -> tuple:
    """x [B, K] -> MatMul + Add, or Gemm (transB), -> y [B, N]; and data whose channels have a large mean."""
    weight = rng.standard_normal((K, N)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    if op == "MatMul":
        body = "m = MatMul(x, w)\n y = Add(b, m)"
        stored = weight
    else:
        body = "y = Gemm<transB = 1>(x, w, b)"
        stored = weight.T
    model = parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[B, {K}] x) => (float[B, {N}] y)
    <float[{stored.shape[0]}, {stored.shape[1]}] w = {{{_values(stored)}}}, float[{N}] b = {{{_values(bias)}}}>
    {{ {body} }}
    """)
    x = (3.0 + rng.random((512, K)) + rng.standard_normal((512, K)) * 0.2).astype(np.float32)
    return model, x


def _quantized(model, x, correction: bool):
    calib = x if isinstance(x, dict) else {"x": x}
    spec = f"quant:keep_if_slower=false,smooth=0,per_channel=false,bias_correction={str(correction).lower()}"
    return onnxopt.optimize(model, spec, calib=calib, compare=False)


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_bias_correction_removes_the_mean_shift_of_rounded_weights(op, tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    model, x = linear(op)
    reference = ort_run(model, {"x": x})[0]
    plain, _ = _quantized(model, x, correction=False)
    corrected, report = _quantized(model, x, correction=True)
    assert report.passes[0]["counts"]["biases corrected"] == 1
    shift_plain = np.abs((ort_run(plain, {"x": x})[0] - reference).mean(0))
    shift_corrected = np.abs((ort_run(corrected, {"x": x})[0] - reference).mean(0))
    # per-tensor weights over a mean-3.5 input: each output channel is off by a fixed amount without it
    assert shift_plain.mean() > 0.01 and shift_corrected.mean() < 0.25 * shift_plain.mean()
    error = lambda m: float(np.sqrt(np.mean((ort_run(m, {"x": x})[0] - reference) ** 2)))  # noqa: E731
    assert error(corrected) < error(plain)


def test_a_matmul_read_elsewhere_or_a_conv_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    weight = _values(rng.standard_normal((8, 4)))
    kernel = _values(rng.standard_normal((4, 2, 3, 3)))
    model = parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[B, 8] x, float[B, 2, 6, 6] image) => (float[B, 4] y, float[B, 4] raw, float[B, 4, 4, 4] c)
    <float[8, 4] w = {{{weight}}}, float[4] b = {{0.1, 0.2, 0.3, 0.4}},
     float[4, 2, 3, 3] k = {{{kernel}}}, float[4] kb = {{0.5, 0.5, 0.5, 0.5}}>
    {{ raw = MatMul(x, w)
       y = Add(raw, b)
       c = Conv(image, k, kb) }}
    """)
    data = {"x": (2 + rng.random((64, 8))).astype(np.float32), "image": rng.random((64, 2, 6, 6)).astype(np.float32)}
    _, report = onnxopt.optimize(model, "quant:keep_if_slower=false", calib=data, compare=False)
    counts = report.passes[0]["counts"]
    assert counts["weights quantized"] == 2 and "biases corrected" not in counts


@pytest.mark.parametrize("fused", ["BiasGelu", "SkipLayerNormalization"])
def test_the_bias_inside_an_ort_fused_op_is_corrected_and_its_types_are_known(fused, tmp_path, monkeypatch):
    """Models ORT's transformer optimizer fused keep a MatMul's bias inside BiasGelu or
    SkipLayerNormalization; onnx's shape inference does not know those ops, and the MatMul after them
    must still be typed float and quantized."""
    from onnxopt.graph import infer_value_info

    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    w, w2 = (rng.standard_normal((K, N)).astype(np.float32) for _ in range(2))
    b, gamma, beta = (rng.standard_normal(N).astype(np.float32) for _ in range(3))
    if fused == "BiasGelu":
        body, inputs = "h = com.microsoft.BiasGelu(m, b)", f"float[B, 4, {K}] x"
    else:
        body, inputs = "h = com.microsoft.SkipLayerNormalization<epsilon = 0.00001>(m, r, gamma, beta, b)", \
            f"float[B, 4, {K}] x, float[B, 4, {N}] r"
    model = parse(f"""
    <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
    g ({inputs}) => (float[B, 4, {N}] y)
    <float[{K}, {N}] w = {{{_values(w)}}}, float[{N}, {N}] w2 = {{{_values(w2[:N])}}}, float[{N}] b = {{{_values(b)}}},
     float[{N}] gamma = {{{_values(gamma)}}}, float[{N}] beta = {{{_values(beta)}}}>
    {{ m = MatMul(x, w)
       {body}
       y = MatMul(h, w2) }}
    """)
    assert infer_value_info(model)["h"].type.tensor_type.elem_type == 1  # float, as ORT computes it
    feeds = {"x": (3.0 + rng.random((256, 4, K))).astype(np.float32)}
    if fused == "SkipLayerNormalization":
        feeds["r"] = rng.standard_normal((256, 4, N)).astype(np.float32)
    reference = ort_run(model, feeds)[0]
    plain, _ = _quantized(model, feeds, correction=False)
    corrected, report = _quantized(model, feeds, correction=True)
    assert report.passes[0]["counts"]["weights quantized"] == 2 and report.passes[0]["counts"]["biases corrected"] == 1
    error = lambda m: float(np.sqrt(np.mean((ort_run(m, feeds)[0] - reference) ** 2)))  # noqa: E731
    assert error(corrected) < error(plain)
