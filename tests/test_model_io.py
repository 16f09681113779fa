"""onnxopt.model_io: loading with clear errors, atomic saves, external data, and parameter counting."""
from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

from onnxopt import model_io
from onnxopt.cli import main
from onnxopt.errors import OnnxoptError
from onnxopt.model_io import load_model, save_model
from onnxopt.stats import count_parameters, model_stats

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "demo.onnx"


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_same_model(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    """Same graph and same weight values (tensor storage may differ: raw vs external)."""
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    assert [i.SerializeToString() for i in a.graph.input] == [i.SerializeToString() for i in b.graph.input]
    assert [o.SerializeToString() for o in a.graph.output] == [o.SerializeToString() for o in b.graph.output]
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


@pytest.fixture
def demo_model() -> onnx.ModelProto:
    return onnx.load(str(DEMO))


# ---------------------------------------------------------------- round trips

def test_load_save_round_trip(demo_model, tmp_path):
    loaded = load_model(DEMO)
    assert loaded == demo_model
    out = save_model(loaded, tmp_path / "m.onnx")
    assert out == tmp_path / "m.onnx"
    again = load_model(out)
    assert again == demo_model
    assert not (tmp_path / "m.onnx.data").exists()
    assert leftovers(tmp_path) == []


def test_save_with_external_data(demo_model, tmp_path):
    before = demo_model.SerializeToString()
    path = save_model(demo_model, tmp_path / "m.onnx", external_data=True)
    data = tmp_path / "m.onnx.data"
    assert data.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert path.stat().st_size < DEMO.stat().st_size / 4  # the weights went to the data file
    raw = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in raw.graph.initializer)
    # The caller's model is left whole.
    assert demo_model.SerializeToString() == before
    loaded = load_model(path)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in loaded.graph.initializer)
    assert_same_model(loaded, demo_model)


def test_external_data_loads_from_another_working_directory(demo_model, tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    save_model(demo_model, tmp_path / "sub" / "m.onnx", external_data=True)
    monkeypatch.chdir(tmp_path)
    assert_same_model(load_model(Path("sub") / "m.onnx"), demo_model)
    monkeypatch.chdir("/")
    assert_same_model(load_model(tmp_path / "sub" / "m.onnx"), demo_model)


def test_external_data_automatic_over_threshold(demo_model, tmp_path, monkeypatch):
    # Below the (patched) threshold: one file.
    save_model(demo_model, tmp_path / "small.onnx")
    assert not (tmp_path / "small.onnx.data").exists()
    # save_model must read the module global at call time.
    assert model_io.tensor_bytes(demo_model) > 10_000
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 10_000)
    save_model(demo_model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").is_file()
    assert_same_model(load_model(tmp_path / "big.onnx"), demo_model)
    # external_data=False wins over the size rule.
    save_model(demo_model, tmp_path / "forced.onnx", external_data=False)
    assert not (tmp_path / "forced.onnx.data").exists()
    assert leftovers(tmp_path) == []


def test_external_data_via_cli(tmp_path, capsys):
    rc = main([str(DEMO), "-p", "fold", "--shape", "image=1x1x8x8", "--runs", "0", "--external-data",
               "-o", str(tmp_path / "m.onnx")])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "m.onnx.data").is_file()
    assert leftovers(tmp_path) == []
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "m.onnx")]) == 0
    assert "parameters " in capsys.readouterr().out


def test_inspect_reports_external_data(demo_model, tmp_path, capsys):
    save_model(demo_model, tmp_path / "m.onnx", external_data=True)
    assert main(["inspect", str(tmp_path / "m.onnx")]) == 0
    assert "external data: yes" in capsys.readouterr().out


# ---------------------------------------------------------------- bad files

@pytest.mark.parametrize("kind, fragment", [
    ("missing", "no such file"),
    ("directory", "is a directory"),
    ("empty", "is empty"),
    ("text", "not a valid ONNX model"),
    ("tensor", "not a valid ONNX model"),
    ("graph-only", "no graph or opset"),
    ("opset-99", "uses opset 99"),
])
def test_load_bad_file_raises_clear_error(kind, fragment, tmp_path, demo_model):
    path = tmp_path / "m.onnx"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("hello\n")
    elif kind == "tensor":
        path.write_bytes(numpy_helper.from_array(np.ones((3, 3), np.float32), "w").SerializeToString())
    elif kind == "graph-only":  # a GraphProto saved on its own parses, but is not a model
        path.write_bytes(demo_model.graph.SerializeToString())
    elif kind == "opset-99":
        onnx.save(onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 99]>\n'
                                          'g (float[1] x) => (float[1] y) { y = Relu(x) }'), str(path))
    before = sha(path) if path.is_file() else None
    with pytest.raises(OnnxoptError, match=fragment) as info:
        load_model(path)
    assert "\n" not in str(info.value)
    if before:
        assert sha(path) == before


