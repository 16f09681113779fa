"""What `distill` trains towards beyond same-named outputs: a student tensor matched to a teacher
tensor of another name (hidden states), the teacher's class scores cached as their top k only, and
hard labels from the training data mixed into the loss."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import ort_run
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt import OnnxoptError

torch = pytest.importorskip("torch")

RNG = np.random.default_rng(1)
CLASSES = 8


def f32(*shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def mlp(w1, w2, hidden: str = "r", with_hidden_output: bool = False) -> onnx.ModelProto:
    """x [n, 16] -> MatMul -> Relu (named `hidden`) -> MatMul -> y [n, CLASSES] (class scores)."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], [hidden]),
             helper.make_node("MatMul", [hidden, "w2"], ["y"], name="fc2")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", CLASSES])]
    if with_hidden_output:
        outputs.append(helper.make_tensor_value_info(hidden, TensorProto.FLOAT, ["n", 32]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              outputs, [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def teacher(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path / "cache"))
    w1, w2 = f32(16, 32) / 4, f32(32, CLASSES) / 6
    onnx.save(mlp(w1, w2, with_hidden_output=True), tmp_path / "teacher.onnx")
    return tmp_path / "teacher.onnx", w1, w2, {"x": f32(512, 16)}


def hidden_distance(student, student_hidden, teacher_path, data) -> float:
    """Mean squared distance of the student's hidden tensor to the teacher's `r`."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(student)
    exposed.graph.output.append(helper.make_tensor_value_info(student_hidden, TensorProto.FLOAT, None))
    return float(np.mean((ort_run(exposed, data)[-1] - ort_run(onnx.load(str(teacher_path)), data)[1]) ** 2))


def test_a_student_tensor_is_matched_to_a_teacher_tensor_of_another_name(teacher):
    teacher_path, w1, w2, data = teacher
    student = mlp(w1 + f32(16, 32) * 0.2, w2, hidden="act")  # its hidden state is called 'act', the teacher's 'r'
    spec = f"distill:teacher={teacher_path},outputs=act=r,epochs=10,lr=1e-2,loss=mse"
    trained, report = onnxopt.optimize(student, spec, train=data, compare=False, runs=0)
    assert report.passes[0]["changed"] and list(report.passes[0]["details"]["losses"]) == ["r"]
    # the oracle can fail: only the first layer feeds 'act', so only matching act to r brings it closer
    assert hidden_distance(trained, "act", teacher_path, data) < 0.5 * hidden_distance(student, "act", teacher_path, data)
    assert [o.name for o in trained.graph.output] == ["y"]


def test_top_k_caches_k_scores_and_still_pulls_the_student_to_the_teachers_classes(teacher):
    teacher_path, w1, w2, data = teacher
    student = mlp(w1 + f32(16, 32) * 0.3, w2 + f32(32, CLASSES) * 0.3)
    agree = {}
    sizes = {}
    for k in (None, 3):
        spec = f"distill:teacher={teacher_path},outputs=y,epochs=6,lr=3e-3" + (f",top_k={k}" if k else "")
        trained, report = onnxopt.optimize(student, spec, train=data, compare=False, runs=0)
        details = report.passes[0]["details"]
        sizes[k] = details["teacher_cache"]["bytes"]
        assert details["held_out_loss_after"] < details["held_out_loss_before"]
        want = ort_run(onnx.load(str(teacher_path)), data)[0].argmax(1)
        agree[k] = float(np.mean(ort_run(trained, data)[0].argmax(1) == want))
    before = float(np.mean(ort_run(student, data)[0].argmax(1) == want))
    assert sizes[3] == 512 * 3 * (4 + 8)  # float32 scores and int64 classes, k of each per sample
    assert sizes[None] == 512 * CLASSES * 4
    assert agree[3] > before + 0.05 and agree[3] >= agree[None] - 0.05, (before, agree)


@pytest.mark.parametrize("spec, message", [
    ("outputs=act=r;act=y", "names the student tensor 'act' twice"),
    ("outputs==r", "leaves a side empty"),
    ("outputs=nope=r", "no tensor 'nope'"),
    ("outputs=h,top_k=2", "declared \\[batch, classes\\]"),
    ("outputs=y,top_k=9", "has only 8 classes"),
    ("outputs=y,top_k=2,loss=mse", "top_k must be >= 1 and works with loss=auto or kl"),
])
def test_bad_pairs_and_top_k_are_one_line(teacher, spec, message):
    teacher_path, w1, w2, data = teacher
    with pytest.raises(OnnxoptError, match=message):
        onnxopt.optimize(mlp(w1, w2, hidden="act"), f"distill:teacher={teacher_path},{spec}", train=data,
                         compare=False, runs=0)


def test_hard_labels_pull_the_student_away_from_a_wrong_teacher(teacher):
    """The teacher is wrong (random weights); the labels are right. Labels alone (label_weight=1) teach
    the labels; no labels (the default weight's share 0) copies the teacher."""
    teacher_path, w1, w2, data = teacher
    labels = ort_run(mlp(w1, w2), data)[0].argmax(1).astype(np.int64)  # the right answers
    wrong = mlp(f32(16, 32) / 4, f32(32, CLASSES) / 6, with_hidden_output=True)
    onnx.save(wrong, teacher_path.parent / "wrong.onnx")
    student = mlp(f32(16, 32) / 4, f32(32, CLASSES) / 6)
    accuracy = {}
    for weight in (0.0, 1.0):
        spec = (f"distill:teacher={teacher_path.parent / 'wrong.onnx'},outputs=y,labels=label,label_weight={weight},"
                "epochs=15,lr=1e-2")
        trained, report = onnxopt.optimize(student, spec, train={**data, "label": labels}, compare=False, runs=0)
        assert report.passes[0]["details"]["labels"] == "label"
        accuracy[weight] = float(np.mean(ort_run(trained, data)[0].argmax(1) == labels))
    before = float(np.mean(ort_run(student, data)[0].argmax(1) == labels))
    assert accuracy[1.0] > max(before, accuracy[0.0]) + 0.3, (before, accuracy)


@pytest.mark.parametrize("spec, train, message", [
    ("labels=x", {}, "is one of the model's inputs"),
    ("labels=label,loss=mse", {"label": np.zeros(512, np.int64)}, "no matched output holds class scores"),
    ("labels=label,label_weight=2", {"label": np.zeros(512, np.int64)}, "label_weight must lie in"),
    ("labels=label", {"label": np.zeros(512, np.int32)}, "int32"),
])
def test_bad_labels_are_one_line(teacher, spec, train, message):
    teacher_path, w1, w2, data = teacher
    with pytest.raises(OnnxoptError, match=message):
        onnxopt.optimize(mlp(w1, w2), f"distill:teacher={teacher_path},outputs=y,{spec}", train={**data, **train},
                         compare=False, runs=0)
