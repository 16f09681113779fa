"""The `distill` pass: the ONNX graph run by torch reproduces ONNX Runtime (op by op, on the digits
CNN, MiniLM and the light models), refuses what it cannot run, trains the student towards the
teacher (loss down, outputs closer, deterministic by seed), keeps recorded zeros, and recovers a
pruned digits CNN."""
from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from conftest import ort_run
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt import OnnxoptError

torch = pytest.importorskip("torch")
from onnxopt.passes.distill.torch_graph import TorchGraph, as_tensors, unsupported  # noqa: E402

RNG = np.random.default_rng(0)


def torch_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    graph = TorchGraph(model)
    with torch.no_grad():
        out = graph(as_tensors(feeds, graph.input_names))
    return [out[name].numpy() for name in graph.output_names]


def assert_matches_ort(model, feeds, rtol=1e-5):
    for got, ref in zip(torch_run(model, feeds), ort_run(model, feeds), strict=True):
        assert got.shape == ref.shape and got.dtype == ref.dtype
        scale = max(float(np.max(np.abs(ref))), 1e-6) if ref.size else 1.0
        assert float(np.max(np.abs(got.astype(np.float64) - ref), initial=0)) <= rtol * scale


def one_node(op, inputs, attrs=None, inits=None, opset=17, outputs=1):
    """A model of one `op` node over `inputs` {name: array} and constant `inits`; its outputs have the
    element type of the first input."""
    inits = inits or {}
    node = helper.make_node(op, list(inputs) + list(inits), [f"y{i}" for i in range(outputs)], **(attrs or {}))
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                      for k, v in inputs.items()],
        [helper.make_tensor_value_info(f"y{i}", helper.np_dtype_to_tensor_dtype(next(iter(inputs.values())).dtype),
                                       None) for i in range(outputs)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def i64(*values):
    return np.array(values, dtype=np.int64)


OP_CASES = {
    "gemm transA transB alpha beta": ("Gemm", {"a": f32(5, 3)}, dict(transA=1, transB=1, alpha=0.5, beta=2.0),
                                      {"b": f32(4, 5), "c": f32(4)}, 17),
    "conv asymmetric pads, groups, dilation": ("Conv", {"x": f32(1, 4, 9, 9)},
                                               dict(pads=[0, 1, 2, 1], group=2, dilations=[2, 1], strides=[1, 2]),
                                               {"w": f32(6, 2, 3, 3), "b": f32(6)}, 17),
    "conv SAME_UPPER": ("Conv", {"x": f32(1, 2, 7, 8)}, dict(auto_pad="SAME_UPPER", strides=[2, 2]),
                        {"w": f32(3, 2, 3, 3)}, 17),
    "maxpool SAME_LOWER ceil": ("MaxPool", {"x": f32(1, 2, 7, 7)}, dict(kernel_shape=[3, 3], strides=[2, 2],
                                                                       auto_pad="SAME_LOWER"), {}, 17),
    "maxpool ceil_mode": ("MaxPool", {"x": f32(1, 2, 8, 8)}, dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
                          {}, 17),
    "averagepool asymmetric, pads not counted": ("AveragePool", {"x": f32(1, 2, 7, 7)},
                                                 dict(kernel_shape=[3, 3], pads=[0, 0, 1, 1]), {}, 17),
    "averagepool pads counted": ("AveragePool", {"x": f32(1, 2, 6, 6)},
                                 dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1), {}, 17),
    "softmax opset 11 (2-D coercion)": ("Softmax", {"x": f32(2, 3, 4)}, dict(axis=1), {}, 11),
    "softmax opset 13": ("Softmax", {"x": f32(2, 3, 4)}, dict(axis=1), {}, 13),
    "slice negative step": ("Slice", {"x": f32(6, 5)}, {}, {"s": i64(-1, 4), "e": i64(-10, 0), "a": i64(0, 1),
                                                            "st": i64(-2, -1)}, 17),
    "slice clamped ends": ("Slice", {"x": f32(6, 5)}, {}, {"s": i64(1), "e": i64(2**62), "a": i64(-1)}, 17),
    "gather negative indices": ("Gather", {"x": f32(5, 3)}, dict(axis=0), {"i": i64(-1, 0, -2).reshape(3, 1)}, 17),
    "reduce mean axes attribute": ("ReduceMean", {"x": f32(2, 3, 4)}, dict(axes=[1, -1], keepdims=0), {}, 13),
    "reduce sum axes input": ("ReduceSum", {"x": f32(2, 3, 4)}, dict(keepdims=1), {"a": i64(0, 2)}, 13),
    "reduce l2 (F.normalize)": ("ReduceL2", {"x": f32(2, 3, 4)}, dict(axes=[1], keepdims=1), {}, 17),
    "reduce l1 axes input": ("ReduceL1", {"x": f32(2, 3, 4)}, dict(keepdims=0), {"a": i64(-1)}, 18),
    "layernorm axis 1": ("LayerNormalization", {"x": f32(2, 3, 4)}, dict(axis=1, epsilon=1e-3),
                         {"s": f32(3, 4), "b": f32(3, 4)}, 17),
    "batchnorm": ("BatchNormalization", {"x": f32(2, 3, 4, 4)}, dict(epsilon=1e-3),
                  {"s": f32(3), "b": f32(3), "m": f32(3), "v": np.abs(f32(3)) + 0.1}, 15),
    "reshape with 0 and -1": ("Reshape", {"x": f32(2, 3, 4)}, {}, {"shape": i64(0, -1)}, 17),
    "expand": ("Expand", {"x": f32(3, 1)}, {}, {"shape": i64(2, 1, 4)}, 17),
    "squeeze opset 11": ("Squeeze", {"x": f32(1, 3, 1)}, dict(axes=[0, -1]), {}, 11),
    "unsqueeze opset 13": ("Unsqueeze", {"x": f32(3, 4)}, {}, {"a": i64(0, -1)}, 13),
    "clip opset 6 attributes": ("Clip", {"x": f32(4, 4)}, dict(min=-0.5, max=0.5), {}, 6),
    "flatten axis 2": ("Flatten", {"x": f32(2, 3, 4, 5)}, dict(axis=2), {}, 17),
    "lrn": ("LRN", {"x": f32(1, 6, 4, 4)}, dict(size=3, alpha=1e-3, beta=0.7, bias=2.0), {}, 17),
    "gelu tanh": ("Gelu", {"x": f32(3, 4)}, dict(approximate="tanh"), {}, 20),
    "gathernd": ("GatherND", {"x": f32(2, 3, 4)}, {}, {"i": np.array([[1, 2], [0, -1], [1, 0]], np.int64)}, 13),
    "gathernd batch_dims": ("GatherND", {"x": f32(2, 3, 4)}, dict(batch_dims=1),
                            {"i": np.array([[[2], [0]], [[1], [-1]]], np.int64)}, 13),
    "pad constant": ("Pad", {"x": f32(2, 3)}, {}, {"p": i64(0, 1, 2, 0), "v": np.array(1.5, np.float32)}, 17),
    "cos (rotary embeddings)": ("Cos", {"x": f32(3, 4)}, {}, {}, 17),
    "sin": ("Sin", {"x": f32(3, 4)}, {}, {}, 17),
    "softplus": ("Softplus", {"x": f32(3, 4)}, {}, {}, 17),
    "floor": ("Floor", {"x": f32(3, 4) * 3}, {}, {}, 17),
    "ceil": ("Ceil", {"x": f32(3, 4) * 3}, {}, {}, 17),
    "sign": ("Sign", {"x": f32(3, 4)}, {}, {}, 17),
    "trilu lower, k = -1": ("Trilu", {"x": f32(2, 4, 5)}, dict(upper=0), {"k": np.array(-1, np.int64)}, 17),
    "trilu upper (a causal mask)": ("Trilu", {"x": f32(4, 4)}, {}, {"k": np.array(1, np.int64)}, 17),
    "cumsum exclusive reverse": ("CumSum", {"x": f32(2, 5)}, dict(exclusive=1, reverse=1),
                                 {"a": np.array(1, np.int64)}, 17),
    "cumsum (position ids from a mask)": ("CumSum", {"x": f32(2, 5)}, {}, {"a": np.array(-1, np.int64)}, 17),
}


