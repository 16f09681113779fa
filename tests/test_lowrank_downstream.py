"""Output-aware truncation (`passes/lowrank/downstream.py`): which paths it recognizes, the derivative
it measures, what it leaves alone, and that it lowers the error where the model's outputs are read."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import ort_run
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.graph import GraphView
from onnxopt.passes.lowrank.downstream import _activation_path, _derivative_moments, output_metrics
from onnxopt.passes.lowrank.factor import eligible

RNG = np.random.default_rng(7)
D, HIDDEN = 32, 96


def ffn_block(activation: str = "gelu", gamma=None) -> onnx.ModelProto:
    """x -> up (bias) -> activation -> down (bias) -> + x -> LayerNormalization: a transformer FFN."""
    gamma = np.where(np.arange(D) < D // 2, 1.0, 0.02).astype(np.float32) if gamma is None else gamma
    inits = {"W1": (RNG.standard_normal((D, HIDDEN)) / np.sqrt(D)).astype(np.float32),
             "b1": RNG.standard_normal(HIDDEN).astype(np.float32) * 0.1,
             "W2": (RNG.standard_normal((HIDDEN, D)) / np.sqrt(HIDDEN)).astype(np.float32),
             "b2": np.zeros(D, np.float32), "gamma": gamma, "beta": np.zeros(D, np.float32),
             "sqrt2": np.array(np.sqrt(2.0), np.float32), "one": np.array(1.0, np.float32),
             "half": np.array(0.5, np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"], name="up"),
             helper.make_node("Add", ["h0", "b1"], ["z"], name="up_bias")]
    if activation == "gelu":  # the Erf form TorchScript exports
        nodes += [helper.make_node("Div", ["z", "sqrt2"], ["zs"]), helper.make_node("Erf", ["zs"], ["e"]),
                  helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["z", "e1"], ["ze"]),
                  helper.make_node("Mul", ["ze", "half"], ["a"])]
    else:
        nodes.append(helper.make_node("Relu", ["z"], ["a"]))
    nodes += [helper.make_node("MatMul", ["a", "W2"], ["o0"], name="down"),
              helper.make_node("Add", ["o0", "b2"], ["o"], name="down_bias"),
              helper.make_node("Add", ["o", "x"], ["r"], name="residual"),
              helper.make_node("LayerNormalization", ["r", "gamma", "beta"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", D])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def inputs(n: int = 1024) -> np.ndarray:
    mix = RNG.standard_normal((D, D)).astype(np.float32)
    return ((RNG.standard_normal((n, D)) @ mix) / np.sqrt(D)).astype(np.float32)


def layers_of(model):
    view = GraphView(model.graph, model.ir_version)
    layers, _ = eligible(model, view, {"MatMul"})
    return view, {layer.name: i for i, layer in enumerate(layers)}, layers


def test_the_up_projection_gets_a_full_metric_and_the_down_projection_the_norms_scales():
    model = ffn_block()
    view, index, layers = layers_of(model)
    batches = [{"x": inputs(256)}]
    metrics = output_metrics(model, view, layers, batches, lambda it, *a: it)
    up, down = metrics[index["up"]], metrics[index["down"]]
    assert up.shape == (HIDDEN, HIDDEN) and np.allclose(up, np.tril(up))  # a Cholesky factor
    assert down.shape == (D,)
    # gamma's small half is floored at 0.1 of the gammas' RMS, the loud half shares the rest
    assert np.allclose(down[D // 2:], 0.1) and np.all(down[:D // 2] > 1.0)


def test_the_measured_derivative_is_the_activations():
    """Central differences of the path's own nodes: ReLU's derivative is the indicator z > 0."""
    model = ffn_block("relu")
    view, index, layers = layers_of(model)
    x = inputs(512)

    path = _activation_path(view, "z", HIDDEN)
    assert path is not None and [n.op_type for n in path.nodes] == ["Relu"] and path.gamma is not None
    moments = _derivative_moments(model, view, {0: path}, [{"x": x}], lambda it, *a: it)
    z = x @ numpy_helper.to_array(model.graph.initializer[0]) + numpy_helper.to_array(model.graph.initializer[1])
    indicator = (z > 0).astype(np.float64)
    assert np.allclose(moments[0], indicator.T @ indicator / len(z), atol=0.02)


def test_paths_it_does_not_know_keep_the_input_whitening():
    """An output read by a Reshape (an attention projection), or by a graph output, gets no metric."""
    model = ffn_block()
    reshape = helper.make_node("Reshape", ["z", "shape"], ["zr"])
    back = helper.make_node("Reshape", ["zr", "flat"], ["z2"])
    nodes = list(model.graph.node)
    for node in nodes:
        node.input[:] = ["z2" if (n == "z" and node.op_type != "Reshape") else n for n in node.input]
    del model.graph.node[:]
    model.graph.node.extend(nodes[:2] + [reshape, back] + nodes[2:])
    model.graph.initializer.extend([numpy_helper.from_array(np.array([-1, 8, HIDDEN // 8]), "shape"),
                                    numpy_helper.from_array(np.array([-1, HIDDEN]), "flat")])
    view, index, layers = layers_of(model)
    metrics = output_metrics(model, view, layers, [{"x": inputs(64)}], lambda it, *a: it)
    assert index["up"] not in metrics and index["down"] in metrics


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_output_aware_factors_lower_the_error_where_the_outputs_are_read(activation):
    """The oracle can fail: at the same rank, the model's output (after the norm) must be closer."""
    model, x = ffn_block(activation), inputs(2048)
    errors = {}
    for aware in ("true", "false"):
        factored, report = onnxopt.optimize(model, f"lowrank:rank=20,output_aware={aware},keep_if_slower=false",
                                            calib={"x": x[:1024]}, compare=False)
        assert report.passes[0]["counts"]["matrices factored"] == 2
        want, got = ort_run(model, {"x": x[1024:]})[0], ort_run(factored, {"x": x[1024:]})[0]
        errors[aware] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert errors["true"] < 0.75 * errors["false"], errors  # measured: 0.09 against 0.15


