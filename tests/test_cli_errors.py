"""Bad input and I/O through the command line.

Every user error must be ONE line on stderr starting with `onnxopt: error:`, a non-zero exit, no
traceback unless --debug, and the input file byte-for-byte unchanged. Most cases call
`onnxopt.cli.main` in-process (fast); a few run `python -m onnxopt.cli` to prove real exit codes.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest

from onnxopt import registry
from onnxopt.cli import main
from onnxopt.errors import OnnxoptError
from onnxopt.stats import count_parameters

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "demo.onnx"
DEMO_INPUTS = REPO / "models" / "demo_inputs.npz"
SHOUT = REPO / "tests" / "plugins" / "shout_pass.py"
SHAPE = ["--shape", "image=1x1x8x8"]
FAST = ["--runs", "2"]

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
HAS_TENSORRT = "TensorrtExecutionProvider" in ort.get_available_providers()


# ---------------------------------------------------------------- helpers and fixtures

def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *fragments: str) -> str:
    """Non-zero exit, exactly one stderr line `onnxopt: error: ...` holding every fragment, no traceback."""
    assert rc != 0, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("onnxopt: error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def tiny(path: Path, body: str, opset: int = 17, signature: str = "(float[1,4] x) => (float[1,4] y)") -> Path:
    """A one-line-graph model written with the ONNX text parser (no checks, so invalid models are possible)."""
    model = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\ng {signature} {{ {body} }}')
    onnx.save(model, str(path))
    return path


@pytest.fixture
def demo(tmp_path) -> Path:
    """A private copy of models/demo.onnx (dynamic batch), so no test can touch the committed file."""
    path = tmp_path / "demo.onnx"
    shutil.copyfile(DEMO, path)
    return path


@pytest.fixture
def clean_registry(monkeypatch):
    """Plugins register passes process-wide; undo that so other test files see only the built-ins."""
    registry.all_passes()  # load the entry points into the real registry first
    monkeypatch.setattr(registry, "_registered", dict(registry._registered))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("onnxopt_plugin_"):
            del sys.modules[name]


# ---------------------------------------------------------------- bad input files

def _flip(data: bytes, offsets, mask: int = 0xFF) -> bytes:
    buf = bytearray(data)
    for off in offsets:
        buf[off] ^= mask
    return bytes(buf)


def _make_bad_input(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    demo = DEMO.read_bytes()
    if kind == "missing":
        return tmp_path / "nope.onnx"
    if kind == "directory":
        path = tmp_path / "folder.onnx"
        path.mkdir()
        return path
    if kind == "text":
        path.write_text("this is not a model\n")
    elif kind == "png":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(demo[: len(demo) // 2])
    elif kind == "flipped-header":
        path.write_bytes(_flip(demo, [0, 1, 2, 3, 10, 20]))
    elif kind == "flipped-op-type":
        # Flip bits of the first op_type string (field 4, length 4): "Conv" -> "Cxnv", an op that does not exist.
        at = demo.index(b"\x22\x04Conv") + 3
        path.write_bytes(_flip(demo, [at], mask=0x17))
    elif kind == "flipped-op-type-utf8":
        # Same place, but the flipped bytes are not valid UTF-8: protobuf hands back bytes, not str.
        at = demo.index(b"\x22\x04Conv") + 3
        path.write_bytes(_flip(demo, [at, at + 1]))
    elif kind == "opset-99":
        tiny(path, "y = Relu(x)", opset=99)
    elif kind == "opset-5":
        tiny(path, "y = Relu(x)", opset=5)  # Relu-1: ORT has no kernel for it
    elif kind == "no-kernel":
        tiny(path, "y = Hardmax(x)", opset=13, signature="(double[1,4] x) => (double[1,4] y)")
    elif kind == "unknown-op":
        tiny(path, "y = Foo(x)", opset=17)
    else:
        raise AssertionError(kind)
    return path


BAD_INPUTS = {
    "missing": ["no such file", "nope.onnx"],
    "directory": ["is a directory"],
    "text": ["not a valid ONNX model", "truncated, or another format"],
    "png": ["not a valid ONNX model"],
    "empty": ["is empty"],
    "truncated": ["not a valid ONNX model"],
    "flipped-header": ["not a valid ONNX model"],
    "flipped-op-type": ["op Cxnv does not exist in opset 17"],
    "flipped-op-type-utf8": ["is corrupt", "not valid text"],
    "opset-99": ["opset 99", "supports opsets 1 to"],
    "opset-5": ["opset-5", "version_converter"],
    "no-kernel": ["no kernel for op Hardmax"],
    "unknown-op": ["op Foo does not exist in opset 17"],
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_model_is_one_line_and_untouched(kind, tmp_path, capsys):
    path = _make_bad_input(kind, tmp_path)
    before = sha(path) if path.is_file() else None
    shape = SHAPE if kind.startswith("flipped-op-type") else []  # the demo's batch is dynamic; the tiny models are static
    rc, out, err = cli(capsys, path, "-p", "fold,fuse", *shape, *FAST)
    assert_one_line_error(rc, err, *BAD_INPUTS[kind])
    assert rc == 2
    if before is not None:
        assert sha(path) == before


@pytest.mark.parametrize("kind", ["missing", "text", "truncated", "opset-99",
                                  "flipped-op-type-utf8"])
def test_inspect_bad_input_is_one_line(kind, tmp_path, capsys):
    path = _make_bad_input(kind, tmp_path)
    rc, _, err = cli(capsys, "inspect", path)
    assert_one_line_error(rc, err, *BAD_INPUTS[kind])


def test_corrupt_weights_still_load(tmp_path, capsys):
    """Bytes flipped inside raw tensor data do not break the protobuf: the model must still optimize."""
    demo = DEMO.read_bytes()
    weights = onnx.load(str(DEMO)).graph.initializer[0].raw_data
    at = demo.index(weights)
    path = tmp_path / "model.onnx"
    path.write_bytes(_flip(demo, range(at, at + 8)))
    rc, out, err = cli(capsys, path, "-p", "fold,fuse", *SHAPE, *FAST)
    assert rc == 0, err


# ---------------------------------------------------------------- pipeline and options

@pytest.mark.parametrize("spec, fragments", [
    ("nope", ["unknown pass 'nope'", "valid passes:", "fold", "fuse"]),
    ("fold:bogus=1", ["pass 'fold' has no option 'bogus'",
                      "valid options: max_folded_mb, fold_shapes, remove_identity, dedupe"]),
    ("fuse:gem=true", ["pass 'fuse' has no option 'gem'", "valid options: conv_bn, affine, gemm"]),
    ("fold:max_folded_mb=abc", ["fold:max_folded_mb", "expected float", "'abc'"]),
    ("fuse:gemm=maybe", ["fuse:gemm", "expected true or false", "'maybe'"]),
    ("fold:max_folded_mb", ["malformed option 'max_folded_mb'"]),
    ("gemm=true", ["starts with an option"]),
    (",", ["the pipeline is empty"]),
    ("", ["no passes given", "onnxopt passes"]),
])
def test_bad_pipeline_is_one_line(spec, fragments, demo, capsys):
    before = sha(demo)
    rc, out, err = cli(capsys, demo, "-p", spec, *SHAPE, *FAST)
    assert_one_line_error(rc, err, *fragments)
    assert out == ""
    assert sha(demo) == before


# ---------------------------------------------------------------- output paths

def test_output_equal_to_input_needs_in_place(demo, capsys):
    before = sha(demo)
    rc, _, err = cli(capsys, demo, "-p", "fold,fuse", *SHAPE, *FAST, "-o", demo)
    assert_one_line_error(rc, err, "is the input model", "--in-place")
    assert sha(demo) == before
    # Another spelling of the same file is the same file.
    (demo.parent / "sub").mkdir()
    rc, _, err = cli(capsys, demo, "-p", "fold", *SHAPE, *FAST, "-o", demo.parent / "sub" / ".." / demo.name)
    assert_one_line_error(rc, err, "is the input model")
    assert sha(demo) == before


def test_in_place_overwrites_the_input(demo, capsys):
    before = sha(demo)
    nodes_before = len(onnx.load(str(demo)).graph.node)
    rc, out, err = cli(capsys, demo, "-p", "fold,fuse", *SHAPE, *FAST, "-o", demo, "--in-place")
    assert rc == 0, err
    assert sha(demo) != before
    optimized = onnx.load(str(demo))
    onnx.checker.check_model(optimized)
    assert len(optimized.graph.node) < nodes_before
    assert not list(demo.parent.glob(".*tmp*"))


@pytest.mark.parametrize("target, fragments", [
    ("missing-folder", ["does not exist", "create it first"]),
    ("directory", ["is a directory"]),
])
def test_unwritable_output_fails_before_work(target, fragments, demo, tmp_path, capsys):
    # Tests run as root, where chmod does not stop writes: use a missing folder and an existing directory.
    out_path = tmp_path / "no" / "such" / "out.onnx" if target == "missing-folder" else tmp_path
    before = sha(demo)
    rc, out, err = cli(capsys, demo, "-p", "fold,fuse", *SHAPE, *FAST, "-o", out_path)
    assert_one_line_error(rc, err, *fragments)
    assert out == ""  # failed before optimizing and printing a report
    assert sha(demo) == before
    assert not (tmp_path / "no").exists()


# ---------------------------------------------------------------- shapes and sample data

def test_dynamic_input_without_shape_names_it(demo, capsys):
    rc, _, err = cli(capsys, demo, "-p", "fold", *FAST)
    assert_one_line_error(rc, err, "input 'image'", "dynamic dimension 'batch'", "--shape image=Nx1x8x8")


@pytest.mark.parametrize("shape", ["image", "image=", "image=1xq", "image=1x1x8.5x8", "=1x1x8x8x"])
def test_malformed_shape(shape, demo, capsys):
    rc, _, err = cli(capsys, demo, "-p", "fold", *FAST, "--shape", shape)
    assert_one_line_error(rc, err, "malformed --shape", "NAME=DIM")


def test_shape_for_unknown_input(demo, capsys):
    rc, _, err = cli(capsys, demo, "-p", "fold", *FAST, "--shape", "pixels=1x1x8x8")
    assert_one_line_error(rc, err, "unknown input(s) pixels", "inputs are image")


@pytest.mark.parametrize("shape", ["image=-1x1x8x8", "image=0x1x8x8"])
def test_shape_with_non_positive_dim(shape, demo, capsys):
    rc, _, err = cli(capsys, demo, "-p", "fold", *FAST, "--shape", shape)
    assert_one_line_error(rc, err, "--shape")


def test_shape_with_wrong_rank(demo, capsys):
    rc, _, err = cli(capsys, demo, "-p", "fold", *FAST, "--shape", "image=1x8x8")
    assert_one_line_error(rc, err, "image", "rank")


def test_data_npz_works(demo, capsys):
    rc, out, err = cli(capsys, demo, "-p", "fold,fuse", *FAST, "--data", DEMO_INPUTS)
    assert rc == 0, err
    assert "max abs error" in out


def test_calibration_data_stands_in_for_shapes(demo, capsys):
    """`-p quant --calib data.npz` on a dynamic-batch model needs no --shape: the comparison runs on
    real calibration inputs, and the report says so."""
    rc, out, err = cli(capsys, demo, "-p", "fold,quant:keep_if_slower=false", *FAST, "--calib", DEMO_INPUTS)
    assert rc == 0, err
    assert "compared on the first calibration batch" in out and "max abs error" in out


def test_the_comparison_runs_on_calibration_samples_no_pass_read(demo, capsys, tmp_path):
    """A pass fits the samples it reads, so comparing on them would flatter it: with more samples than
    the passes read (`samples=`), the report compares on the next ones, as a comparison on them does."""
    import onnxopt

    report = tmp_path / "report.json"
    optimized, rep = onnxopt.optimize(demo, "fold,quant:samples=8,keep_if_slower=false", calib=str(DEMO_INPUTS),
                                      runs=0, report=str(report))
    assert any("compared on 8 samples of the calibration data that no pass read (they read the first 8" in n
               for n in rep.notes), rep.notes
    held = {"image": np.load(DEMO_INPUTS)["image"][8:16]}
    want = ort.InferenceSession(str(demo), providers=["CPUExecutionProvider"]).run(None, held)[0]
    got = ort.InferenceSession(optimized.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, held)[0]
    assert rep.agreement.max_abs_error == pytest.approx(float(np.abs(got - want).max()), rel=1e-5)
    # reading every sample leaves none out: the first batch, said to be fitted
    _, rep = onnxopt.optimize(demo, "fold,quant:samples=16,keep_if_slower=false", calib=str(DEMO_INPUTS), runs=0)
    assert any("compared on the first calibration batch (8 samples), which the passes also read" in n
               for n in rep.notes), rep.notes


def test_missing_calibration_file_is_named_before_shapes(demo, tmp_path, capsys):
    rc, _, err = cli(capsys, demo, "-p", "fold,quant", *FAST, "--calib", tmp_path / "missing.npz")
    assert_one_line_error(rc, err, "calibration data not found", "missing.npz")


def test_shape_still_wins_over_calibration_data(demo, capsys):
    rc, out, err = cli(capsys, demo, "-p", "fold", *FAST, *SHAPE, "--calib", DEMO_INPUTS)
    assert rc == 0, err
    assert "compared on the first calibration batch" not in out


@pytest.mark.parametrize("case, fragments", [
    ("missing", ["data file not found", "missing.npz"]),
    ("no-input", ["has no data for input(s) image", "inputs are image"]),
    ("float64", ["input 'image' is float64", "wants float32"]),
    ("rank", ["input 'image' has rank 3", "wants rank 4"]),
    ("empty-dir", ["holds no input_*.pb"]),
    ("not-a-zip", ["junk.npz"]),
])
def test_bad_data(case, fragments, demo, tmp_path, capsys):
    data = {
        "missing": tmp_path / "missing.npz",
        "no-input": tmp_path / "other.npz",
        "float64": tmp_path / "f64.npz",
        "rank": tmp_path / "rank.npz",
        "empty-dir": tmp_path / "test_data_set_0",
        "not-a-zip": tmp_path / "junk.npz",
    }[case]
    if case == "no-input":
        np.savez(data, pixels=np.zeros((1, 1, 8, 8), np.float32))
    elif case == "float64":
        np.savez(data, image=np.zeros((1, 1, 8, 8), np.float64))
    elif case == "rank":
        np.savez(data, image=np.zeros((1, 8, 8), np.float32))
    elif case == "empty-dir":
        data.mkdir()
    elif case == "not-a-zip":
        data.write_text("not an npz\n")
    before = sha(demo)
    rc, _, err = cli(capsys, demo, "-p", "fold", *FAST, "--data", data)
    assert_one_line_error(rc, err, *fragments)
    assert sha(demo) == before


# ---------------------------------------------------------------- execution providers

@pytest.mark.skipif(HAS_CUDA, reason="CUDAExecutionProvider is available here")
def test_ep_cuda_unavailable(demo, capsys):
    rc, out, err = cli(capsys, demo, "-p", "fold", *SHAPE, *FAST, "--ep", "cuda")
    assert_one_line_error(rc, err, "execution provider 'cuda'", "CUDAExecutionProvider", "not available",
                          "--ep-fallback")


@pytest.mark.skipif(HAS_CUDA, reason="CUDAExecutionProvider is available here")
def test_ep_cuda_fallback_runs_on_cpu(demo, capsys):
    rc, out, err = cli(capsys, demo, "-p", "fold", *SHAPE, *FAST, "--ep", "cuda", "--ep-fallback")
    assert rc == 0, err
    assert "onnxopt: warning:" in err and "using CPU" in err
    assert "onnxopt: error" not in err and "Traceback" not in err
    assert "latency median" in out


@pytest.mark.skipif(HAS_CUDA, reason="CUDAExecutionProvider is available here")
def test_ep_fallback_warns_once(demo, capsys):
    rc, out, err = cli(capsys, demo, "-p", "fold", *SHAPE, *FAST, "--ep", "cuda", "--ep-fallback")
    assert rc == 0, err
    assert len([line for line in err.splitlines() if line.startswith("onnxopt: warning:")]) == 1, err


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorrtExecutionProvider is available here")
def test_ep_tensorrt_unavailable(demo, capsys):
    rc, _, err = cli(capsys, demo, "-p", "fold", *SHAPE, *FAST, "--ep", "tensorrt")
    assert_one_line_error(rc, err, "execution provider 'tensorrt'", "TensorrtExecutionProvider", "TensorRT",
                          "--ep-fallback")
    rc, out, err = cli(capsys, demo, "-p", "fold", *SHAPE, *FAST, "--ep", "tensorrt", "--ep-fallback")
    assert rc == 0, err
    assert "using CPU" in err


# ---------------------------------------------------------------- argparse

@pytest.mark.parametrize("args, fragment", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--runs", "abc"], "invalid int value: 'abc'"),
    (["--ep", "gpu"], "invalid choice: 'gpu'"),
    (["--verify", "maybe"], "invalid choice: 'maybe'"),
])
def test_bad_flags_are_one_line(args, fragment, demo, capsys):
    rc, _, err = cli(capsys, demo, "-p", "fold", *args)
    assert_one_line_error(rc, err, fragment, "--help")
    assert rc == 2


@pytest.mark.parametrize("argv, fragment", [
    ([], "required: model"),
    (["passes", "--bogus"], "unrecognized arguments: --bogus"),
    (["inspect"], "required: model"),
])
def test_bad_subcommand_usage(argv, fragment, capsys):
    rc, _, err = cli(capsys, *argv)
    assert_one_line_error(rc, err, fragment)


def test_debug_raises_in_process(tmp_path):
    with pytest.raises(OnnxoptError, match="no such file"):
        main([str(tmp_path / "nope.onnx"), "-p", "fold", "--debug"])


# ---------------------------------------------------------------- real processes

def _proc(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxopt.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize("kind, args", [
    ("missing", []),
    ("truncated", []),
    ("good", ["--bogus-flag"]),
    ("good", ["-p", "fold:max_folded_mb=abc"]),
])
def test_subprocess_exit_code_and_no_traceback(kind, args, tmp_path):
    path = DEMO if kind == "good" else _make_bad_input(kind, tmp_path)
    before = sha(path) if path.exists() else None
    proc = _proc(path, *(args or ["-p", "fold"]), "--runs", "2")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxopt: error:"), proc.stderr
    if before:
        assert sha(path) == before


def test_subprocess_debug_shows_traceback(tmp_path):
    path = _make_bad_input("truncated", tmp_path)
    before = sha(path)
    proc = _proc(path, "-p", "fold", "--debug")
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "OnnxoptError" in proc.stderr and "not a valid ONNX model" in proc.stderr
    assert sha(path) == before


def test_subprocess_success_writes_output(tmp_path):
    out_path = tmp_path / "out.onnx"
    proc = _proc(DEMO, "-p", "fold,fuse", *SHAPE, *FAST, "-o", out_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    onnx.checker.check_model(onnx.load(str(out_path)))


# ---------------------------------------------------------------- atomic outputs

def test_no_temp_files_left_after_a_run(demo, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc, out, err = cli(capsys, demo, "-p", "fold,fuse", *SHAPE, *FAST, "-o", out_dir / "m.onnx",
                       "--report", out_dir / "r.json")
    assert rc == 0, err
    rc, out, err = cli(capsys, demo, "-p", "fold", *SHAPE, *FAST, "-o", out_dir / "ext.onnx", "--external-data")
    assert rc == 0, err
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["ext.onnx", "ext.onnx.data", "m.onnx", "r.json"], names
    assert not list(out_dir.glob(".*"))


@pytest.mark.parametrize("failure", ["unknown-pass", "bad-data", "ort-rejects"] + ([] if HAS_CUDA else ["ep-cuda"]))
def test_failed_run_leaves_existing_output_unchanged(failure, demo, tmp_path, capsys):
    out_path = tmp_path / "out.onnx"
    out_path.write_bytes(b"previous output")
    report = tmp_path / "r.json"
    report.write_text('{"previous": true}')
    model, extra = demo, []
    if failure == "unknown-pass":
        extra = ["-p", "nope", *SHAPE]
    elif failure == "bad-data":
        np.savez(tmp_path / "f64.npz", image=np.zeros((1, 1, 8, 8), np.float64))
        extra = ["-p", "fold", "--data", tmp_path / "f64.npz"]
    elif failure == "ort-rejects":  # fails late: after the passes ran, when ORT loads the model
        model = tiny(tmp_path / "foo.onnx", "y = Foo(x)")
        extra = ["-p", "fold,fuse"]
    elif failure == "ep-cuda":  # fails late too, when the sessions are made
        extra = ["-p", "fold,fuse", *SHAPE, "--ep", "cuda"]
    rc, _, err = cli(capsys, model, *extra, *FAST, "-o", out_path, "--report", report)
    assert_one_line_error(rc, err)
    assert out_path.read_bytes() == b"previous output"
    assert report.read_text() == '{"previous": true}'
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


BREAKER = '''
from onnxopt import Pass, PassResult

class Breaker(Pass):
    """Points the first node at a tensor that does not exist."""
    name = "breaker"

    def run(self, model, ctx):
        model.graph.node[0].input[0] = "does_not_exist"
        return PassResult(model, changed=True)
'''


def test_broken_pass_writes_last_good_model(demo, tmp_path, capsys, clean_registry):
    plugin = tmp_path / "breaker.py"
    plugin.write_text(BREAKER)
    out_path = tmp_path / "out.onnx"
    rc, _, err = cli(capsys, demo, "-p", "fold,breaker", "--plugin", plugin, *SHAPE, *FAST, "-o", out_path)
    assert_one_line_error(rc, err, "pass 'breaker' broke the model")
    assert rc == 1
    onnx.checker.check_model(onnx.load(str(out_path)))  # the model after fold, before breaker


def test_broken_pass_message_names_the_output(demo, tmp_path, capsys, clean_registry):
    plugin = tmp_path / "breaker.py"
    plugin.write_text(BREAKER)
    out_path = tmp_path / "out.onnx"
    rc, _, err = cli(capsys, demo, "-p", "fold,breaker", "--plugin", plugin, *SHAPE, *FAST, "-o", out_path)
    assert_one_line_error(rc, err, "pass 'breaker' broke the model", str(out_path))


# ---------------------------------------------------------------- passes, inspect, report

def test_passes_lists_fold_and_fuse_with_options(capsys):
    rc, out, err = cli(capsys, "passes")
    assert rc == 0, err
    assert re.search(r"^fold: Fold constant", out, re.M)
    assert "\nfuse: Fold BatchNormalization" in out
    for line in ["max_folded_mb (float, default 0.0)", "fold_shapes (bool, default True)", "remove_identity (bool",
                 "dedupe (bool", "conv_bn (bool, default True)", "gemm (bool, default True)"]:
        assert line in out, line


def test_inspect_demo(capsys):
    rc, out, err = cli(capsys, "inspect", DEMO)
    assert rc == 0, err
    assert "opsets ai.onnx 17" in out
    params = count_parameters(onnx.load(str(DEMO)))
    assert f"parameters {params:,}" in out and params > 0
    assert "external data: no" in out
    lines = out.splitlines()
    assert any(line.split()[:3] == ["input", "image", "float[batch,"] and "1, 8, 8]" in line for line in lines), out
    assert any(line.split()[:2] == ["output", "logits"] and "float[batch, 10]" in line for line in lines), out
    histogram = {parts[0]: int(parts[1]) for parts in (line.split() for line in lines)
                 if len(parts) == 2 and parts[1].isdigit()}
    model = onnx.load(str(DEMO))
    assert histogram["Conv"] == sum(n.op_type == "Conv" for n in model.graph.node) == 2
    assert sum(histogram.values()) == len(model.graph.node)


def test_report_json(demo, tmp_path, capsys):
    report = tmp_path / "r.json"
    rc, out, err = cli(capsys, demo, "-p", "fold,fuse", *SHAPE, *FAST, "--report", report)
    assert rc == 0, err
    data = json.loads(report.read_text())
    for side in ("original", "optimized"):
        assert {"nodes", "ops", "parameters", "size_bytes"} <= set(data[side])
        assert data["latency"][side]["median_ms"] > 0
        assert 2 <= data["latency"][side]["runs"] <= 40  # at least --runs, more for sub-ms models
    assert data["optimized"]["nodes"] < data["original"]["nodes"]
    assert data["agreement"]["max_abs_error"] < 1e-4
    assert data["agreement"]["cosine"] > 0.9999
    assert data["pipeline"] == "fold,fuse"
    assert [p["name"] for p in data["passes"]][:2] == ["fold", "fuse"]


def test_report_to_missing_folder(demo, tmp_path, capsys):
    out_path = tmp_path / "out.onnx"
    rc, _, err = cli(capsys, demo, "-p", "fold", *SHAPE, *FAST, "-o", out_path,
                     "--report", tmp_path / "no" / "r.json")
    assert_one_line_error(rc, err, "r.json")
    assert not out_path.exists()


# ---------------------------------------------------------------- config files

def test_toml_config(demo, tmp_path, capsys):
    config = tmp_path / "pipeline.toml"
    config.write_text('passes = ["fold", { name = "fuse", gemm = false }]\nruns = 2\n'
                      '[shapes]\nimage = "2x1x8x8"\n')
    rc, out, err = cli(capsys, demo, "-c", config, "--report", tmp_path / "r.json")
    assert rc == 0, err
    data = json.loads((tmp_path / "r.json").read_text())
    assert 2 <= data["latency"]["original"]["runs"] <= 40  # runs = 2 from the config, not the default 50
    assert [p["name"] for p in data["passes"]][:2] == ["fold", "fuse"]


def test_yaml_config(demo, tmp_path, capsys):
    pytest.importorskip("yaml")
    config = tmp_path / "pipeline.yaml"
    config.write_text("passes:\n  - fold\n  - name: fuse\n    conv_bn: true\nruns: 2\nshapes:\n  image: 1x1x8x8\n")
    rc, out, err = cli(capsys, demo, "-c", config, "-o", tmp_path / "o.onnx")
    assert rc == 0, err
    assert (tmp_path / "o.onnx").is_file()


def test_command_line_passes_override_config(demo, tmp_path, capsys):
    config = tmp_path / "pipeline.toml"
    config.write_text('passes = "nope"\nruns = 2\n')
    rc, out, err = cli(capsys, demo, "-c", config, "-p", "fold", *SHAPE)
    assert rc == 0, err


@pytest.mark.parametrize("name, text, fragments", [
    ("missing.toml", None, ["config file not found"]),
    ("syntax.toml", 'passes = ["fold"\n', ["cannot parse", "syntax.toml"]),
    ("syntax.yaml", "passes: [fold\n", ["cannot parse", "syntax.yaml"]),
    ("nopasses.yaml", "ep: cpu\n", ["'passes' must be a non-empty list"]),
    ("list.yaml", "- fold\n", ["must hold a table/mapping"]),
    ("noname.toml", 'passes = [{ gemm = true }]\n', ["needs a 'name'"]),
    ("badopt.toml", 'passes = [{ name = "fuse", gemm = "maybe" }]\n', ["fuse:gemm", "expected true or false"]),
    ("badkey.toml", 'passes = [{ name = "fold", bogus = 1 }]\n', ["has no option 'bogus'", "valid options:"]),
    ("badep.toml", 'passes = ["fold"]\nep = "gpu"\n[shapes]\nimage = "1x1x8x8"\n', ["ep: 'gpu' is not one of cpu, cuda, tensorrt"]),
    ("badshape.toml", 'passes = ["fold"]\n[shapes]\nimage = "1xq"\n', ["image"]),
    ("shapestr.toml", 'passes = ["fold"]\nshapes = "image=1x1x8x8"\n', ["shapes"]),
    ("badruns.toml", 'passes = ["fold"]\nruns = "many"\n[shapes]\nimage = "1x1x8x8"\n', ["runs"]),
])
def test_bad_config_is_one_line(name, text, fragments, demo, tmp_path, capsys):
    if name.endswith(".yaml"):
        pytest.importorskip("yaml")
    config = tmp_path / name
    if text is not None:
        config.write_text(text)
    before = sha(demo)
    rc, _, err = cli(capsys, demo, "-c", config)  # no --runs: it would override the config's
    assert_one_line_error(rc, err, *fragments)
    assert sha(demo) == before


# ---------------------------------------------------------------- plugins

def test_plugin_pass_runs(demo, tmp_path, capsys, clean_registry):
    out_path = tmp_path / "out.onnx"
    rc, out, err = cli(capsys, demo, "--plugin", SHOUT, "-p", "fold,shout:suffix=_X,doc=true", *SHAPE, *FAST,
                       "-o", out_path)
    assert rc == 0, err
    model = onnx.load(str(out_path))
    assert model.graph.node
    for node in model.graph.node:
        assert node.name.endswith("_X") and node.name[:-2] == node.name[:-2].upper(), node.name
        assert node.doc_string == "shouted by onnxopt"
    assert "renamed" in out


def test_plugin_listed_by_passes(capsys, clean_registry):
    rc, out, err = cli(capsys, "passes", "--plugin", SHOUT)
    assert rc == 0, err
    assert "shout: Rename every node to upper case" in out
    assert "suffix (str, default )" in out and "doc (bool, default False)" in out
    assert "fold:" in out and "fuse:" in out


def test_plugin_unknown_option_lists_its_options(demo, capsys, clean_registry):
    rc, _, err = cli(capsys, demo, "--plugin", SHOUT, "-p", "shout:loud=1", *SHAPE, *FAST)
    assert_one_line_error(rc, err, "pass 'shout' has no option 'loud'", "valid options: suffix, doc")


@pytest.mark.parametrize("content, fragments", [
    (None, ["plugin file not found"]),
    ("def broken(:\n", ["failed to import", "SyntaxError"]),
    ("X = 1\n", ["defines no Pass subclass"]),
])
def test_bad_plugin_is_one_line(content, fragments, demo, tmp_path, capsys, clean_registry):
    plugin = tmp_path / "plug.py"
    if content is not None:
        plugin.write_text(content)
    rc, _, err = cli(capsys, demo, "--plugin", plugin, "-p", "fold", *SHAPE, *FAST)
    assert_one_line_error(rc, err, *fragments)


def test_subprocess_plugin(tmp_path):
    out_path = tmp_path / "out.onnx"
    proc = _proc(DEMO, "--plugin", SHOUT, "-p", "shout", *SHAPE, "--runs", "0", "-o", out_path)
    assert proc.returncode == 0, proc.stderr
    names = [n.name for n in onnx.load(str(out_path)).graph.node]
    assert names and all(name == name.upper() for name in names)
    proc = _proc("passes", "--plugin", SHOUT)
    assert proc.returncode == 0 and "shout:" in proc.stdout