@pytest.mark.parametrize("case", list(OP_CASES))
def test_each_op_matches_onnx_runtime(case):
    op, inputs, attrs, inits, opset = OP_CASES[case]
    assert_matches_ort(one_node(op, inputs, attrs, inits, opset), inputs)


def test_split_into_equal_parts_and_integer_division():
    inputs = {"x": f32(7, 2)}
    assert_matches_ort(one_node("Split", inputs, dict(axis=0, num_outputs=3), opset=18, outputs=3), inputs)
    ints = {"a": np.array([7, -7, 9], np.int64), "b": np.array([2, 2, -4], np.int64)}
    assert_matches_ort(one_node("Div", ints), ints)


def test_the_digits_cnn_runs_in_torch_as_in_onnx_runtime(digits_model):
    from models import digits

    images, _ = digits.heldout()
    assert_matches_ort(onnx.load(str(digits_model)), {"image": images[:64]})


@pytest.mark.slow
def test_minilm_and_the_light_models_run_in_torch_as_in_onnx_runtime(minilm_model):
    from models import light, minilm

    feeds = {k: v[:8] for k, v in np.load(minilm.calibration_npz()).items()}
    assert_matches_ort(onnx.load(str(minilm_model)), feeds)
    for name in light.light_models():
        path, inputs, _ = light.light_case(name)
        model = onnx.load(str(path))
        assert not unsupported(model), name
        assert_matches_ort(model, inputs)


