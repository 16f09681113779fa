"""Careless and hostile command lines, one table: each case fails safely in one line (or, where the
case is a bad cache, recovers), never prints "internal error" or a traceback, and leaves every
input byte as it was and no stray file behind. The next case is one line to add.

Each case runs in a fresh folder holding: m.onnx (the demo CNN, dynamic batch), ext.onnx with its
weights in weights.bin, d.npz (its inputs), calib.npz, shout.py (a plugin), cfg.toml, and whatever
the case's `setup` adds. `{name}` in a command is that file's path; `{tmp}` the folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt.cli import main

REPO = Path(__file__).resolve().parents[1]
S = ["--shape", "image=1x1x8x8", "--runs", "2"]


@dataclasses.dataclass
class Case:
    id: str
    argv: list[str]
    rc: int
    message: str  # the first words of the one stderr line ("" for a run that must succeed)
    setup: Callable[[Path], None] | None = None
    creates: tuple[str, ...] = ()  # files the run may write (all others must stay byte-for-byte)
    pipe: bool = False  # run in a subprocess whose stdout is a pipe nobody reads any more


def external_data_at(location: str, name: str):
    """A model in sub/ whose weights point at `location` (made after the folder's base files)."""
    def setup(tmp: Path):
        (tmp / "sub").mkdir(exist_ok=True)
        model = onnx.load(str(tmp / "ext.onnx"), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save(model, str(tmp / "sub" / name))
        if location == "link.bin":
            os.symlink(tmp / "weights.bin", tmp / "sub" / "link.bin")
    return setup


def broken_initializer(dims: list[int] | None):
    """m.onnx with its first weight cut to half its bytes, or given far larger `dims`."""
    def setup(tmp: Path):
        model = onnx.load(str(tmp / "m.onnx"))
        tensor = model.graph.initializer[0]
        if dims is None:
            tensor.raw_data = tensor.raw_data[: len(tensor.raw_data) // 2]
        else:
            del tensor.dims[:]
            tensor.dims.extend(dims)
        onnx.save(model, str(tmp / "bad.onnx"))
    return setup


def two_inputs_that_must_agree(tmp: Path):
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "add",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4]) for n in "ab"],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp / "add.onnx"))
    np.savez(tmp / "ab.npz", a=np.zeros((2, 4), np.float32), b=np.zeros((3, 4), np.float32))


def data_named_like_an_output(tmp: Path):
    """ext2.onnx keeps its weights in out.onnx.data: `-o out.onnx` would write its own data there."""
    onnx.save(onnx.load(str(tmp / "m.onnx")), str(tmp / "ext2.onnx"), save_as_external_data=True,
              location="out.onnx.data", size_threshold=0)


def write(name: str, text: str):
    return lambda tmp: (tmp / name).write_text(text)


def fifo(tmp: Path):
    os.mkfifo(tmp / "fifo.onnx")


