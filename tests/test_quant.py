"""The `quant` pass: placement, QDQ rewrite, integer kernels under ORT, accuracy on real models."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ort_run, parse

import onnxopt
from onnxopt import OnnxoptError
from onnxopt.graph import GraphView, NameGenerator
from onnxopt.passes.quant.plan import PlanOptions, build_plan, place, smoothing_factors
from onnxopt.passes.quant.qdq import QDQInserter

CONV_NET = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 2, 6, 6] x) => (float[N, 4] y)
  <float[4, 2, 3, 3] w1 = {%s}, float[4] b1 = {0.1, -0.2, 0.3, 0.0}, float[36, 4] fc = {%s}> {
    c = Conv<pads = [1, 1, 1, 1]>(x, w1, b1)
    r = Relu(c)
    p = MaxPool<kernel_shape = [2, 2], strides = [2, 2]>(r)
    f = Flatten(p)
    h = MatMul(f, fc)
    y = Softmax(h)
}
"""


def conv_net() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = ", ".join(f"{v:.4f}" for v in rng.standard_normal(72))
    fc = ", ".join(f"{v:.4f}" for v in rng.standard_normal(36 * 4) * 0.2)
    return parse(CONV_NET % (w1, fc))


def floats(model):
    from onnxopt.graph import infer_value_info

    return {n for n, vi in infer_value_info(model).items() if vi.type.tensor_type.elem_type == 1}


def test_placement_follows_the_op_table():
    model = conv_net()
    nodes, tensors, skipped = place(model.graph, GraphView(model.graph), PlanOptions(), floats(model))
    assert [n.op_type for n in nodes] == ["Conv", "Relu", "MaxPool", "Flatten", "MatMul"]
    # Softmax stays float; Conv output is read by Relu unquantized (ORT folds Relu into the Q after it)
    assert tensors >= {"x", "r", "p", "f"} and "h" not in tensors and "c" in tensors


def test_exclude_by_op_type_and_regex():
    model = conv_net()
    nodes, _, skipped = place(model.graph, GraphView(model.graph), PlanOptions(exclude="MatMul"), floats(model))
    assert "MatMul" not in [n.op_type for n in nodes]
    assert any("excluded" in s for s in skipped)
    nodes, _, _ = place(model.graph, GraphView(model.graph), PlanOptions(exclude="Co.*"), floats(model))
    # without the Conv, Relu/MaxPool/Flatten have no quantized input to carry; the MatMul starts its own region
    assert [n.op_type for n in nodes] == ["MatMul"]


def safe_weight_bits() -> int:
    """8-bit weights saturate ORT's u8 x s8 kernels on x86 CPUs without VNNI; 7 never does."""
    from onnxopt.passes.quant.cpu import int8_products_saturate

    return 7 if int8_products_saturate() else 8


def test_qdq_rewrite_is_bounded_and_keeps_float_readers():
    model = conv_net()
    options = PlanOptions(weight_bits=safe_weight_bits())
    nodes, tensors, _ = place(model.graph, GraphView(model.graph), options, floats(model))
    x = np.random.default_rng(1).standard_normal((8, 2, 6, 6)).astype(np.float32)
    reference = ort_run(model, {"x": x})
    # ranges from the data itself (minmax): the planner and rewrite alone, no calibration module
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in sorted(tensors) if t != "x")
    values = dict(zip([o.name for o in probe.graph.output], ort_run(probe, {"x": x})), x=x)
    ranges = {t: (float(values[t].min()), float(values[t].max())) for t in tensors}
    view = GraphView(model.graph)
    plan = build_plan(view, nodes, tensors, ranges, options)
    counts = QDQInserter(model.graph, view, NameGenerator(model.graph)).apply(plan)
    onnx.checker.check_model(model)
    assert counts == {"activations quantized": 4, "weights quantized": 2, "biases quantized": 1}
    got = ort_run(model, {"x": x})[0]
    assert np.abs(got - reference[0]).max() < 0.05
    assert np.mean(got.argmax(1) == reference[0].argmax(1)) >= 0.85