def test_weights_written_back_untrained_leave_the_model_as_it_was(digits_model):
    model = onnx.load(str(digits_model))
    graph = TorchGraph(model)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    assert graph.write_back(copy) == len(list(graph.parameters())) > 0
    assert copy.SerializeToString() == model.SerializeToString()


def test_a_graph_it_cannot_run_is_refused_in_one_line():
    inputs = {"x": f32(2, 3)}
    model = one_node("Relu", inputs)
    custom = helper.make_node("FusedMatMul", ["x", "x"], ["z"], domain="com.microsoft")
    model.graph.node.append(custom)
    model.graph.node.append(helper.make_node("Mod", ["x", "x"], ["m"]))
    with pytest.raises(OnnxoptError) as err:
        TorchGraph(model)
    message = str(err.value)
    assert "com.microsoft.FusedMatMul" in message and "Mod" in message and "\n" not in message


# -- training -----------------------------------------------------------------------------------

def mlp(w1, w2) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def teacher_and_student(tmp_path, monkeypatch):
    """A teacher MLP saved to a file, a student that is the teacher with noise, and 512 samples."""
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path / "cache"))
    w1, w2 = f32(16, 32) / 4, f32(32, 8) / 6
    onnx.save(mlp(w1, w2), tmp_path / "teacher.onnx")
    student = mlp(w1 + f32(16, 32) * 0.1, w2 + f32(32, 8) * 0.1)
    return tmp_path / "teacher.onnx", student, {"x": f32(512, 16)}


def distance(a, b, feeds):
    return float(np.mean((ort_run(a, feeds)[0] - ort_run(b, feeds)[0]) ** 2))


def test_training_brings_the_student_to_the_teacher_deterministically(teacher_and_student):
    teacher_path, student, data = teacher_and_student
    spec = f"distill:teacher={teacher_path},epochs=4,lr=3e-3,loss=mse"
    trained, report = onnxopt.optimize(student, spec, train=data, compare=False, runs=0)
    again, second = onnxopt.optimize(student, spec, train=data, compare=False, runs=0)
    details = report.passes[0]["details"]
    assert details["held_out_loss_after"] < 0.5 * details["held_out_loss_before"]
    assert distance(trained, onnx.load(str(teacher_path)), data) < 0.5 * distance(student, onnx.load(str(teacher_path)), data)
    assert details["teacher_cache"]["hit"] is False and second.passes[0]["details"]["teacher_cache"]["hit"] is True
    assert [n.op_type for n in trained.graph.node] == [n.op_type for n in student.graph.node]
    assert trained.SerializeToString() == again.SerializeToString()  # same seed, same weights


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_both_precisions_train_and_the_report_names_the_one_used(teacher_and_student, precision):
    teacher_path, student, data = teacher_and_student
    trained, report = onnxopt.optimize(student, f"distill:teacher={teacher_path},epochs=4,lr=3e-3,loss=mse,"
                                                f"precision={precision}", train=data, compare=False, runs=0)
    details = report.passes[0]["details"]
    assert details["precision"] == precision
    assert details["held_out_loss_after"] < 0.5 * details["held_out_loss_before"]  # measured in float32 both ways
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in trained.graph.initializer)  # weights stay float32


def test_auto_precision_is_bf16_only_where_the_cpu_multiplies_it_natively(monkeypatch):
    import torch

    from onnxopt.passes.distill import _precision

    for amx, avx512_bf16, expected in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        assert _precision(torch, "auto") == expected
        assert _precision(torch, "fp32") == "fp32" and _precision(torch, "bf16") == "bf16"


def test_auto_loss_is_kl_on_class_scores():
    from onnxopt.passes.distill.train import loss_kinds

    kinds = loss_kinds(["logits", "probs", "hidden"], [(8, 10), (8, 10), (8, 12, 384)], {"probs"}, "auto")
    assert kinds == {"logits": "kl", "probs": "kl-probabilities", "hidden": "mse+cosine"}