def char_device(tmp: Path):
    """A private copy of /dev/null's device node: if onnxopt replaced it, only this copy would go."""
    try:
        os.mknod(tmp / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except (PermissionError, OSError):
        pytest.skip("cannot create a device node here")


def bad_cache_entries(tmp: Path):
    """Calibration statistics cached by a first run, then made wrong: a histogram of the wrong length."""
    assert main([str(tmp / "m.onnx"), "-p", "quant:keep_if_slower=false", "--calib", str(tmp / "calib.npz"),
                 "--no-compare"]) == 0
    entries = list((tmp / "cache" / "calib").glob("*.npz"))
    assert entries
    for entry in entries:
        with np.load(entry) as archive:
            arrays = dict(archive)
        arrays = {k: (v[:-4] if k.startswith("hist_") else v) for k, v in arrays.items()}
        np.savez(entry, **arrays)


PLAIN = ["{m}", "-p", "fold", *S]
CASES = [
    # outputs that are inputs
    Case("report-is-the-input", [*PLAIN, "--report", "{m}"], 2, "onnxopt: error: report"),
    Case("output-is-the-external-data", ["{ext}", "-p", "fold", *S, "-o", "{weights}"], 2,
         "onnxopt: error: output"),
    Case("output-is-the-data", [*PLAIN, "--data", "{d}", "-o", "{d}"], 2, "onnxopt: error: output"),
    Case("output-is-the-calib-data", [*PLAIN, "--calib", "{calib}", "-o", "{calib}"], 2, "onnxopt: error: output"),
    Case("output-is-the-plugin", [*PLAIN, "--plugin", "{shout}", "-o", "{shout}"], 2, "onnxopt: error: output"),
    Case("output-is-the-config", ["{m}", "-c", "{cfg}", "-o", "{cfg}"], 2, "onnxopt: error: output"),
    Case("report-is-the-output", [*PLAIN, "-o", "{tmp}/o.onnx", "--report", "{tmp}/o.onnx"], 2,
         "onnxopt: error: report"),
    Case("output-external-data-is-an-input", ["{tmp}/ext2.onnx", "-p", "fold", *S, "-o", "{tmp}/out.onnx"], 2,
         "onnxopt: error: the output's external data", setup=data_named_like_an_output),
    # outputs that are not files, or cannot be written
    Case("output-is-a-fifo", [*PLAIN, "-o", "{tmp}/fifo.onnx"], 2, "onnxopt: error: output", setup=fifo),
    Case("output-is-a-device", [*PLAIN, "-o", "{tmp}/null"], 2, "onnxopt: error: output", setup=char_device),
    Case("output-under-proc", [*PLAIN, "-o", "/proc/onnxopt_test.onnx"], 2, "onnxopt: error: cannot write"),
    Case("report-under-proc", [*PLAIN, "--report", "/proc/onnxopt_test.json"], 2, "onnxopt: error: cannot write"),
    Case("inspect-into-a-closed-pipe", ["inspect", "{m}"], 141, "", pipe=True),
    # inputs ORT cannot take
    Case("data-of-a-wrong-fixed-dim", [*PLAIN[:3], "--data", "{tmp}/d9.npz", "--runs", "2"], 2,
         "onnxopt: error: {tmp}/d9.npz: input 'image' has shape [2, 1, 9, 9]",
         setup=lambda tmp: np.savez(tmp / "d9.npz", image=np.zeros((2, 1, 9, 9), np.float32))),
    Case("data-that-ort-refuses", ["{tmp}/add.onnx", "-p", "fold", "--data", "{tmp}/ab.npz", "--runs", "2"], 2,
         "onnxopt: error: ONNX Runtime could not run the model on these inputs", setup=two_inputs_that_must_agree),
    Case("shape-larger-than-memory", ["{m}", "-p", "fold", "--shape", "image=1000000000x1x8x8"], 2,
         "onnxopt: error: the sample inputs would take"),
    # models that point outside themselves or lie about their sizes
    Case("external-data-absolute", ["{tmp}/sub/abs.onnx", "-p", "fold", *S], 2, "onnxopt: error: {tmp}/sub/abs.onnx: "
         "tensor 'features.0.weight' keeps its data at '/etc/passwd'", setup=external_data_at("/etc/passwd", "abs.onnx")),
    Case("external-data-dotdot", ["{tmp}/sub/up.onnx", "-p", "fold", *S], 2, "onnxopt: error: {tmp}/sub/up.onnx: "
         "tensor 'features.0.weight' keeps its data at '../weights.bin'",
         setup=external_data_at("../weights.bin", "up.onnx")),
    Case("external-data-symlink", ["{tmp}/sub/link.onnx", "-p", "fold", *S], 2, "onnxopt: error: {tmp}/sub/link.onnx: "
         "tensor 'features.0.weight' keeps its data at 'link.bin'", setup=external_data_at("link.bin", "link.onnx")),
    Case("initializer-shorter-than-its-dims", ["{tmp}/bad.onnx", "-p", "fold", *S], 2,
         "onnxopt: error: {tmp}/bad.onnx: initializer 'features.0.weight' declares 576 bytes",
         setup=broken_initializer(None)),
    Case("initializer-with-a-huge-dim", ["{tmp}/bad.onnx", "-p", "fold", *S], 2,
         "onnxopt: error: {tmp}/bad.onnx: initializer 'features.0.weight' declares 4.0 TB",
         setup=broken_initializer([2**40])),
    # settings
    Case("negative-runs", ["{m}", "-p", "fold", "--shape", "image=1x1x8x8", "--runs", "-5"], 2,
         "onnxopt: error: command line: runs must be >= 0"),
    Case("negative-threads", [*PLAIN, "--threads", "-1"], 2, "onnxopt: error: command line: threads must be >= 0"),
    Case("plugin-that-exits", [*PLAIN, "--plugin", "{tmp}/exits.py"], 2, "onnxopt: error: plugin {tmp}/exits.py "
         "called sys.exit(3)", setup=write("exits.py", "import sys\nsys.exit(3)\n")),
    Case("calib-that-is-not-an-npz", ["{m}", "-p", "quant", *S, "--calib", "{tmp}/junk.npz"], 2,
         "onnxopt: error: {tmp}/junk.npz is not an .npz", setup=write("junk.npz", "not an npz\n")),
    Case("missing-calib-data", ["{m}", "-p", "quant", *S], 2, "onnxopt: error: quant needs representative data "
         "(pass --calib data.npz"),
    Case("cache-entry-with-bad-statistics", ["{m}", "-p", "quant:keep_if_slower=false", "--calib", "{calib}",
                                             "--no-compare"], 0, "", setup=bad_cache_entries, creates=("cache",)),
]


def base_folder(tmp: Path) -> None:
    shutil.copyfile(REPO / "models" / "demo.onnx", tmp / "m.onnx")
    shutil.copyfile(REPO / "models" / "demo_inputs.npz", tmp / "d.npz")
    shutil.copyfile(REPO / "models" / "demo_inputs.npz", tmp / "calib.npz")
    shutil.copyfile(REPO / "tests" / "plugins" / "shout_pass.py", tmp / "shout.py")
    onnx.save(onnx.load(str(tmp / "m.onnx")), str(tmp / "ext.onnx"), save_as_external_data=True,
              location="weights.bin", size_threshold=0)
    (tmp / "cfg.toml").write_text('passes = ["fold"]\nruns = 2\n[shapes]\nimage = "1x1x8x8"\n')


def snapshot(tmp: Path) -> dict[str, str]:
    """Every regular file below `tmp` (symlinks and FIFOs by kind), with its sha256."""
    files = {}
    for path in sorted(tmp.rglob("*")):
        rel = str(path.relative_to(tmp))
        if path.is_symlink() or not path.is_file():
            files[rel] = "dir" if path.is_dir() and not path.is_symlink() else "special"
        else:
            files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_command_line(case: Case, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    base_folder(tmp_path)
    if case.setup:
        case.setup(tmp_path)
    capsys.readouterr()
    names = {p.stem: str(p) for p in tmp_path.iterdir() if p.is_file()}
    names.update(tmp=str(tmp_path), weights=str(tmp_path / "weights.bin"))
    argv = [a.format(**names) for a in case.argv]
    before = snapshot(tmp_path)
    if case.pipe:
        # The reader is gone before the first write (read end closed up front), so the outcome does not
        # depend on how fast `head` would have been.
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            proc = subprocess.run([sys.executable, "-m", "onnxopt.cli", *argv], stdout=write_end,
                                  stderr=subprocess.PIPE, text=True, cwd=tmp_path, timeout=60)
        finally:
            os.close(write_end)
        rc, err = proc.returncode, proc.stderr
    else:
        rc = main(argv)
        err = capsys.readouterr().err
    assert rc == case.rc, err
    assert "internal error" not in err and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    if case.message:
        assert len(lines) == 1, err
        assert lines[0].startswith(case.message.format(**names)), lines[0]
    else:
        assert not [line for line in lines if "error" in line], err
    after = snapshot(tmp_path)
    changed = {f for f in before.keys() | after.keys() if before.get(f) != after.get(f)}
    allowed = {f for f in changed if any(f == c or f.startswith(f"{c}/") for c in case.creates)}
    assert changed == allowed, f"inputs changed or stray files: {sorted(changed - allowed)}"
    assert Path("/dev/null").is_char_device()


def _start(tmp: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, ONNXOPT_CACHE=str(tmp / "cache"))
    return subprocess.Popen([sys.executable, "-m", "onnxopt.cli", *args], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("delay", [1.0, 3.0, 6.5])  # importing, calibrating, about to write
def test_a_killed_run_leaves_no_partial_output(signum, delay, minilm_model, tmp_path):
    """Stopped while calibrating or while writing, a run leaves the old output as it was, or a whole new one."""
    import signal
    import time

    from models import minilm

    old = tmp_path / "out.onnx"
    old.write_bytes(b"the previous output")
    proc = _start(tmp_path, str(minilm_model), "-p", "fold,fuse,quant:keep_if_slower=false", "--calib",
                  str(minilm.calibration_npz()), "--no-compare", "-o", str(old))
    time.sleep(delay)
    proc.send_signal(getattr(signal, signum))
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err and "internal error" not in err
    content = old.read_bytes()
    # the old output as it was, or a whole new model: finished before the signal, or stopped after
    # the model was in place (while reporting), which exits non-zero with nothing lost
    if proc.returncode == 0 or content != b"the previous output":
        onnx.checker.check_model(onnx.load_from_string(content))
    if signum != "SIGKILL":  # a killed process cannot clean up; the others must
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.onnx")]


@pytest.mark.slow
def test_concurrent_runs_on_one_cache_write_identical_outputs(tmp_path):
    shutil.copyfile(REPO / "models" / "demo.onnx", tmp_path / "m.onnx")
    args = ["m.onnx", "-p", "fold,fuse,quant:keep_if_slower=false", "--calib", str(REPO / "models" / "demo_inputs.npz"),
            "--no-compare"]
    procs = [_start(tmp_path, *args, "-o", f"out{i}.onnx") for i in range(3)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    outputs = {(tmp_path / f"out{i}.onnx").read_bytes() for i in range(3)}
    assert len(outputs) == 1
    assert len(list((tmp_path / "cache" / "calib").glob("*.npz"))) == 1
