"""The `lowrank` pass: exactness at a weight's true rank (and loss below it), MatMul / Gemm (transB,
alpha, bias) / 1x1 and KxK Conv, activation-aware factors against plain SVD, shared weights, the
break-even rule, idempotence, `quant` after it, its errors, and real models."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import ort_run
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt import OnnxoptError

RNG = np.random.default_rng(0)
K, N, RANK = 64, 96, 8


def low_rank(k: int, n: int, rank: int) -> np.ndarray:
    return (RNG.standard_normal((k, rank)) @ RNG.standard_normal((rank, n)) / np.sqrt(k)).astype(np.float32)


def model_of(nodes, inits, x_shape, y_shape) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def matmul_model(weight=None) -> onnx.ModelProto:
    w = low_rank(K, N, RANK) if weight is None else weight
    return model_of([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], {"W": w}, ["n", K], ["n", N])


def gemm_model() -> onnx.ModelProto:
    inits = {"B": low_rank(K, N, RANK).T.copy(), "C": RNG.standard_normal(N).astype(np.float32)}
    node = helper.make_node("Gemm", ["x", "B", "C"], ["y"], name="fc", transB=1, alpha=0.5, beta=2.0)
    return model_of([node], inits, ["n", K], ["n", N])


def conv_model() -> onnx.ModelProto:
    inits = {"W": low_rank(K, N, RANK).T.copy()[:, :, None, None], "b": RNG.standard_normal(N).astype(np.float32)}
    node = helper.make_node("Conv", ["x", "W", "b"], ["y"], name="pw", kernel_shape=[1, 1], strides=[2, 2])
    return model_of([node], inits, ["n", K, 6, 6], ["n", N, 3, 3])


def conv3x3_model() -> onnx.ModelProto:
    """A padded, strided, dilated 3x3 Conv whose [N, C * 9] weight has rank RANK."""
    c = 8
    w = low_rank(c * 9, N, RANK).T.reshape(N, c, 3, 3).copy()
    inits = {"W": w, "b": RNG.standard_normal(N).astype(np.float32)}
    node = helper.make_node("Conv", ["x", "W", "b"], ["y"], name="c3", kernel_shape=[3, 3], pads=[2, 1, 2, 1],
                            strides=[2, 1], dilations=[2, 1])
    return model_of([node], inits, ["n", c, 9, 7], ["n", N, 5, 7])


def feeds_for(model: onnx.ModelProto, n: int = 64) -> dict[str, np.ndarray]:
    dims = [d.dim_value or n for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"x": RNG.standard_normal(dims).astype(np.float32)}


def relative_error(model, factored, feeds) -> float:
    want, got = ort_run(model, feeds)[0], ort_run(factored, feeds)[0]
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("build", [matmul_model, gemm_model, conv_model, conv3x3_model],
                         ids=["matmul", "gemm-transB", "conv1x1", "conv3x3"])
def test_a_rank_r_weight_is_exact_at_rank_r_and_not_below(build):
    model, feeds = build(), feeds_for(build())
    for method in ("whitened", "svd"):
        exact, report = onnxopt.optimize(model, f"lowrank:rank={RANK},method={method},keep_if_slower=false",
                                         calib=feeds, compare=False)
        assert report.passes[0]["changed"]
        assert relative_error(model, exact, feeds) < 1e-5, method
        assert sum(1 for n in exact.graph.node if n.op_type in ("MatMul", model.graph.node[0].op_type)) == 2
        assert any(f"/lowrank_r{RANK}_a" in t.name for t in exact.graph.initializer)
        below, _ = onnxopt.optimize(model, f"lowrank:rank={RANK - 1},method={method},keep_if_slower=false",
                                    calib=feeds, compare=False)
        assert relative_error(model, below, feeds) > 1e-2, method


def test_whitened_factors_beat_plain_svd_on_the_data_they_saw():
    """Inputs with a few loud channels: plain SVD spends its rank on directions the data never excites."""
    model = matmul_model(RNG.standard_normal((K, N)).astype(np.float32))
    x = RNG.standard_normal((512, K)).astype(np.float32) * np.where(np.arange(K) < 8, 10.0, 0.1).astype(np.float32)
    errors = {}
    for method in ("svd", "asvd", "whitened"):
        factored, _ = onnxopt.optimize(model, f"lowrank:rank=8,method={method},keep_if_slower=false",
                                       calib={"x": x}, compare=False)
        want, got = ort_run(model, {"x": x})[0], ort_run(factored, {"x": x})[0]
        errors[method] = float(np.linalg.norm(got - want) / np.linalg.norm(want))  # what whitening minimizes
    assert errors["whitened"] < 0.1 * errors["svd"], errors
    assert errors["whitened"] <= errors["asvd"] * 1.001, errors
    # the refit of the second factor on the data fixes what plain SVD's B got wrong, given its A
    refit, _ = onnxopt.optimize(model, "lowrank:rank=8,method=svd,refit=true,keep_if_slower=false", calib={"x": x},
                                compare=False)
    want, got = ort_run(model, {"x": x})[0], ort_run(refit, {"x": x})[0]
    assert float(np.linalg.norm(got - want) / np.linalg.norm(want)) < 0.5 * errors["svd"]


def test_a_shared_weight_is_factored_once_and_every_reader_uses_the_factors():
    w = low_rank(K, N, RANK)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="m1"), helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("MatMul", ["r", "W"], ["b"], name="m2"), helper.make_node("Add", ["a", "b"], ["y"])]
    model = model_of(nodes, {"W": w}, ["n", K], ["n", N])
    feeds = feeds_for(model)
    factored, _ = onnxopt.optimize(model, f"lowrank:rank={RANK},keep_if_slower=false", calib=feeds, compare=False)
    factors = [t.name for t in factored.graph.initializer if "_bias" not in t.name]  # the mean's share: 1 per node
    assert factors == [f"W/lowrank_r{RANK}_a", f"W/lowrank_r{RANK}_b"]
    assert sum(1 for n in factored.graph.node if n.op_type == "MatMul") == 4
    assert relative_error(model, factored, feeds) < 1e-5


def test_the_mean_shift_joins_the_bias_add_after_a_matmul_and_a_shared_bias_keeps_its_value():
    """Inputs with a mean: the bias gains E[x] (W - A B). A MatMul whose only reader is a bias Add
    gets no Add of its own (the Add's constant takes the shift, under a new name, since another
    node reads the same bias)."""
    w = RNG.standard_normal((K, N)).astype(np.float32)
    bias = RNG.standard_normal(N).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"], name="mm"), helper.make_node("Add", ["xw", "b"], ["h"]),
             helper.make_node("Add", ["h", "b"], ["y"], name="reads_b_too")]
    model = model_of(nodes, {"W": w, "b": bias}, ["n", K], ["n", N])
    x = (RNG.standard_normal((256, K)) + 3.0).astype(np.float32)
    factored, _ = onnxopt.optimize(model, "lowrank:rank=16,keep_if_slower=false", calib={"x": x}, compare=False)
    assert [n.op_type for n in factored.graph.node] == ["MatMul", "MatMul", "Add", "Add"]
    assert factored.graph.node[3].input[1] == "b"
    inits = {t.name: numpy_helper.to_array(t) for t in factored.graph.initializer}
    np.testing.assert_array_equal(inits["b"], bias)
    # the shift centered the error: the mean output is kept though rank 16 of 64 loses much of the rest
    want, got = ort_run(model, {"x": x})[0], ort_run(factored, {"x": x})[0]
    np.testing.assert_allclose(got.mean(0), want.mean(0), atol=1e-3 * float(np.abs(want).max()))
    assert np.abs(got - want).max() > 1e-2 * float(np.abs(want).max())  # lossy: the check above can fail
    # a bias the caller may override at run time (an initializer that is also a graph input) stays as it is
    model.graph.input.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [N]))
    factored, _ = onnxopt.optimize(model, "lowrank:rank=16,keep_if_slower=false", calib={"x": x}, compare=False)
    assert [n.op_type for n in factored.graph.node] == ["MatMul", "MatMul", "Add", "Add", "Add"]
    assert all(i == "b" for n in factored.graph.node[3:] for i in n.input[1:])


def test_kxk_conv_factors_are_a_kxk_conv_to_rank_channels_then_a_1x1_conv():
    model = conv3x3_model()
    out, _ = onnxopt.optimize(model, f"lowrank:rank={RANK},keep_if_slower=false", calib=feeds_for(model),
                              compare=False)
    first, second = (n for n in out.graph.node if n.op_type == "Conv")
    init = {t.name: t for t in out.graph.initializer}
    assert list(init[first.input[1]].dims) == [RANK, 8, 3, 3] and list(init[second.input[1]].dims) == [N, RANK, 1, 1]
    attrs = {a.name: list(a.ints) for a in first.attribute}
    assert attrs["strides"] == [2, 1] and attrs["dilations"] == [2, 1] and attrs["pads"] == [2, 1, 2, 1]
    assert {a.name: list(a.ints) for a in second.attribute} == {"kernel_shape": [1, 1]}


def test_what_is_left_alone_grouped_convs_no_saving_and_factors_already_made():
    depthwise = model_of([helper.make_node("Conv", ["x", "W"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                           group=4)],
                         {"W": RNG.standard_normal((4, 1, 3, 3)).astype(np.float32)}, ["n", 4, 5, 5], ["n", 4, 5, 5])
    out, report = onnxopt.optimize(depthwise, "lowrank:ratio=0.5", calib=feeds_for(depthwise), compare=False)
    assert not report.passes[0]["changed"] and any("grouped Conv" in s for s in report.passes[0]["skipped"])
    # ratio=1 keeps every weight: the factors would be as large as the matrix
    model = matmul_model()
    _, report = onnxopt.optimize(model, "lowrank:ratio=1.0,keep_if_slower=false", calib=feeds_for(model), compare=False)
    assert not report.passes[0]["changed"] and any("break-even" in s for s in report.passes[0]["skipped"])
    once, _ = onnxopt.optimize(model, "lowrank:ratio=0.5,keep_if_slower=false", calib=feeds_for(model), compare=False)
    twice, report = onnxopt.optimize(once, "lowrank:ratio=0.5,keep_if_slower=false", calib=feeds_for(model),
                                     compare=False)
    assert not report.passes[0]["changed"]
    assert [n.name for n in twice.graph.node] == [n.name for n in once.graph.node]


def test_a_layer_that_runs_slower_factored_is_left_alone_and_named(monkeypatch):
    from onnxopt.passes.lowrank import pays

    monkeypatch.setattr(pays.BreakEven, "speedup", lambda self, layer, rank: 0.8)
    model = matmul_model()
    out, report = onnxopt.optimize(model, "lowrank:ratio=0.5", calib=feeds_for(model), compare=False)
    assert not report.passes[0]["changed"]
    assert any(s.startswith("mm: factored at rank") and "0.80x" in s for s in report.passes[0]["skipped"])


@pytest.mark.parametrize("kernel, attrs", [(3, dict(dilations=[2, 2])), (5, {}), (3, dict(strides=[2, 2]))],
                         ids=["dilated", "5x5", "strided"])
def test_the_break_even_timing_runs_unpadded_kxk_convs(kernel, attrs):
    """The one-layer timing model must hold the kernel even at 8 output positions."""
    from onnxopt.guard import SpeedGuard
    from onnxopt.passes.lowrank.factor import Layer
    from onnxopt.passes.lowrank.pays import BreakEven

    weight = RNG.standard_normal((16, 8, kernel, kernel)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="c", kernel_shape=[kernel, kernel], **attrs)
    layer = Layer("W", [node], weight.reshape(16, -1).T, (kernel, kernel))
    assert BreakEven(SpeedGuard()).speedup(layer, 4) > 0


def test_the_budget_factors_a_matrix_as_far_as_the_error_allows():
    model = matmul_model(RNG.standard_normal((K, N)).astype(np.float32) * np.linspace(1, 0, N, dtype=np.float32) ** 4)
    feeds = feeds_for(model, 256)
    loose, report = onnxopt.optimize(model, "lowrank:max_error=0.05,keep_if_slower=false", calib=feeds, compare=False)
    assert report.passes[0]["changed"] and report.passes[0]["details"]["error"] <= 0.05
    tight, report = onnxopt.optimize(model, "lowrank:max_error=0.00001,keep_if_slower=false", calib=feeds,
                                     compare=False)
    assert not report.passes[0]["changed"]


def test_measured_allocation_removes_as_many_weights_where_it_hurts_least():
    """Two 48 x 48 MatMuls reading x, their outputs added, the first of rank 6: at ratio 0.5 (rank 12
    each), the measured allocation factors the first further (exact down to rank 6) and spares the
    second."""
    size = 48
    inits = {"W1": low_rank(size, size, 6), "W2": (RNG.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h1"], name="first"),
             helper.make_node("MatMul", ["x", "W2"], ["h2"], name="second"), helper.make_node("Add", ["h1", "h2"], ["y"])]
    model = model_of(nodes, inits, ["n", size], ["n", size])
    feeds, held_out = feeds_for(model, 256), feeds_for(model, 256)
    results = {}
    for allocation in ("uniform", "measured"):
        out, report = onnxopt.optimize(model, f"lowrank:ratio=0.5,keep_if_slower=false,allocation={allocation}",
                                       calib=feeds, compare=False)
        weights = sum(int(np.prod(t.dims)) for t in out.graph.initializer if len(t.dims) == 2)
        results[allocation] = (weights, report.passes[0]["details"]["ranks"], relative_error(model, out, held_out))
    (uniform_weights, uniform_ranks, uniform_error), (weights, ranks, error) = results["uniform"], results["measured"]
    assert uniform_ranks == {"first": 12, "second": 12} and weights <= uniform_weights
    assert ranks["first"] < 12 and ranks.get("second", size) > 12
    assert error < 0.9 * uniform_error
    assert any("spread over 2 matrices by measured sensitivity" in n for n in report.passes[0]["notes"])


def test_quant_after_lowrank_quantizes_both_factors():
    model = matmul_model()
    feeds = feeds_for(model, 128)
    out, _ = onnxopt.optimize(model, f"lowrank:rank={RANK},keep_if_slower=false,quant:keep_if_slower=false",
                              calib=feeds, compare=False)
    dequantized = {n.output[0] for n in out.graph.node if n.op_type == "DequantizeLinear"}
    matmuls = [n for n in out.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 2 and all(set(n.input) <= dequantized for n in matmuls)


@pytest.mark.parametrize("spec, message", [
    ("lowrank:ratio=0", "ratio must be in \\(0, 1\\]"),
    ("lowrank:ratio=1.5", "ratio must be in \\(0, 1\\]"),
    ("lowrank:ratio=0.5,rank=4", "give one of ratio, rank, energy and max_error"),
    ("lowrank:rank=100", "rank=100 is larger than every matrix allows"),
    ("lowrank:energy=1.2", "energy must be in \\(0, 1\\]"),
    ("lowrank:allocation=measured", "allocation=measured spreads a ratio: give ratio="),
])
def test_bad_options_are_one_line(spec, message):
    model = matmul_model()
    with pytest.raises(OnnxoptError, match=message):
        onnxopt.optimize(model, spec, calib=feeds_for(model), compare=False)


def test_the_budget_without_data_and_no_eligible_layer_are_clear():
    with pytest.raises(OnnxoptError, match="lowrank: the error budget \\(max_error\\) needs representative data"):
        onnxopt.optimize(matmul_model(), "lowrank", compare=False)
    with pytest.raises(OnnxoptError, match="lowrank:refit=true needs representative data"):
        onnxopt.optimize(matmul_model(), "lowrank:rank=8,refit=true", compare=False)
    plain, report = onnxopt.optimize(matmul_model(), "lowrank:rank=8,keep_if_slower=false", compare=False)
    assert any("plain SVD" in n for n in report.passes[0]["notes"])
    relu = model_of([helper.make_node("Relu", ["x"], ["y"])], {}, [1, 4], [1, 4])
    _, report = onnxopt.optimize(relu, "lowrank:ratio=0.5", calib={"x": np.ones((4, 4), np.float32)}, compare=False)
    assert not report.passes[0]["changed"] and "no MatMul, Gemm or Conv" in report.passes[0]["skipped"][0]


@pytest.mark.slow
def test_every_light_model_stays_valid_and_close_at_energy_099():
    from models.light import light_case, light_models

    factored_any = 0
    # alexnet, vgg19 and zfnet512 hold 9216-25088 x 4096 Linear weights: a full SVD of each takes
    # minutes on 2 cores, and their 1x1-Conv-free bodies add nothing the others do not cover
    for name in [n for n in light_models() if n not in ("bvlc_alexnet", "vgg19", "zfnet512")]:
        path, feeds, _ = light_case(name)
        folded, _ = onnxopt.optimize(str(path), "fold,fuse", compare=False)
        out, report = onnxopt.optimize(folded, "lowrank:energy=0.99,method=svd,keep_if_slower=false", compare=False)
        onnx.checker.check_model(out)
        before, after = ort_run(folded, feeds), ort_run(out, feeds)
        assert [a.shape for a in after] == [b.shape for b in before], name
        factored_any += bool(report.passes[0]["changed"])
        for a, b in zip(after, before):
            scale = float(np.abs(b).max()) or 1.0
            assert float(np.abs(a - b).max()) <= 0.5 * scale, name
    assert factored_any >= 3


@pytest.mark.slow
def test_minilm_ffn_at_half_its_weights_whitened_beats_plain_svd(minilm_model):
    """The oracle can fail: whitened factors on 160 real sentences must beat plain SVD by a margin."""
    from models import minilm

    feeds = minilm.evaluation_feeds(48)
    reference = minilm.embed(ort_run(onnx.load(str(minilm_model)), feeds)[0], feeds["attention_mask"])
    cosines, metrics = {}, {}
    for method in ("svd", "whitened", "whitened,output_aware=false"):
        out, report = onnxopt.optimize(str(minilm_model), f"fold,fuse,lowrank:ratio=0.5,method={method},samples=160,"
                                       "exclude=.*attention.*,keep_if_slower=false",
                                       calib=str(minilm.calibration_npz()), compare=False)
        assert report.passes[-1]["counts"]["matrices factored"] == 12
        metrics[method] = report.passes[-1]["details"]["output_aware"]
        emb = minilm.embed(ort_run(out, feeds)[0], feeds["attention_mask"])
        cosines[method] = float(np.mean(np.sum(emb * reference, axis=1)))
    assert cosines["whitened"] > cosines["svd"] + 0.1 and cosines["whitened"] > 0.8, cosines
    # every FFN matrix gets an output metric (6 up-projections into GELU, 6 down-projections into a
    # LayerNorm), and it pays on the model's own outputs
    assert metrics == {"svd": 0, "whitened": 12, "whitened,output_aware=false": 0}
    assert cosines["whitened"] > cosines["whitened,output_aware=false"], cosines