def test_a_weight_of_true_rank_stays_exact_with_the_metric():
    model = ffn_block()
    w1 = RNG.standard_normal((D, 6)) @ RNG.standard_normal((6, HIDDEN)) / np.sqrt(D)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1.astype(np.float32), "W1"))
    x = inputs(512)
    exact, _ = onnxopt.optimize(model, "lowrank:rank=6,exclude=down,keep_if_slower=false", calib={"x": x},
                                compare=False)
    want, got = ort_run(model, {"x": x})[0], ort_run(exact, {"x": x})[0]
    assert float(np.abs(got - want).max()) < 1e-4


def test_moments_are_accumulated_in_bounded_chunks_and_wide_outputs_are_left_to_the_input_whitening(monkeypatch):
    """Two FFN blocks: with room for one moment at a time they are measured in two passes, alike; an
    output wider than MAX_PATH_WIDTH gets no activation metric (an LLM's N x N would not fit)."""
    import onnxopt.passes.lowrank.downstream as downstream

    first, second = ffn_block(), ffn_block()
    onnx.compose.add_prefix(second, "b_", inplace=True)
    model = onnx.compose.merge_models(first, second, io_map=[("y", "b_x")])
    view, index, layers = layers_of(model)
    batches = [{"x": inputs(128)}]
    together = output_metrics(model, view, layers, batches, lambda it, *a: it)
    monkeypatch.setattr(downstream, "METRIC_BYTES", 8 * HIDDEN ** 2)
    paths = {index["up"]: downstream._activation_path(view, "z", HIDDEN),
             index["b_up"]: downstream._activation_path(view, "b_z", HIDDEN)}
    assert len(downstream._chunks(paths)) == 2
    apart = output_metrics(model, view, layers, batches, lambda it, *a: it)
    assert together.keys() == apart.keys() and len(apart) == 4
    assert all(np.allclose(together[i], apart[i]) for i in apart)
    monkeypatch.setattr(downstream, "MAX_PATH_WIDTH", HIDDEN - 1)
    narrow = output_metrics(model, view, layers, batches, lambda it, *a: it)
    assert index["up"] not in narrow and index["down"] in narrow


