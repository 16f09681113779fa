"""Models of the kinds people deploy, through `fold,fuse,quant` with data as their users write it
(models/deployed.py builds them): old opsets, inputs without a leading batch axis, recurrent layers,
weights in Constant nodes, wrong output declarations, networks inside If branches."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import ort_run

import onnxopt
from onnxopt.errors import OnnxoptError

pytest.importorskip("torch")
from models import deployed  # noqa: E402

GUARD_OFF = "fold,fuse,quant:keep_if_slower=false"


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def entries(feeds: dict, index: int) -> dict:
    return {k: np.asarray(v[index]) for k, v in feeds.items()}


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("deployed")


def test_an_lstm_at_opset_12_with_one_feed_per_entry_quantizes(folder, monkeypatch):
    monkeypatch.setenv("ONNXOPT_CACHE", str(folder / "cache"))
    path = deployed.lstm_tagger(folder)
    calib, held_out = deployed.recurrent_feeds(path, 32), deployed.recurrent_feeds(path, 4, seed=9)
    model, report = onnxopt.optimize(str(path), GUARD_OFF, calib=calib, compare=False)
    quant = report.passes[-1]
    assert any("opset 12 upgraded to 13" in n for n in quant["notes"])
    assert quant["counts"]["LSTMs quantized (DynamicQuantizeLSTM)"] == 1 and "DynamicQuantizeLSTM" in ops(model)
    assert quant["details"]["calibration_samples"] == 32  # one feed per entry, run one at a time
    original = onnx.load(str(path))
    for i in range(4):
        assert cosine(ort_run(original, entries(held_out, i))[0], ort_run(model, entries(held_out, i))[0]) > 0.999
    # with the speed guard, the choice is measured and said
    _, report = onnxopt.optimize(str(path), "fold,fuse,quant", calib=calib, compare=False)
    quant = report.passes[-1]
    assert "lstm_speed_check" in quant["details"] or "speed_check" in quant["details"]
    assert quant["counts"].get("LSTMs quantized (DynamicQuantizeLSTM)") or any(
        "kept float" in n or "does not pay" in n for n in quant["notes"])


def test_a_gru_stays_float_and_the_report_says_why(folder, monkeypatch):
    monkeypatch.setenv("ONNXOPT_CACHE", str(folder / "cache"))
    path = deployed.gru_tagger(folder)
    model, report = onnxopt.optimize(str(path), GUARD_OFF, calib=deployed.recurrent_feeds(path, 16),
                                     compare=False)
    assert "GRU" in ops(model)
    assert any("GRU" in n and "no int8 kernel" in n for n in report.passes[-1]["notes"])


def test_a_cnn_at_opset_11_gets_per_channel_weights(folder, monkeypatch):
    monkeypatch.setenv("ONNXOPT_CACHE", str(folder / "cache"))
    path = deployed.cnn_opset11(folder)
    images = np.random.default_rng(3).standard_normal((64, 1, 8, 8)).astype(np.float32)
    model, report = onnxopt.optimize(str(path), GUARD_OFF, calib={"image": images}, compare=False)
    assert any("opset 11 upgraded to 13" in n for n in report.passes[-1]["notes"])
    weight_dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute)]
    assert len(weight_dqs) >= 2  # per channel: opset 13's axis
    fp32, int8 = ort_run(onnx.load(str(path)), {"image": images})[0], ort_run(model, {"image": images})[0]
    assert np.mean(fp32.argmax(1) == int8.argmax(1)) >= 0.95 and cosine(fp32, int8) > 0.99


def test_an_opset_that_cannot_be_upgraded_falls_back_to_per_tensor_qdq(folder, monkeypatch):
    import onnxopt.opsets

    def fails(model, target):
        raise RuntimeError("no adapter for the test's op")

    monkeypatch.setenv("ONNXOPT_CACHE", str(folder / "cache"))
    monkeypatch.setattr(onnxopt.opsets, "upgrade_opset", fails)
    path = deployed.cnn_opset11(folder)
    images = np.random.default_rng(3).standard_normal((32, 1, 8, 8)).astype(np.float32)
    model, report = onnxopt.optimize(str(path), GUARD_OFF, calib={"image": images}, compare=False)
    assert any("could not be upgraded to 13 (RuntimeError: no adapter" in n and "per-tensor QDQ at opset 11" in n
               for n in report.passes[-1]["notes"])
    assert next(i.version for i in model.opset_import if i.domain == "") == 11
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dqs and not any(a.name == "axis" for n in dqs for a in n.attribute)
    fp32, int8 = ort_run(onnx.load(str(path)), {"image": images})[0], ort_run(model, {"image": images})[0]
    assert cosine(fp32, int8) > 0.99


def test_weights_in_constant_nodes_quantize_per_channel(folder, monkeypatch):
    from models import digits

    monkeypatch.setenv("ONNXOPT_CACHE", str(folder / "cache"))
    path = deployed.constant_weights(folder)
    images = digits.heldout()[0][:64]
    model, report = onnxopt.optimize(str(path), "quant:keep_if_slower=false", calib={"image": images}, compare=False)
    quant = report.passes[-1]
    assert quant["counts"]["weights quantized"] >= 3 and any("Constant node(s) moved" in n for n in quant["notes"])
    assert any(n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute) for n in model.graph.node)
    fp32, int8 = ort_run(onnx.load(str(path)), {"image": images})[0], ort_run(model, {"image": images})[0]
    assert np.mean(fp32.argmax(1) == int8.argmax(1)) >= 0.95


def test_a_wrong_output_declaration_is_named_and_the_values_trusted(folder, monkeypatch):
    from models import digits

    monkeypatch.setenv("ONNXOPT_CACHE", str(folder / "cache"))
    model = onnx.load(str(digits.build()))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 5  # it computes 10 classes
    images = digits.heldout()[0][:32]
    out, report = onnxopt.optimize(model, GUARD_OFF, calib={"image": images}, data={"image": images}, runs=0)
    assert any("output 'logits' is declared ['batch', 5] but ONNX Runtime returns [32, 10]" in n for n in report.notes)
    assert any("shape inference is checked without them" in n for n in report.notes)
    assert report.agreement.top1 >= 0.95 and "QuantizeLinear" in ops(out)


def test_mixed_layouts_in_one_file_fail_in_one_line(folder):
    path = deployed.lstm_tagger(folder)
    feeds = deployed.recurrent_feeds(path, 4)
    feeds["h0"] = feeds["h0"][:, 0]  # the state stacks samples, x holds one feed per entry
    with pytest.raises(OnnxoptError, match="mixes layouts: c0, x hold one feed per entry .* h0 stack samples"):
        onnxopt.optimize(str(path), "quant", calib=feeds, compare=False)


STREAM = {"features": 512, "hidden": 1024}


def test_a_network_inside_if_branches_is_calibrated_and_quantized_there(folder, monkeypatch):
    """Values inside the branch are calibrated (carried out of the If for the calibration session),
    QDQ goes inside the branch, what only the branch the data never took computes stays float, and
    the speed guard decides on the whole (on this size int8 pays; at batch 1 of a [1, 128] input it
    would not)."""
    monkeypatch.setenv("ONNXOPT_CACHE", str(folder / "cache"))
    path = deployed.streaming_if(folder, **STREAM)
    calib = deployed.streaming_feeds(24, mode=0, batch=16, **STREAM)
    model, report = onnxopt.optimize(str(path), GUARD_OFF, calib=calib, compare=False)
    quant = report.passes[-1]
    branches = {a.name: a.g for n in model.graph.node if n.op_type == "If" for a in n.attribute}
    assert quant["changed"], quant["notes"]
    assert "QuantizeLinear" in [n.op_type for n in branches["else_branch"].node]  # the path calibration ran
    # the fast path never ran: its first MatMul reads the calibrated input x, its second the Relu
    # inside the branch, which has no range and stays float
    assert [n.op_type for n in branches["then_branch"].node].count("MatMulInteger") == 0
    assert any("fast_path_r never ran on the calibration data" in s for s in quant["skipped"])
    original = onnx.load(str(path))
    for mode in (0, 1):
        feeds = entries(deployed.streaming_feeds(1, mode=mode, seed=11, batch=16, **STREAM), 0)
        for ref, got in zip(ort_run(original, feeds), ort_run(model, feeds)):
            assert cosine(ref, got) > 0.999
    _, report = onnxopt.optimize(str(path), "fold,fuse,quant", calib=calib, compare=False)  # with the guard
    quant = report.passes[-1]
    assert quant["details"]["speed_check"]  # measured, 2.5x faster on a VNNI CPU; kept float if slower:
    assert quant["changed"] or any("does not pay" in n for n in quant["notes"])


@pytest.mark.parametrize("spec", ["prune:ratio=0.5", "prune:structure=2:4", "lowrank:ratio=0.5"])
def test_prune_and_lowrank_say_they_leave_a_network_inside_if_branches_alone(folder, spec):
    path = deployed.streaming_if(folder, **STREAM)
    calib = deployed.streaming_feeds(16, mode=0, batch=16, **STREAM)
    model, report = onnxopt.optimize(str(path), spec, calib=calib, compare=False)
    record = report.passes[-1]
    assert not record["changed"]
    assert any("layer(s) inside If/Loop/Scan bodies left as they are" in n for n in record["notes"]), record


def test_fold_and_fuse_work_inside_if_branches():
    from conftest import parse

    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 2, 4, 4] x, bool flag) => (float[1, 2, 4, 4] y)
    <float[2, 2, 1, 1] w = {1, 0.5, -0.5, 1}, float[2] g = {2, 3}, float[2] b = {0.1, 0.2},
     float[2] m = {0.0, 0.5}, float[2] v = {1, 4}, float two = {2}>
    {
        y = If(flag) <then_branch = t () => (float[1, 2, 4, 4] yt) {
                          c = Conv(x, w)
                          yt = BatchNormalization(c, g, b, m, v)
                      }, else_branch = e () => (float[1, 2, 4, 4] ye) {
                          s = Mul(two, two)
                          dead = Neg(x)
                          ye = Mul(x, s)
                      }>
    }
    """)
    folded, report = onnxopt.optimize(model, "fold,fuse", compare=False)
    counts = {k: v for p in report.passes for k, v in p["counts"].items()}
    assert counts["Conv+BatchNormalization"] == 1 and counts["subgraph nodes folded"] >= 1
    assert counts["subgraph dead nodes removed"] >= 1
    branches = {a.name: [n.op_type for n in a.g.node] for n in folded.graph.node for a in n.attribute}
    assert branches == {"then_branch": ["Conv"], "else_branch": ["Mul"]}
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32)
    for flag in (True, False):
        feeds = {"x": x, "flag": np.array(flag)}
        np.testing.assert_allclose(ort_run(folded, feeds)[0], ort_run(model, feeds)[0], rtol=1e-5, atol=1e-6)


def test_a_float16_model_prunes_in_float16_and_quant_and_lowrank_say_why_they_leave_it(folder):
    path = deployed.float16(folder)
    images = np.load(deployed.REPO / "models" / "demo_inputs.npz")["image"].astype(np.float16)
    model, report = onnxopt.optimize(str(path), "prune:ratio=0.5,keep_if_slower=false", calib={"image": images},
                                     compare=False)
    assert report.passes[0]["changed"] and report.optimized.parameters < report.original.parameters
    kept_types = {t.data_type for t in model.graph.initializer if t.dims}
    assert kept_types <= {onnx.TensorProto.FLOAT16, onnx.TensorProto.INT64}
    assert ort_run(model, {"image": images})[0].dtype == np.float16
    _, report = onnxopt.optimize(str(path), "quant", calib={"image": images}, compare=False)
    assert any("float16 weights" in s and "float32" in s for s in report.passes[0]["skipped"])
    _, report = onnxopt.optimize(str(path), "lowrank", calib={"image": images}, compare=False)
    skipped = report.passes[0]["skipped"]
    assert any(s.startswith("4 layer(s) with float16 weights") for s in skipped) and len(skipped) == 2