def _int8_weights(model) -> np.ndarray:
    from onnx import numpy_helper

    return np.concatenate([numpy_helper.to_array(t).ravel() for t in model.graph.initializer
                           if t.data_type == onnx.TensorProto.INT8 and t.name.endswith("_quantized")])


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_reduce_range_keeps_weights_within_7_bits(mode):
    from onnxopt.passes.quant.plan import weight_params
    from onnxopt.passes.quant.qdq import quantize_weight

    weight = np.random.default_rng(3).standard_normal((16, 8)).astype(np.float32)
    assert np.abs(quantize_weight(weight, weight_params(weight, 1, 7))).max() == 63
    spec = f"quant:mode={mode},keep_if_slower=false,reduce_range="
    full, _ = onnxopt.optimize(conv_net(), spec + "off", calib="random", compare=False)
    reduced, report = onnxopt.optimize(conv_net(), spec + "on", calib="random", compare=False)
    assert np.abs(_int8_weights(full)).max() == 127
    assert np.abs(_int8_weights(reduced)).max() == 63


@pytest.mark.parametrize("saturates", [True, False])
def test_reduce_range_auto_follows_the_cpu(monkeypatch, saturates):
    from onnxopt.passes.quant import cpu

    monkeypatch.setattr(cpu, "int8_products_saturate", lambda: saturates)
    model, report = onnxopt.optimize(conv_net(), "quant:keep_if_slower=false", calib="random", compare=False)
    assert np.abs(_int8_weights(model)).max() == (63 if saturates else 127)
    assert report.passes[0]["details"]["weight_bits"] == (7 if saturates else 8)
    assert any("no VNNI" in n for n in report.passes[0]["notes"]) is saturates
    trt, _ = onnxopt.optimize(conv_net(), "quant:profile=tensorrt", calib="random", compare=False)
    assert np.abs(_int8_weights(trt)).max() == 127  # GPUs do not saturate


def test_smoothing_leaves_the_product_unchanged():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 8)) * np.array([1, 1, 50, 1, 1, 1, 0.01, 1])
    w1, w2 = rng.standard_normal((8, 5)), rng.standard_normal((8, 3))
    s = smoothing_factors(np.abs(x).max(0), [w1, w2], 0.8).astype(np.float64)
    np.testing.assert_allclose((x / s) @ (w1 * s[:, None]), x @ w1, rtol=1e-6)
    assert (np.abs(x / s).max(0).max() / np.abs(x / s).max(0).min()) < (np.abs(x).max(0).max() / np.abs(x).max(0).min())


def _quantize(path, calib, spec="fold,fuse,quant:keep_if_slower=false", **kwargs):
    return onnxopt.optimize(str(path), spec, calib=str(calib), compare=False, **kwargs)


def test_digits_int8_keeps_accuracy(digits_model, tmp_path, monkeypatch):
    from models import digits

    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    images, labels = digits.heldout()
    model, report = _quantize(digits_model, digits.calibration_npz())
    fp32 = ort_run(onnx.load(digits_model), {"image": images})[0]
    int8 = ort_run(model, {"image": images})[0]
    fp32_acc, int8_acc = np.mean(fp32.argmax(1) == labels), np.mean(int8.argmax(1) == labels)
    assert int8_acc >= fp32_acc - 0.005
    quant = [p for p in report.passes if p["name"] == "quant"][0]
    assert quant["counts"]["weights quantized"] == 4


def _optimized_ops(model: onnx.ModelProto, tmp_path) -> list[onnx.NodeProto]:
    path = tmp_path / "ort_optimized.onnx"
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return list(onnx.load(path).graph.node)


def _dangling_float_compute(nodes) -> list[str]:
    """Float Conv/MatMul/Gemm still fed by a DequantizeLinear: QDQ that ORT did not fuse."""
    producers = {o: n for n in nodes for o in n.output}
    return [n.name for n in nodes if n.op_type in ("Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul")
            and any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in n.input)]


def test_ort_runs_digits_on_integer_kernels(digits_model, tmp_path, monkeypatch):
    from models import digits

    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    model, _ = _quantize(digits_model, digits.calibration_npz())
    nodes = _optimized_ops(model, tmp_path)
    ops = {n.op_type for n in nodes}
    assert "QLinearConv" in ops
    assert not _dangling_float_compute(nodes)