def test_recorded_zeros_stay_zero_through_training(teacher_and_student):
    from onnxopt import sparsity

    teacher_path, student, data = teacher_and_student
    sparse, _ = onnxopt.optimize(student, "prune:structure=2:4,keep_if_slower=false", calib=data, compare=False,
                                 runs=0)
    zeros_before = {t.name: numpy_helper.to_array(t) == 0 for t in sparse.graph.initializer}
    trained, _ = onnxopt.optimize(sparse, f"distill:teacher={teacher_path},epochs=2,lr=3e-3,loss=mse", train=data,
                                  compare=False, runs=0)
    for t in trained.graph.initializer:
        w = numpy_helper.to_array(t)
        assert np.all(w[zeros_before[t.name]] == 0)
        assert np.any(w != numpy_helper.to_array(next(s for s in sparse.graph.initializer if s.name == t.name)))
    assert all(check.holds for check in sparsity.verify(trained))


def test_a_low_rank_pair_trains_as_two_factors(teacher_and_student):
    teacher_path, student, data = teacher_and_student
    factored, _ = onnxopt.optimize(student, "lowrank:rank=4,keep_if_slower=false", calib=data, compare=False, runs=0)
    shapes = {t.name: tuple(t.dims) for t in factored.graph.initializer}
    assert len(factored.graph.node) > len(student.graph.node) and sorted(shapes.values()).count((4, 8)) == 1
    trained, report = onnxopt.optimize(factored, f"distill:teacher={teacher_path},epochs=4,lr=3e-3,loss=mse",
                                       train=data, compare=False, runs=0)
    details = report.passes[0]["details"]
    assert details["held_out_loss_after"] < 0.7 * details["held_out_loss_before"]  # rank 4 cannot reach 0
    # the pair is not multiplied back into one matrix: same nodes, same thin shapes, each factor trained
    assert [n.op_type for n in trained.graph.node] == [n.op_type for n in factored.graph.node]
    assert {t.name: tuple(t.dims) for t in trained.graph.initializer} == shapes
    before = {t.name: numpy_helper.to_array(t) for t in factored.graph.initializer}
    assert all(np.any(numpy_helper.to_array(t) != before[t.name]) for t in trained.graph.initializer)


def test_a_pruned_digits_cnn_recovers_its_accuracy(digits_model, tmp_path, monkeypatch):
    from models import digits

    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    images, labels = digits.heldout()
    train = {"image": digits._split()[0]}

    def top1(model):
        return float(np.mean(ort_run(model, {"image": images})[0].argmax(1) == labels))

    pipeline = "fold,fuse,prune:ratio=0.5,keep_if_slower=false"
    pruned, _ = onnxopt.optimize(str(digits_model), pipeline, calib=str(digits.calibration_npz()), compare=False,
                                 runs=0)
    distilled, report = onnxopt.optimize(str(digits_model), pipeline + ",distill:epochs=10,lr=1e-3",
                                         calib=str(digits.calibration_npz()), train=train, compare=False, runs=0)
    fp32 = top1(onnx.load(str(digits_model)))
    assert top1(distilled) >= max(top1(pruned), fp32 - 0.01)
    assert [t.dims for t in distilled.graph.initializer] == [t.dims for t in pruned.graph.initializer]


def test_training_data_falls_back_to_the_representative_data_and_says_so(teacher_and_student):
    teacher_path, student, data = teacher_and_student
    _, report = onnxopt.optimize(student, f"distill:teacher={teacher_path},epochs=1",
                                 calib=data, compare=False, runs=0)
    assert any("calibration" in note for note in report.passes[0]["notes"])


def test_without_torch_one_line_says_how_to_install_it(teacher_and_student, monkeypatch):
    teacher_path, student, data = teacher_and_student
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(OnnxoptError, match=r"onnxopt\[train\]"):
        onnxopt.optimize(student, f"distill:teacher={teacher_path}", train=data, compare=False, runs=0)


@pytest.mark.parametrize("spec, message", [
    ("distill:epochs=0", "epochs"), ("distill:lr=0", "lr"), ("distill:outputs=nope", "no tensor 'nope'"),
    ("distill:precision=fp16", "precision"),
])
def test_bad_options_fail_in_one_line(teacher_and_student, spec, message):
    teacher_path, student, data = teacher_and_student
    with pytest.raises(OnnxoptError, match=message):
        onnxopt.optimize(student, f"{spec},teacher={teacher_path}", train=data, compare=False, runs=0)


