"""The teacher-output cache: filled once, reused, resumed bit for bit, rebuilt when damaged."""
from __future__ import annotations

import gc
import json
import os
import threading

import numpy as np
import onnx
import pytest
from conftest import ort_run
from onnx import TensorProto, helper, numpy_helper

import onnxopt.fetch
from onnxopt import OnnxoptError
from onnxopt.cache import Cache, key, model_fingerprint
from onnxopt.data import RepresentativeData
from onnxopt.progress import Progress
from onnxopt.teacher import FORMAT_VERSION, TeacherOutputs, teacher_outputs

HIDDEN = "block/matmul:0"  # an intermediate whose name cannot be a file name
LENGTHS = (3, 5, 0, 7, 1)  # sequence length per raw batch; 0 gives empty outputs


def make_teacher(reshape_to: list[int] | None = None) -> onnx.ModelProto:
    """x[b, s, 4] -> MatMul W[4, 3] -> Relu -> y[b, s, 3], and pooled[b, 3] = its mean over s."""
    weight = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], [HIDDEN]),
             helper.make_node("Relu", [HIDDEN], ["y"]),
             helper.make_node("ReduceMean", ["y"], ["pooled"], axes=[1], keepdims=0)]
    initializers = [numpy_helper.from_array(weight, "W")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 3]),
               helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["b", 3])]
    if reshape_to is not None:  # fails at run time for most batches: an ORT error, not a load error
        nodes.append(helper.make_node("Reshape", ["y", "shape"], ["bad"]))
        initializers.append(numpy_helper.from_array(np.array(reshape_to, np.int64), "shape"))
        outputs.append(helper.make_tensor_value_info("bad", TensorProto.FLOAT, ["r", "c"]))
    graph = helper.make_graph(nodes, "teacher", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 4])],
                              outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def raw_feeds() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((4, s, 4)).astype(np.float32)} for s in LENGTHS]
    feeds.append({"x": rng.standard_normal((6, 2, 4)).astype(np.float32)})  # split into batches of 4 and 2
    return feeds


@pytest.fixture
def teacher():
    return make_teacher()


@pytest.fixture
def batches(teacher):
    return RepresentativeData(raw_feeds()).batches(teacher, batch_size=4)


def quiet() -> Progress:
    return Progress(enabled=False)


def interrupt_after(count: int):
    """A progress callable that stops the fill with Ctrl-C before batch `count`."""
    def progress(items, desc, unit="it", total=None):
        for index, item in enumerate(items):
            if index == count:
                raise KeyboardInterrupt
            yield item
    return progress


def count_sessions(monkeypatch) -> list[int]:
    made = []
    original = onnxopt.fetch.make_session

    def counting(*args, **kwargs):
        made.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(onnxopt.fetch, "make_session", counting)
    return made


def assert_matches_ort(result: TeacherOutputs, teacher, batches, names=("y", "pooled")) -> None:
    assert result.names == list(names)
    feeds = list(batches)
    assert len(result) == len(feeds) == 7
    for index, feed in enumerate(feeds):
        expected = ort_run(teacher, feed)
        got = result.batch(index)
        assert list(got) == list(names)
        for name, want in zip(("y", "pooled"), expected):
            if name in got:
                assert got[name].shape == want.shape and got[name].dtype == want.dtype
                np.testing.assert_array_equal(got[name], want)


def entry_files(result: TeacherOutputs) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(result.directory.iterdir())}


def test_outputs_equal_ort_and_are_read_only_maps(tmp_path, teacher, batches):
    result, facts = teacher_outputs(teacher, batches, Cache(tmp_path), progress=quiet())
    assert_matches_ort(result, teacher, batches)
    assert facts["hit"] is False and facts["resumed_from"] == 0 and facts["batches"] == 7
    assert facts["bytes"] == result.nbytes == sum(p.stat().st_size for p in result.directory.glob("*.bin"))
    assert result.directory.parent == tmp_path / "teacher"
    assert sorted(p.name for p in result.directory.iterdir()) == ["0.bin", "1.bin", "index.json"]
    y = result.batch(0)["y"]
    assert isinstance(y, np.memmap) and y.mode == "r" and not y.flags.writeable
    empty = result.batch(2)["y"]  # sequence length 0
    assert empty.shape == (4, 0, 3) and not empty.flags.writeable
    assert json.loads((result.directory / "index.json").read_text())["complete"] is True


