"""`fuse`'s scalar rule: Mul/Div by a scalar constant folded into the linear ops before it.
(softmax_floor=False: these attention graphs end in a masked Softmax, which that other rule
rewrites; tests/test_fuse_softmax.py covers it.)"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_same_outputs, op_types, parse, run_pass

from onnxopt.passes.fuse import FuseOps

rng = np.random.default_rng(0)


def _floats(shape, scale=1.0) -> str:
    return ", ".join(f"{v:.5f}" for v in (rng.standard_normal(int(np.prod(shape))) * scale))


def attention_scores(scale_op: str = "Mul", scale: str = "0.25") -> str:
    """Q = Transpose(Reshape(h Wq + bq)); scores = (Q K^T) * c, then a mask and Softmax, as BERT exports do."""
    return f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 5, 8] h, float[2, 1, 1, 5] mask) => (float[2, 2, 5, 5] y)
      <float[8, 8] wq = {{{_floats((8, 8))}}}, float[8] bq = {{{_floats((8,))}}},
       float[8, 8] wk = {{{_floats((8, 8))}}}, int64[4] heads = {{2, 5, 2, 4}}, float c = {{{scale}}}> {{
        qm = MatMul(h, wq)
        qa = Add(bq, qm)
        qr = Reshape(qa, heads)
        q = Transpose<perm = [0, 2, 1, 3]>(qr)
        km = MatMul(h, wk)
        kr = Reshape(km, heads)
        kt = Transpose<perm = [0, 2, 3, 1]>(kr)
        s = MatMul(q, kt)
        scaled = {scale_op}(s, c)
        masked = Add(scaled, mask)
        y = Softmax(masked)
    }}
    """


def feeds():
    return {"h": rng.standard_normal((2, 5, 8)).astype(np.float32),
            "mask": np.where(rng.random((2, 1, 1, 5)) < 0.3, -1e4, 0).astype(np.float32)}


@pytest.mark.parametrize("scale_op,scale", [("Mul", "0.35355"), ("Div", "2.8284")])
def test_attention_scale_moves_into_the_query_weights(scale_op, scale):
    model = parse(attention_scores(scale_op, scale))
    result = run_pass(FuseOps, model, softmax_floor=False)
    assert result.counts == {f"{scale_op}(scalar)->linear constants": 1}
    assert scale_op not in op_types(result.model)
    assert_same_outputs(model, result.model, feeds(), rtol=1e-5, atol=1e-6)
    inputs = {i for n in result.model.graph.node for i in n.input}
    assert "wq" not in inputs and "bq" not in inputs and "wk" in inputs  # one side absorbed it, once
    assert not run_pass(FuseOps, result.model, softmax_floor=False).changed  # idempotent


def test_scale_is_left_alone_when_a_tensor_on_the_way_has_other_readers():
    text = attention_scores().replace("y = Softmax(masked)", "y0 = Softmax(masked)\n        y = Add(y0, s)")
    result = run_pass(FuseOps, parse(text), softmax_floor=False)
    assert not result.changed
    assert any("other readers" in s for s in result.skipped)


def test_scale_after_a_nonlinear_op_is_left_alone_with_reason():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3, 4] x) => (float[3, 4] y) <float c = {0.5}> { t = Tanh(x)
        y = Mul(t, c) }
    """)
    result = run_pass(FuseOps, model, softmax_floor=False)
    assert not result.changed and result.skipped == ["Mul(scalar)->linear constants: Tanh is not linear (x1)"]


@pytest.mark.parametrize("producer", ["Gemm", "Conv", "Mul"])
def test_scale_folds_into_gemm_conv_and_constant_mul(producer):
    body = {
        "Gemm": ("float[3, 4] x", "float[3, 2] y", f"float[4, 2] w = {{{_floats((4, 2))}}}, float[2] b = {{0.1, -0.2}}",
                 "p = Gemm<alpha = 1.5>(x, w, b)"),
        "Conv": ("float[1, 2, 4, 4] x", "float[1, 3, 4, 4] y",
                 f"float[3, 2, 1, 1] w = {{{_floats((3, 2, 1, 1))}}}, float[3] b = {{0.1, 0.2, 0.3}}", "p = Conv(x, w, b)"),
        "Mul": ("float[3, 4] x", "float[3, 4] y", "float[4] w = {1, 2, 3, 4}", "p = Mul(x, w)"),
    }[producer]
    model = parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g ({body[0]}) => ({body[1]}) <{body[2]}, float c = {{-0.5}}> {{ {body[3]}
        y = Mul(c, p) }}
    """)
    result = run_pass(FuseOps, model, softmax_floor=False)
    assert op_types(result.model) == [producer]
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert_same_outputs(model, result.model, {"x": rng.standard_normal(shape).astype(np.float32)}, rtol=1e-5, atol=1e-6)


def test_scalar_option_turns_the_rule_off():
    result = run_pass(FuseOps, parse(attention_scores()), scalar=False, softmax_floor=False)
    assert not result.changed