def ort_fused_ffn_block() -> onnx.ModelProto:
    """The same block as ONNX Runtime's transformer optimizer writes it: BiasGelu, then the down
    projection into a SkipLayerNormalization that adds the bias and the residual itself."""
    plain = ffn_block()
    inits = {t.name: t for t in plain.graph.initializer if t.name in ("W1", "b1", "W2", "b2", "gamma", "beta")}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"], name="up"),
             helper.make_node("BiasGelu", ["h0", "b1"], ["a"], domain="com.microsoft"),
             helper.make_node("MatMul", ["a", "W2"], ["o0"], name="down"),
             helper.make_node("SkipLayerNormalization", ["o0", "x", "gamma", "beta", "b2"], ["y"],
                              domain="com.microsoft", epsilon=1e-5)]
    graph = helper.make_graph(nodes, "ffn_fused", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", D])], list(inits.values()))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_ort_fused_forms_bias_gelu_and_skip_layer_norm_get_their_metrics():
    model, x = ort_fused_ffn_block(), inputs(2048)
    view, index, layers = layers_of(model)
    metrics = output_metrics(model, view, layers, [{"x": x[:256]}], lambda it, *a: it)
    assert metrics[index["up"]].shape == (HIDDEN, HIDDEN) and metrics[index["down"]].shape == (D,)
    errors = {}
    for aware in ("true", "false"):
        factored, _ = onnxopt.optimize(model, f"lowrank:rank=20,output_aware={aware},keep_if_slower=false",
                                       calib={"x": x[:1024]}, compare=False)
        want, got = ort_run(model, {"x": x[1024:]})[0], ort_run(factored, {"x": x[1024:]})[0]
        errors[aware] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert errors["true"] < 0.75 * errors["false"], errors


def test_a_classifier_of_gemms_gets_the_metric_of_the_next_gemm_as_it_multiplies():
    """Gemm -> Relu -> Gemm(transB, alpha), as CNN heads and exported Linear layers are: V is B^T * alpha."""
    b1 = RNG.standard_normal((HIDDEN, D)).astype(np.float32)
    b2 = RNG.standard_normal((10, HIDDEN)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "B1"], ["z"], name="fc1", transB=1),
             helper.make_node("Relu", ["z"], ["a"]),
             helper.make_node("Gemm", ["a", "B2"], ["y"], name="fc2", transB=1, alpha=0.5)]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
                              [numpy_helper.from_array(b1, "B1"), numpy_helper.from_array(b2, "B2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    view = GraphView(model.graph, model.ir_version)

    path = _activation_path(view, "z", HIDDEN)
    assert path is not None and path.gamma is None and np.allclose(path.weight, b2.T * 0.5)
    layers, _ = eligible(model, view, {"Gemm"})
    metrics = output_metrics(model, view, layers, [{"x": inputs(256)}], lambda it, *a: it)
    assert list(metrics) == [0] and metrics[0].shape == (HIDDEN, HIDDEN)


def test_a_gate_read_from_a_graph_input_is_fed_to_the_path_as_it_is():
    """The path's other operand may be a graph input (a mask, a gate computed outside the model)."""
    w1 = (RNG.standard_normal((D, HIDDEN)) / np.sqrt(D)).astype(np.float32)
    w2 = (RNG.standard_normal((HIDDEN, D)) / np.sqrt(HIDDEN)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["z"], name="up"),
             helper.make_node("Mul", ["z", "g"], ["a"]),
             helper.make_node("MatMul", ["a", "W2"], ["y"], name="down")]
    graph = helper.make_graph(nodes, "gated", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D]),
                                               helper.make_tensor_value_info("g", TensorProto.FLOAT, ["n", HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", D])],
                              [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    view, index, layers = layers_of(model)
    gate = RNG.uniform(0, 2, (256, HIDDEN)).astype(np.float32)
    metrics = output_metrics(model, view, layers, [{"x": inputs(256), "g": gate}], lambda it, *a: it)
    assert list(metrics) == [index["up"]]
    # d a / d z is the gate itself: M = E[g g^T] * (W2 W2^T), plus the ridge on its diagonal
    m = (gate.T.astype(np.float64) @ gate / len(gate)) * (w2.astype(np.float64) @ w2.T)
    m += 0.1 * np.mean(np.diag(m)) * np.eye(HIDDEN)
    r = metrics[index["up"]].astype(np.float64)
    assert np.allclose(r @ r.T, m, rtol=1e-3, atol=1e-3 * np.abs(m).max())


def test_a_path_ort_will_not_run_alone_leaves_its_layer_to_the_input_whitening(monkeypatch):
    import onnxopt.passes.lowrank.downstream as downstream

    def broken(model, view, path):
        bad = helper.make_node("NoSuchOp", [path.start], [path.end], domain="no.such.domain")
        graph = helper.make_graph([bad], "bad", [helper.make_tensor_value_info(path.start, TensorProto.FLOAT, None)],
                                  [helper.make_tensor_value_info(path.end, TensorProto.FLOAT, None)])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                       helper.make_opsetid("no.such.domain", 1)])

    monkeypatch.setattr(downstream, "_path_model", broken)
    model = ffn_block()
    view, index, layers = layers_of(model)
    metrics = output_metrics(model, view, layers, [{"x": inputs(64)}], lambda it, *a: it)
    assert index["up"] not in metrics and index["down"] in metrics