def test_quantizing_twice_changes_nothing(digits_model, tmp_path, monkeypatch):
    from models import digits

    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    once, _ = _quantize(digits_model, digits.calibration_npz())
    twice, report = onnxopt.optimize(once, "quant:keep_if_slower=false", calib=str(digits.calibration_npz()),
                                     compare=False)
    assert not report.passes[0]["changed"]
    assert "already quantized" in report.passes[0]["skipped"][0]
    assert twice.SerializeToString() == once.SerializeToString()


@pytest.mark.parametrize("speedups,kept_float", [((1.3, 1.1, 1.2, 1.05), False), ((1.3, 0.9, 1.2, 1.05), True)])
def test_float_model_is_kept_when_int8_is_slower_anywhere(digits_model, tmp_path, monkeypatch, speedups, kept_float):
    from models import digits
    from onnxopt import guard

    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    fake = [guard.SpeedCheck(t, b, s, 1.0) for (t, b), s in zip([(1, 1), (1, 8), (2, 1), (2, 8)], speedups)]
    monkeypatch.setattr(guard, "speed_check", lambda *a, **k: fake)
    model, report = onnxopt.optimize(str(digits_model), "quant", calib=str(digits.calibration_npz()),
                                     compare=False)
    quant = report.passes[-1]
    assert quant["changed"] is not kept_float
    assert ("QuantizeLinear" in {n.op_type for n in model.graph.node}) is not kept_float
    if kept_float:
        assert "0.90x at batch 8, 1 thread(s)" in quant["notes"][-1]
        assert model.SerializeToString() == onnx.load(digits_model).SerializeToString()


@pytest.mark.parametrize("spec", ["quant", "quant:dynamic_if_slower=false"])
def test_dynamic_int8_is_kept_where_static_int8_does_not_pay_and_dynamic_does(tmp_path, monkeypatch, spec):
    from onnxopt import guard

    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    checks = []

    def static_slower_dynamic_faster(*args, **kwargs):
        checks.append(len(checks))
        speedup = 0.9 if len(checks) == 1 else 1.2
        return [guard.SpeedCheck(t, b, speedup, 1.0) for t, b in [(1, 1), (1, 8), (2, 1), (2, 8)]]

    monkeypatch.setattr(guard, "speed_check", static_slower_dynamic_faster)
    model, report = onnxopt.optimize(conv_net(), spec, calib="random", compare=False)  # a Conv, and a MatMul
    quant, ops = report.passes[-1], {n.op_type for n in model.graph.node}
    assert "QuantizeLinear" not in ops
    if spec == "quant":
        assert quant["details"]["mode"] == "dynamic (static int8 slower)" and len(checks) == 2
        assert "DynamicQuantizeMatMul" in ops
        assert any("static int8 does not pay" in n and "dynamic int8 does, kept" in n for n in quant["notes"])
    else:
        assert not quant["changed"] and len(checks) == 1


def test_dynamic_mode_needs_no_calibration(digits_model):
    model, report = onnxopt.optimize(str(digits_model), "quant:mode=dynamic", compare=False)
    assert not any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert report.passes[0]["details"]["mode"] == "dynamic"


def test_missing_and_bad_calibration_data_are_clear(digits_model, tmp_path):
    with pytest.raises(OnnxoptError, match="quant needs representative data .*set calib=data.npz"):
        onnxopt.optimize(str(digits_model), "quant", compare=False)
    bad = tmp_path / "bad.npz"
    np.savez(bad, pixels=np.zeros((4, 1, 8, 8), np.float32))
    with pytest.raises(OnnxoptError, match="image"):
        onnxopt.optimize(str(digits_model), "quant", calib=str(bad), compare=False)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, image=np.zeros((4, 1, 8, 8), np.float64))
    with pytest.raises(OnnxoptError, match="float64"):
        onnxopt.optimize(str(digits_model), "quant", calib=str(wrong), compare=False)


def test_option_validation():
    with pytest.raises(OnnxoptError, match="smooth must be in"):
        onnxopt.optimize(conv_net(), "quant:smooth=1.5", compare=False)
    with pytest.raises(OnnxoptError, match="not one of minmax, percentile, entropy, mse"):
        onnxopt.optimize(conv_net(), "quant:method=kl", compare=False)