def test_second_call_is_a_hit_without_running_the_teacher(tmp_path, teacher, batches, monkeypatch):
    first, _ = teacher_outputs(teacher, batches, Cache(tmp_path), progress=quiet())
    made = count_sessions(monkeypatch)
    second, facts = teacher_outputs(teacher, batches, Cache(tmp_path), progress=quiet())
    assert made == [] and facts["hit"] is True
    assert second.directory == first.directory
    assert_matches_ort(second, teacher, batches)


def test_interrupted_fill_resumes_bit_for_bit(tmp_path, teacher, batches, monkeypatch):
    reference, _ = teacher_outputs(teacher, batches, Cache(tmp_path / "straight"), progress=quiet())
    cache = Cache(tmp_path / "interrupted")
    with pytest.raises(KeyboardInterrupt):
        teacher_outputs(teacher, batches, cache, progress=interrupt_after(3))
    made = count_sessions(monkeypatch)
    result, facts = teacher_outputs(teacher, batches, cache, progress=quiet())
    assert facts["hit"] is False and facts["resumed_from"] == 3 and len(made) == 1
    assert entry_files(result) == entry_files(reference)
    assert_matches_ort(result, teacher, batches)


def test_partly_written_batch_is_cut_off_on_resume(tmp_path, teacher, batches):
    reference, _ = teacher_outputs(teacher, batches, Cache(tmp_path / "straight"), progress=quiet())
    cache = Cache(tmp_path / "interrupted")
    with pytest.raises(KeyboardInterrupt):
        teacher_outputs(teacher, batches, cache, progress=interrupt_after(4))
    with open(cache.root / "teacher" / reference.directory.name / "0.bin", "ab") as handle:
        handle.write(b"half a batch")
    result, facts = teacher_outputs(teacher, batches, cache, progress=quiet())
    assert facts["resumed_from"] == 4
    assert entry_files(result) == entry_files(reference)


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [
    flip_byte,
    lambda path: os.truncate(path, path.stat().st_size - 4),
    lambda path: (path.parent / "index.json").write_text("{not json"),
    lambda path: path.unlink(),
], ids=["flipped-byte", "truncated", "garbage-index", "missing-file"])
def test_damaged_entry_is_rebuilt(tmp_path, teacher, batches, capsys, damage):
    first, _ = teacher_outputs(teacher, batches, Cache(tmp_path), progress=quiet())
    reference = entry_files(first)
    del first
    damage(tmp_path / "teacher" / reference_key(tmp_path) / "0.bin")
    result, facts = teacher_outputs(teacher, batches, Cache(tmp_path), progress=quiet())
    assert facts["hit"] is False and facts["resumed_from"] == 0
    assert "onnxopt: warning: damaged teacher-output cache entry" in capsys.readouterr().err
    assert entry_files(result) == reference
    assert_matches_ort(result, teacher, batches)


def reference_key(root) -> str:
    (entry,) = [p for p in (root / "teacher").iterdir() if p.is_dir()]
    return entry.name


def test_intermediate_output_by_name(tmp_path, teacher, batches):
    result, _ = teacher_outputs(teacher, batches, Cache(tmp_path), outputs=[HIDDEN, "y"], progress=quiet())
    assert result.names == [HIDDEN, "y"]
    for index, feed in enumerate(batches):
        got = result.batch(index)
        weight = numpy_helper.to_array(teacher.graph.initializer[0])
        np.testing.assert_allclose(got[HIDDEN], feed["x"] @ weight, rtol=1e-6, atol=1e-6)  # ORT sums in its own order
        np.testing.assert_array_equal(got["y"], ort_run(teacher, feed)[0])
    assert [o.name for o in teacher.graph.output] == ["y", "pooled"]  # the caller's teacher is left as it was
    other, _ = teacher_outputs(teacher, batches, Cache(tmp_path), outputs=["y"], progress=quiet())
    assert other.directory != result.directory  # another output list is another entry


