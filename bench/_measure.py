"""Shared benchmark helpers: run one optimizer in a fresh child process and check outputs with ORT.

As a script it is the child: ``python bench/_measure.py TOOL SRC DST RESULT.json`` imports the
tool, loads SRC with ``onnx.load``, times the tool's call on that ModelProto, saves the result to
DST and writes a JSON record (times, node count, peak RSS = VmHWM) to RESULT.json. The
parent side (:func:`run_tool`) adds the wall time of the whole child process.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np

TOOLS = ("onnxsim", "onnxslim", "onnxopt")
EXTRA_TOOLS = ("onnxopt-nv",)  # onnxopt with verify="none"
RTOL, ATOL = 1e-4, 1e-5


def _peak_mb() -> float:
    """Peak RSS of this process in MiB: VmHWM of /proc/self/status. Not RUSAGE_SELF's ru_maxrss alone:
    Linux carries the parent's RSS at fork into the child's ru_maxrss across exec, so a big parent
    would set a floor under every child's number."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _tool_call(tool: str):
    """Import `tool` (and what its call imports lazily: onnxruntime, onnxslim.core, onnxopt's passes),
    and return a function ModelProto -> ModelProto calling it with its defaults."""
    import onnxruntime  # noqa: F401 - imported lazily by the calls of onnxslim and onnxopt

    if tool == "onnxsim":
        import onnxsim

        def call(model):
            simplified, ok = onnxsim.simplify(model)
            if not ok:
                raise RuntimeError("onnxsim.simplify returned ok=False (check failed)")
            return simplified
        return call
    if tool == "onnxslim":
        import onnxslim
        import onnxslim.core  # noqa: F401 - slim() imports it on its first call
        return onnxslim.slim
    if tool in ("onnxopt", "onnxopt-nv"):
        import onnxopt
        from onnxopt.api import optimize  # noqa: F401 - onnxopt.optimize() imports it on its first call
        from onnxopt.pipeline import build_pipeline, parse_spec
        build_pipeline(parse_spec("fold,fuse"))  # imports the fold/fuse pass modules (networkx)
        verify = "structure" if tool == "onnxopt" else "none"
        return lambda model: onnxopt.optimize(model, "fold,fuse", compare=False, verify=verify)[0]
    raise ValueError(f"unknown tool {tool!r}")


def child_main(tool: str, src: str, dst: str, result_path: str) -> None:
    result: dict = {"tool": tool}
    try:
        import onnx  # common to all tools: not counted in the tool's import time

        start = time.perf_counter()
        call = _tool_call(tool)
        result["import_s"] = time.perf_counter() - start
        start = time.perf_counter()
        model = onnx.load(src)
        result["load_s"] = time.perf_counter() - start
        result["peak_mb_before"] = _peak_mb()
        start = time.perf_counter()
        out = call(model)
        result["call_s"] = time.perf_counter() - start
        result["peak_mb"] = _peak_mb()
        result["nodes"] = len(out.graph.node)
        start = time.perf_counter()
        onnx.save_model(out, dst)
        result["save_s"] = time.perf_counter() - start
        result["ok"] = True
    except BaseException as exc:  # noqa: BLE001 - the parent reports any failure in the table
        result.update(ok=False, error=f"{type(exc).__name__}: {str(exc).strip()[:300]}",
                      traceback=traceback.format_exc()[-2000:])
    Path(result_path).write_text(json.dumps(result))


def run_tool(tool: str, src: Path, dst: Path, timeout: float = 900) -> dict:
    """Run `tool` on `src` in a fresh Python process; returns the child's record plus ``process_s``."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = Path(f.name)
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, tool, str(src), str(dst), str(result_path)],
                              capture_output=True, text=True, timeout=timeout)
        process_s = time.perf_counter() - start
        text = result_path.read_text()
        result = json.loads(text) if text else {
            "tool": tool, "ok": False,
            "error": f"child exited {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:300]}"}
    except subprocess.TimeoutExpired:
        process_s, result = time.perf_counter() - start, {"tool": tool, "ok": False, "error": f"timeout {timeout}s"}
    finally:
        result_path.unlink(missing_ok=True)
    result["process_s"] = process_s
    return result


def ort_outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def compare(got: list[np.ndarray], want: list[np.ndarray], rtol: float = RTOL, atol: float = ATOL) -> tuple[float, bool]:
    """(max abs error, all outputs allclose at rtol/atol with matching shapes)."""
    if len(got) != len(want):
        return float("inf"), False
    worst, ok = 0.0, True
    for g, w in zip(got, want):
        if g.shape != w.shape:
            return float("inf"), False
        if g.size:
            worst = max(worst, float(np.abs(g.astype(np.float64) - w.astype(np.float64)).max()))
        ok &= bool(np.allclose(g, w, rtol=rtol, atol=atol))
    return worst, ok


def op_histogram(path: Path) -> Counter:
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    child_main(*sys.argv[1:5])