# -- a student of the user's own ----------------------------------------------------------------

def small_student():
    """A torch MLP with 8 hidden units where the teacher has 32 (used as file.py:small_student)."""
    class Small(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.fc2 = torch.nn.Linear(16, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    return Small()


def test_a_smaller_torch_student_is_trained_and_exported_with_the_teachers_names(teacher_and_student):
    teacher_path, _, data = teacher_and_student
    teacher = onnx.load(str(teacher_path))
    spec = f"distill:student={__file__}:small_student,epochs=20,lr=3e-3,loss=mse"
    student, report = onnxopt.optimize(str(teacher_path), spec, train=data, compare=False, runs=0)
    assert [i.name for i in student.graph.input] == ["x"] and [o.name for o in student.graph.output] == ["y"]
    weights = sum(int(np.prod(t.dims)) for t in student.graph.initializer)
    assert weights == 16 * 8 + 8 + 8 * 8 + 8
    details = report.passes[0]["details"]
    assert details["held_out_loss_after"] < 0.5 * details["held_out_loss_before"]
    untrained = small_student()
    with torch.no_grad():
        before = untrained(torch.from_numpy(data["x"])).numpy()
    target = ort_run(teacher, data)[0]
    assert np.mean((ort_run(student, data)[0] - target) ** 2) < 0.5 * np.mean((before - target) ** 2)


def test_a_student_that_is_not_a_module_or_misses_an_input_is_one_line(teacher_and_student, tmp_path):
    teacher_path, _, data = teacher_and_student
    (tmp_path / "students.py").write_text(
        "import torch\n"
        "def number():\n    return 3\n"
        "class Wrong(torch.nn.Module):\n    def forward(self, image):\n        return image\n"
        "def wrong():\n    return Wrong()\n")
    for name, message in (("number", "not a torch.nn.Module"), ("wrong", "takes 'image'")):
        with pytest.raises(OnnxoptError, match=message):
            onnxopt.optimize(str(teacher_path), f"distill:student={tmp_path / 'students.py'}:{name}", train=data,
                             compare=False, runs=0)


def test_the_distill_command_trains_exports_and_compresses_the_student(teacher_and_student, tmp_path, capsys):
    from onnxopt.cli import main

    teacher_path, _, data = teacher_and_student
    np.savez(tmp_path / "train.npz", **data)
    out = tmp_path / "student.onnx"
    rc = main(["distill", str(teacher_path), "--student", f"{__file__}:small_student", "--train",
               str(tmp_path / "train.npz"), "--with", "epochs=2,loss=mse", "-p", "fold", "-o", str(out), "--runs", "0"])
    assert rc == 0 and "distill" in capsys.readouterr().out
    student = onnx.load(str(out))
    assert sum(int(np.prod(t.dims)) for t in student.graph.initializer) == 16 * 8 + 8 + 8 * 8 + 8
    assert main(["distill", str(teacher_path), "--train", str(tmp_path / "train.npz")]) == 2
    err = capsys.readouterr().err
    assert "--student" in err and "Traceback" not in err


@pytest.mark.slow
def test_the_minilm_student_trains_and_exports_with_the_teachers_inputs_and_output(minilm_model, tmp_path, monkeypatch):
    from models import minilm

    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    spec = "distill:student=models.minilm:student,epochs=1,samples=64,batch_size=16,lr=3e-4"
    student, report = onnxopt.optimize(str(minilm_model), spec, train=str(minilm.calibration_npz()), compare=False,
                                       runs=0)
    teacher = onnx.load(str(minilm_model))
    assert [i.name for i in student.graph.input] == [i.name for i in teacher.graph.input]
    assert [o.name for o in student.graph.output] == ["last_hidden_state"]
    assert sum(n.op_type == "Softmax" for n in student.graph.node) == 3  # three attention layers of six
    feeds = {k: v[:4] for k, v in np.load(minilm.calibration_npz()).items()}
    assert ort_run(student, feeds)[0].shape == ort_run(teacher, feeds)[0].shape
    details = report.passes[0]["details"]
    assert details["held_out_loss_after"] < details["held_out_loss_before"]


def test_without_any_data_it_asks_for_training_data(teacher_and_student):
    teacher_path, student, _ = teacher_and_student
    with pytest.raises(OnnxoptError, match="needs training data"):
        onnxopt.optimize(student, f"distill:teacher={teacher_path}", compare=False, runs=0)