def _minilm_embeddings(model, feeds):
    from models import minilm

    out = []
    for i in range(0, len(feeds["input_ids"]), 50):
        f = {k: v[i:i + 50] for k, v in feeds.items()}
        out.append(minilm.embed(ort_run(model, f)[0], f["attention_mask"]))
    return np.concatenate(out)


@pytest.mark.slow
def test_minilm_int8_embeddings_match_fp32(minilm_model, tmp_path, monkeypatch):
    from models import minilm

    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    model, _ = _quantize(minilm_model, minilm.calibration_npz(), verify="none")
    feeds = minilm.evaluation_feeds(300)
    fp32, int8 = _minilm_embeddings(onnx.load(minilm_model), feeds), _minilm_embeddings(model, feeds)
    assert float(np.mean(np.sum(fp32 * int8, axis=1))) >= 0.995
    nodes = _optimized_ops(model, tmp_path)
    assert sum(n.op_type in ("MatMulIntegerToFloat", "QLinearMatMul") for n in nodes) >= 36
    assert not _dangling_float_compute(nodes)


@pytest.mark.slow
def test_minilm_scorer_drives_auto_mode(minilm_model, tmp_path, monkeypatch):
    from models import minilm

    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    spec = "quant:samples=32,keep_if_slower=false,auto=true,eval=models.minilm:embedding_cosine,max_error=0.05"
    _, report = _quantize(minilm_model, minilm.calibration_npz(), spec, verify="none")
    auto = report.passes[-1]["details"]["auto"]
    assert "embedding_cosine below the float model's 1" in auto["measure"]  # fp32 against itself: 1
    assert 0 < auto["error_before"] < 0.01 and auto["kept_float"] == []


@pytest.mark.slow
@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_every_calibration_method_completes_on_minilm(minilm_model, method, tmp_path, monkeypatch):
    from models import minilm

    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    # keep_if_slower=false: this checks that calibration completes, not how fast the machine is today
    spec = f"quant:method={method},samples=32,keep_if_slower=false"
    model, report = _quantize(minilm_model, minilm.calibration_npz(), spec, verify="none")
    assert report.passes[-1]["details"]["method"] == method
    feeds = minilm.evaluation_feeds(50)
    cosine = float(np.mean(np.sum(_minilm_embeddings(onnx.load(minilm_model), feeds)
                                  * _minilm_embeddings(model, feeds), axis=1)))
    assert cosine > 0.98