def test_unknown_output_name_is_one_clear_error(tmp_path, teacher, batches):
    with pytest.raises(OnnxoptError, match="teacher has no tensor 'nope'"):
        teacher_outputs(teacher, batches, Cache(tmp_path), outputs=["y", "nope"])
    assert not (tmp_path / "teacher").exists()


def test_ort_failure_is_an_onnxopt_error(tmp_path):
    teacher = make_teacher(reshape_to=[7, -1])
    batches = RepresentativeData(raw_feeds()).batches(teacher, batch_size=4)
    with pytest.raises(OnnxoptError, match="ONNX Runtime") as caught:
        teacher_outputs(teacher, batches, Cache(tmp_path), progress=quiet())
    assert "\n" not in str(caught.value)


def test_root_that_is_a_file_falls_back_to_a_temporary_folder(tmp_path, teacher, batches, capsys):
    root = tmp_path / "not-a-folder"
    root.write_text("")
    assert_falls_back(Cache(root), teacher, batches, capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any permission")
def test_unwritable_root_falls_back_to_a_temporary_folder(tmp_path, teacher, batches, capsys):
    root = tmp_path / "readonly"
    root.mkdir()
    root.chmod(0o500)
    try:
        assert_falls_back(Cache(root), teacher, batches, capsys)
    finally:
        root.chmod(0o700)


def assert_falls_back(cache: Cache, teacher, batches, capsys) -> None:
    result, facts = teacher_outputs(teacher, batches, cache, progress=quiet())
    assert "using a temporary folder" in capsys.readouterr().err
    assert_matches_ort(result, teacher, batches)
    assert facts["hit"] is False and cache.root not in result.directory.parents
    scratch = result.directory
    del result
    gc.collect()
    assert not scratch.exists()  # the folder lives as long as the outputs that read it


def test_write_failure_mid_fill_falls_back(tmp_path, teacher, batches, capsys, monkeypatch):
    """A disk that fills up after two batches: the outputs come from a temporary folder instead."""
    fsync, calls = os.fsync, []

    def full_disk(fd):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path)):
            calls.append(fd)
            if len(calls) > 4:
                raise OSError(28, "No space left on device")
        fsync(fd)
    monkeypatch.setattr(os, "fsync", full_disk)
    assert_falls_back(Cache(tmp_path), teacher, batches, capsys)


def test_fill_stopped_after_its_last_batch_finishes_without_the_teacher(tmp_path, teacher, batches, monkeypatch):
    first, _ = teacher_outputs(teacher, batches, Cache(tmp_path), progress=quiet())
    index_path = first.directory / "index.json"
    index_path.write_text(index_path.read_text().replace('"complete":true', '"complete":false'))
    made = count_sessions(monkeypatch)
    result, facts = teacher_outputs(teacher, batches, Cache(tmp_path), progress=quiet())
    assert made == [] and facts["hit"] is False and facts["resumed_from"] == 7
    assert json.loads(index_path.read_text())["complete"] is True
    assert_matches_ort(result, teacher, batches)


def test_a_second_run_waits_for_the_one_filling_the_entry(tmp_path, teacher, batches, capsys):
    fcntl = pytest.importorskip("fcntl")
    entry_key = key(model_fingerprint(teacher), batches.fingerprint(), "y,pooled", f"v{FORMAT_VERSION}")
    (tmp_path / "teacher").mkdir()
    done = []
    with open(tmp_path / "teacher" / f"{entry_key}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another open file: excluded as another process would be
        second = threading.Thread(target=lambda: done.append(teacher_outputs(teacher, batches, Cache(tmp_path))))
        second.start()
        second.join(0.3)
        assert second.is_alive() and not done
    second.join(10)
    assert done and "waiting for another run" in capsys.readouterr().err
    assert_matches_ort(done[0][0], teacher, batches)