def test_missing_external_data_file(demo_model, tmp_path, capsys):
    path = save_model(demo_model, tmp_path / "m.onnx", external_data=True)
    (tmp_path / "m.onnx.data").unlink()
    before = sha(path)
    with pytest.raises(OnnxoptError, match=r"external data file\(s\) m.onnx.data that are missing"):
        load_model(path)
    rc = main([str(path), "-p", "fold", "--runs", "0"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().splitlines() == [err.strip()] and err.startswith("onnxopt: error:") and "m.onnx.data" in err
    assert sha(path) == before


def test_truncated_external_data_file(demo_model, tmp_path):
    path = save_model(demo_model, tmp_path / "m.onnx", external_data=True)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(OnnxoptError, match="m.onnx.data"):
        load_model(path)


def test_file_over_2gb_is_rejected(tmp_path, capsys):
    path = tmp_path / "huge.onnx"
    with open(path, "wb") as f:
        f.write(DEMO.read_bytes()[:64])
        f.truncate(2**31 + 10)  # sparse: costs no disk
    stat = path.stat()
    with pytest.raises(OnnxoptError, match="protobuf cannot read a message over 2 GB") as info:
        load_model(path)
    assert "external data" in str(info.value)
    rc = main([str(path), "-p", "fold", "--runs", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("onnxopt: error:") and len(err.strip().splitlines()) == 1
    assert "2.0 GB" in err
    after = path.stat()  # hashing 2 GB would be slow; size and mtime show it was not written
    assert (after.st_size, after.st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)


# ---------------------------------------------------------------- saving

@pytest.mark.parametrize("target, fragment", [
    ("missing-folder", "does not exist"),
    ("directory", "is a directory"),
])
def test_save_to_unwritable_path(target, fragment, demo_model, tmp_path):
    path = tmp_path / "nope" / "m.onnx" if target == "missing-folder" else tmp_path
    with pytest.raises(OnnxoptError, match=fragment):
        save_model(demo_model, path)
    assert list(tmp_path.iterdir()) == []


def _failing_replace(monkeypatch, fail_on_call: int):
    real_replace = os.replace
    calls = []

    def replace(src, dst, *args, **kwargs):
        calls.append(dst)
        if len(calls) == fail_on_call:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(model_io.os, "replace", replace)
    return calls


def test_failed_save_keeps_old_file(demo_model, tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old model")
    _failing_replace(monkeypatch, 1)
    with pytest.raises(OnnxoptError, match="cannot write .*No space left on device"):
        save_model(demo_model, path)
    assert path.read_bytes() == b"old model"
    assert leftovers(tmp_path) == []


def test_failed_external_save_keeps_old_model_and_data(demo_model, tmp_path, monkeypatch):
    path = save_model(demo_model, tmp_path / "m.onnx", external_data=True)
    changed = onnx.ModelProto()
    changed.CopyFrom(demo_model)
    changed.graph.initializer.sort(key=lambda t: -len(t.raw_data))  # other offsets in the data file
    for t in changed.graph.initializer:
        t.raw_data = (np.frombuffer(t.raw_data, np.uint8) ^ 1).tobytes()
    _failing_replace(monkeypatch, 2)  # the data file moves in, the model file does not
    with pytest.raises(OnnxoptError):
        save_model(changed, path, external_data=True)
    monkeypatch.undo()
    assert_same_model(load_model(path), demo_model)


def test_save_leaves_no_temp_files(demo_model, tmp_path):
    save_model(demo_model, tmp_path / "a.onnx")
    save_model(demo_model, tmp_path / "b.onnx", external_data=True)
    save_model(demo_model, tmp_path / "a.onnx")  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx", "b.onnx.data"]


# ---------------------------------------------------------------- parameters

def test_constant_node_weights_count_as_parameters():
    model = onnx.parser.parse_model('''<ir_version: 8, opset_import: ["" : 17]>
    g (float[3,4] x) => (float[3,4] y) <float[5] b = {1, 2, 3, 4, 5}> {
      w = Constant<value = float[3,4] {1,2,3,4,5,6,7,8,9,10,11,12}>()
      v = Constant<value_floats = [1.0, 2.0, 3.0]>()
      s = Constant<value = int64[2] {2, 3}>()
      z = ConstantOfShape<value = float[1] {0.5}>(s)
      y = Add(x, w)
    }''')
    onnx.checker.check_model(model)
    # initializer 5 + Constant 12 + Constant value_floats 3 + shape Constant 2 + ConstantOfShape 2x3 = 28
    assert count_parameters(model) == 28
    assert model_stats(model).parameters == 28


def test_initializers_and_constants_agree(demo_model):
    """Moving every initializer into a Constant node must not change the parameter count."""
    as_constants = onnx.ModelProto()
    as_constants.CopyFrom(demo_model)
    nodes = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in as_constants.graph.initializer]
    rest = list(as_constants.graph.node)
    del as_constants.graph.node[:]
    as_constants.graph.node.extend(nodes + rest)
    del as_constants.graph.initializer[:]
    assert count_parameters(as_constants) == count_parameters(demo_model) > 30_000