def test_int4_packing_matches_ort_matmulnbits():
    from onnx import helper, numpy_helper

    from onnxopt.blockwise import dequantize_blockwise, quantize_blockwise
    from onnxopt.passes.quant.int4 import int4_candidates, quantize_int4

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((96, 40)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", 1, [3, 96])], [helper.make_tensor_value_info("y", 1, None)],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert quantize_int4(model, int4_candidates(model, 32), 32, accuracy_level=0) == 1
    x = rng.standard_normal((3, 96)).astype(np.float32)
    dequantized = dequantize_blockwise(*quantize_blockwise(weight, 32), k=96)
    assert np.abs(dequantized - weight).max() <= np.abs(weight).max() / 7 / 2 + 1e-6  # half a step at most
    np.testing.assert_allclose(ort_run(model, {"x": x})[0], x @ dequantized, rtol=1e-5, atol=1e-5)


def test_int4_pass_rewrites_matmul_weights_only():
    model, report = onnxopt.optimize(conv_net(), "quant:bits=4,block_size=16", compare=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 1 and "Conv" in ops and "QuantizeLinear" not in ops
    assert report.passes[0]["details"]["mode"] == "int4 weight-only"
    x = np.random.default_rng(2).standard_normal((4, 2, 6, 6)).astype(np.float32)
    ref, got = ort_run(conv_net(), {"x": x})[0], ort_run(model, {"x": x})[0]
    # int4 weights move softmax probabilities by up to ~0.1 here (7 levels per sign, blocks of 16)
    assert np.abs(ref - got).max() < 0.25 and np.mean(ref.argmax(1) == got.argmax(1)) >= 0.75
    with pytest.raises(OnnxoptError, match="block_size must be a power of two"):
        onnxopt.optimize(conv_net(), "quant:bits=4,block_size=24", compare=False)


def test_tensorrt_profile_uses_symmetric_int8_activations(digits_model, tmp_path, monkeypatch):
    from models import digits

    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    model, report = onnxopt.optimize(str(digits_model), "quant:profile=tensorrt",
                                     calib=str(digits.calibration_npz()), compare=False)
    zero_points = {i.input[2] for i in model.graph.node if i.op_type == "QuantizeLinear"}
    dtypes = {t.data_type for t in model.graph.initializer if t.name in zero_points}
    assert dtypes == {onnx.TensorProto.INT8}
    assert any("profile=tensorrt" in n for n in report.passes[0]["notes"])


def relu_matmul(rng) -> onnx.ModelProto:
    """y = Relu(x) @ W with a random 8x4 W: one activation, h, read by one MatMul weight."""
    weight = ", ".join(f"{v:.4f}" for v in rng.standard_normal(8 * 4))
    return parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 8] x) => (float[N, 4] y) <float[8, 4] w = {{{weight}}}> {{ h = Relu(x)
        y = MatMul(h, w) }}
    """)


def test_sqnr_report_undoes_smoothing():
    """A smoothed activation is quantized as Q(Mul(x, 1/s)): the report must compare x with DQ * s."""
    from onnxopt.passes.quant import Quantize
    from onnxopt.tensor_compare import compare_tensors

    rng = np.random.default_rng(4)
    model = relu_matmul(rng)
    x = (rng.standard_normal((64, 8)) * np.array([1, 1, 40, 1, 1, 1, 1, 0.1])).astype(np.float32)
    quantized, report = onnxopt.optimize(model, "quant:keep_if_slower=false", calib={"x": x}, compare=False)
    quant = report.passes[0]
    assert quant["counts"]["activations smoothed"] == 1
    assert "h" in {w["tensor"] for w in quant["details"]["worst_tensors"]}
    errors = {e.tensor: e for e in compare_tensors(model, quantized, {"x": x[:8]},
                                                       views=Quantize.tensor_views(quantized))}
    # the dequantized value, not the float h (inf dB), and scaled back (h / s against h: ~0 dB)
    assert 25 < errors["h"].sqnr_db < 80 and errors["h"].cosine > 0.99
    # the report's float side came from the calibration session: it must equal a fresh float run
    reported = {w["tensor"]: w["sqnr_db"] for w in quant["details"]["worst_tensors"]}
    fresh = {e.tensor: e.sqnr_db for e in compare_tensors(model, quantized, {"x": x[:2]},
                                                    views=Quantize.tensor_views(quantized))}
    assert reported["h"] == pytest.approx(fresh["h"], rel=1e-6)


def test_compare_command_sees_quantized_tensors_through_their_dequantize(tmp_path, capsys):
    """`onnxopt compare` learns where an int8 model holds the float tensors from the quant pass."""
    from onnxopt.cli import main

    rng = np.random.default_rng(5)
    model = relu_matmul(rng)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    quantized, _ = onnxopt.optimize(model, "quant:keep_if_slower=false", calib={"x": x}, compare=False)
    onnx.save(model, tmp_path / "fp32.onnx")
    onnx.save(quantized, tmp_path / "int8.onnx")
    np.savez(tmp_path / "x.npz", x=x[:8])
    assert main(["compare", str(tmp_path / "fp32.onnx"), str(tmp_path / "int8.onnx"), "--data",
                 str(tmp_path / "x.npz")]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert 20 < float(rows["h"][1]) < 80  # through its DequantizeLinear: int8 noise, not the float h (inf)


def test_longest_sample_has_no_padding():
    from onnxopt.data.padding import PaddingLayout, longest_sample

    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], np.int64)
    sample = longest_sample({"ids": mask * 7, "attention_mask": mask}, PaddingLayout("attention_mask", ("ids", "attention_mask")))
    assert sample["attention_mask"].tolist() == [[1, 1, 1]] and sample["ids"].tolist() == [[7, 7, 7]]


def test_auto_keeps_the_most_harmful_layers_float_until_the_budget_holds(digits_model, tmp_path, monkeypatch):
    from models import digits

    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    calib = str(digits.calibration_npz())
    spec = "fold,fuse,quant:keep_if_slower=false,auto=true,max_error="
    _, report = _quantize(digits_model, calib, spec + "0.5")
    assert report.passes[-1]["details"]["auto"]["kept_float"] == []
    error_all_int8 = report.passes[-1]["details"]["auto"]["error_before"]
    budget = error_all_int8 / 2
    mixed, report = _quantize(digits_model, calib, spec + f"{budget:.3g}")
    auto = report.passes[-1]["details"]["auto"]
    assert auto["kept_float"] and auto["error_after"] <= budget
    drops = [m["error_drop"] for m in auto["most_sensitive"]]
    assert drops == sorted(drops, reverse=True)
    producers = {o: n for n in mixed.graph.node for o in n.output}
    for output in auto["kept_float"]:  # the kept layers read float inputs, not dequantized ones
        assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear"
                   for i in producers[output].input)
    assert any(n.op_type == "QuantizeLinear" for n in mixed.graph.node)
    # a budget int8 cannot meet anywhere: every layer float, which is the input model
    unchanged, report = _quantize(digits_model, calib, spec + "1e-9")
    assert not report.passes[-1]["changed"] and report.passes[-1]["details"]["auto"]["error_after"] == 0
    assert not any(n.op_type == "QuantizeLinear" for n in unchanged.graph.node)


SCORER = '''
import numpy as np
from models import digits

def logit_agreement(session):
    """Higher is better: minus the mean |logit| error against the float model's logits."""
    images, _ = digits.heldout()
    return -float(np.mean(np.abs(session.run(["logits"], {"image": images})[0] - np.load(REFERENCE))))

def broken(session):
    raise KeyError("logits")
'''


def test_auto_with_a_user_eval_function_meets_its_budget(digits_model, tmp_path, monkeypatch):
    from models import digits

    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    images, _ = digits.heldout()
    reference = ort.InferenceSession(str(digits_model)).run(["logits"], {"image": images})[0]
    np.save(tmp_path / "reference.npy", reference)
    scorer = tmp_path / "scorer.py"
    scorer.write_text(SCORER.replace("REFERENCE", repr(str(tmp_path / "reference.npy"))))
    calib = str(digits.calibration_npz())
    spec = f"fold,fuse,quant:keep_if_slower=false,auto=true,eval={scorer}:logit_agreement,max_error="
    _, report = _quantize(digits_model, calib, spec + "10")
    auto = report.passes[-1]["details"]["auto"]
    assert auto["kept_float"] == [] and auto["error_before"] > 0 and "logit_agreement" in auto["measure"]
    budget = auto["error_before"] / 3
    mixed, report = _quantize(digits_model, calib, spec + f"{budget:.4g}")
    auto = report.passes[-1]["details"]["auto"]
    assert auto["kept_float"] and auto["error_after"] <= budget
    error = -float(np.mean(np.abs(ort.InferenceSession(mixed.SerializeToString()).run(["logits"], {"image": images})[0]
                                  - reference)))
    # The budget holds for the model returned. auto measures against the model quant received (after
    # fold,fuse), this reference is the original: the two float models differ by ~1e-6, which is all
    # there is to see when every layer ended up float (as on a VNNI CPU, with 8-bit weights).
    assert -error == pytest.approx(auto["error_after"], rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("option,message", [
    ("auto=true,eval={scorer}:broken", "eval function .*:broken failed on the float model: KeyError"),
    ("auto=true,eval={scorer}:nope", "has no attribute 'nope'"),
    ("auto=true,eval=no_such_module_xyz:f", "cannot import 'no_such_module_xyz' for quant:auto's eval"),
    ("auto=true,eval=justtext", "'justtext' for quant:auto's eval is not module:function"),
    ("eval={scorer}:broken", "eval is the accuracy measure of auto mode: add auto=true"),
])
def test_a_bad_eval_function_is_one_clear_error(digits_model, tmp_path, option, message):
    from models import digits

    scorer = tmp_path / "scorer.py"
    scorer.write_text(SCORER.replace("REFERENCE", "'missing.npy'"))
    with pytest.raises(OnnxoptError, match=message):
        onnxopt.optimize(str(digits_model), "quant:" + option.format(scorer=scorer),
                         calib=str(digits.calibration_npz()), compare=False)


def test_a_one_shot_iterator_calibrates_once_and_still_gets_a_report(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    x = np.random.default_rng(3).standard_normal((32, 2, 6, 6)).astype(np.float32)
    batches = ({"x": x[i:i + 8]} for i in range(0, 32, 8))
    _, report = onnxopt.optimize(conv_net(), "quant:keep_if_slower=false", calib=batches, compare=False)
    details = report.passes[0]["details"]
    assert details["calibration_samples"] == 32 and details["worst_tensors"]  # every batch, and the report's
    batches = ({"x": x[i:i + 8]} for i in range(0, 32, 8))
    _, report = onnxopt.optimize(conv_net(), "quant", calib=batches, compare=False)
    assert report.passes[0]["details"]["speed_check"]  # timed on the first batch, read ahead
    with pytest.raises(OnnxoptError, match="quant:auto reads the calibration data more than once"):
        onnxopt.optimize(conv_net(), "quant:auto=true", calib=iter([{"x": x}]), compare=False)


def test_a_static_shaped_matmul_bias_is_quantized_so_ort_keeps_int8_compute(tmp_path):
    """With a fixed input shape, ORT fuses MatMul + Add(float bias) into Gemm before its QDQ fusions and
    then runs the weights dequantized on every call (MiniLM at [1, 128]: int8 0.70x of fp32). The bias
    quantized as Gemm's (int32, scale = input scale x weight scale) keeps every layer a QGemm."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    d, h = 64, 256
    inits = [numpy_helper.from_array((rng.standard_normal((d, h)) / 8).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal(h) * 0.1).astype(np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((h, d)) / 16).astype(np.float32), "w2"),
             numpy_helper.from_array((rng.standard_normal(d) * 0.1).astype(np.float32), "b2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["m2"]),
             helper.make_node("Add", ["m2", "b2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((64, 32, d)).astype(np.float32)
    quantized, report = onnxopt.optimize(model, "quant:keep_if_slower=false", calib={"x": x}, compare=False)
    assert report.passes[0]["counts"]["biases quantized"] == 2
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "ort.onnx")
    ort.InferenceSession(quantized.SerializeToString(), options, providers=["CPUExecutionProvider"])
    runs = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert runs.count("QGemm") == 2 and "DequantizeLinear" not in runs, runs
    got, want = ort_run(quantized, {"x": x[:1]})[0].ravel(), ort_run(model, {"x": x[:1]})[0].ravel()
    assert got @ want / np.linalg.norm(got) / np.linalg.norm(want) > 0.99


def test_a_bias_two_matmuls_share_stays_float_and_both_layers_stay_right():
    """fold merges equal biases (zeros, often): one int32 bias cannot carry two layers' scales."""
    rng = np.random.default_rng(1)
    model = parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 8, 16] x) => (float[1, 8, 16] y)
    <float[16, 16] w1 = {{{", ".join(f"{v:.4f}" for v in rng.standard_normal(256) / 4)}}},
     float[16, 16] w2 = {{{", ".join(f"{v:.4f}" for v in rng.standard_normal(256) * 2)}}},
     float[16] b = {{{", ".join(f"{v:.4f}" for v in rng.standard_normal(16))}}}>
    {{ m1 = MatMul(x, w1)
       h = Add(m1, b)
       m2 = MatMul(h, w2)
       y = Add(m2, b) }}
    """)
    x = rng.standard_normal((64, 8, 16)).astype(np.float32)
    quantized, report = onnxopt.optimize(model, "quant:keep_if_slower=false,bias_correction=false", calib={"x": x},
                                         compare=False)
    assert "biases quantized" not in report.passes[0]["counts"]
    got, want = ort_run(quantized, {"x": x[:1]})[0].ravel(), ort_run(model, {"x": x[:1]})[0].ravel()
    assert got @ want / np.linalg.norm(got) / np.linalg.norm(want) > 0.99
