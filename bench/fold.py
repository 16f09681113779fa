"""Benchmark: onnxsim and onnxslim side by side with ``onnxopt -p fold,fuse``.

Run (from the repository root; one benchmark at a time on a small machine):

    .venv/bin/python bench/fold.py                      # all 11 models, 3 repeats (~10 min)
    .venv/bin/python bench/fold.py --quick              # skips vgg19, zfnet512, bvlc_alexnet
    .venv/bin/python bench/fold.py --models resnet50,minilm --repeat 1 --json out.json

Models: the 9 light models of the onnx package (models/light.py, fed and checked as onnx's backend
tests do), MiniLM (models/minilm.py; 2 real sentences from models/corpus.py, padded to 128 tokens)
and the digits CNN (models/digits.py; the held-out images).

Every (model, tool, repeat) runs in a fresh Python process (bench/_measure.py) that imports the tool,
loads the model with onnx.load, calls the tool on the loaded ModelProto with its defaults (onnxsim:
``simplify(model)``; onnxslim: ``slim(model)``; onnxopt: ``optimize(model, "fold,fuse",
compare=False, verify="structure")``) and saves the result. The tool order rotates in each repeat
round. Measured per tool: node count of the result; wall time of the call alone (median over
repeats) and of the whole child process (interpreter start, imports, load, call, save); peak RSS of
the child through the call (its own RUSAGE_SELF maxrss: imports + model + tool). The parent then
runs the original and each result with onnxruntime (CPU) on the same feeds: a result matches when
allclose(rtol 1e-4, atol 1e-5) against the original's outputs and, for light models, against the
reference outputs stored with them. ``onnxopt-nv`` (onnxopt with verify="none") is also measured
unless --no-verify-none; it appears in the ratios and the JSON, not in the main table.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import onnx  # noqa: E402
from tqdm import tqdm  # noqa: E402

from _machine import describe  # noqa: E402
from _measure import EXTRA_TOOLS, TOOLS, compare, op_histogram, ort_outputs, run_tool  # noqa: E402

HEAVY = ("bvlc_alexnet", "vgg19", "zfnet512")  # folded weights of 250-575 MB
ALIASES = {"alexnet": "bvlc_alexnet"}


def all_models() -> list[str]:
    from models.light import light_models

    return light_models() + ["minilm", "digits"]


def load_case(name: str):
    """(model path, feeds, reference outputs or None)."""
    if name == "minilm":
        from models import corpus, minilm

        return minilm.build(), minilm.encode(corpus.sentences(2, offset=1000), seq_len=128), None
    if name == "digits":
        from models import digits

        path = digits.build()
        return path, {"image": digits.heldout()[0]}, None
    from models.light import light_case

    return light_case(name)


def summarize(runs: list[dict], out_path: Path, feeds, original, reference) -> dict:
    """Median times, peak memory, nodes, ops and output agreement of one tool on one model."""
    good = [r for r in runs if r["ok"]]
    s = {"ok": len(good) == len(runs), "runs": runs}
    if not s["ok"]:
        s["error"] = next(r["error"] for r in runs if not r["ok"])
    if not good:
        return s
    for key in ("call_s", "process_s", "import_s", "peak_mb", "peak_mb_before"):
        s[key] = statistics.median(r[key] for r in good)
    s["nodes"] = good[-1]["nodes"]
    if not out_path.exists():
        return s
    s["ops"] = dict(sorted(op_histogram(out_path).items()))
    try:
        got = ort_outputs(out_path, feeds)
    except Exception as exc:  # noqa: BLE001 - report, do not crash the benchmark
        s.update(match=False, ort_error=f"{type(exc).__name__}: {str(exc).strip()[:200]}")
        return s
    s["err_orig"], s["ok_orig"] = compare(got, original)
    s["match"] = s["ok_orig"]
    if reference is not None:
        s["err_ref"], s["ok_ref"] = compare(got, reference)
        s["match"] &= s["ok_ref"]
    return s


def bench_model(name: str, tools: list[str], repeat: int, bar: tqdm) -> dict:
    path, feeds, reference = load_case(name)
    original = ort_outputs(path, feeds)
    res = {"path": str(path), "nodes_in": len(onnx.load(str(path), load_external_data=False).graph.node),
           "ops_in": dict(sorted(op_histogram(path).items())), "tools": {}}
    if reference is not None:
        res["err_orig_vs_ref"] = compare(original, reference)[0]
    runs: dict[str, list[dict]] = {t: [] for t in tools}
    with tempfile.TemporaryDirectory(prefix="bench_fold_") as tmp:
        outs = {t: Path(tmp) / f"{t}.onnx" for t in tools}
        for r in range(repeat):
            for tool in tools[r % len(tools):] + tools[:r % len(tools)]:  # rotate the order each round
                bar.set_postfix_str(f"{name} {tool} #{r + 1}")
                outs[tool].unlink(missing_ok=True)
                runs[tool].append(run_tool(tool, path, outs[tool]))
                bar.update()
        for tool in tools:
            res["tools"][tool] = summarize(runs[tool], outs[tool], feeds, original, reference)
    return res


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda row: " | ".join(str(x).ljust(w) for x, w in zip(row, widths))  # noqa: E731
    return "\n".join([line(header), "-+-".join("-" * w for w in widths), *map(line, rows)])


def _nodes(s: dict) -> str:
    return str(s["nodes"]) if s["ok"] else "FAILED"


def _time(s: dict) -> str:
    return f"{s['call_s']:.2f} ({s['process_s']:.1f})" if s["ok"] else "-"


def _match(s: dict) -> str:
    if not s["ok"]:
        return "err"
    return "ORT!" if "ort_error" in s else ("ok" if s.get("match") else "FAIL")


def report(results: dict[str, dict]) -> None:
    rows, details, ratios, failures = [], [], [], []
    for name, res in results.items():
        t = res["tools"]
        rows.append([name, res["nodes_in"], *(_nodes(t[x]) for x in TOOLS), *(_time(t[x]) for x in TOOLS),
                     " / ".join(f"{t[x]['peak_mb']:.0f}" if t[x]["ok"] else "-" for x in TOOLS),
                     " ".join(_match(t[x]) for x in TOOLS)])
        for x in TOOLS:
            s = t[x]
            if not s["ok"] or "ort_error" in s:
                failures.append(f"  {name} / {x}: {s.get('error') or s.get('ort_error')}")
                continue
            details.append([name, x, f"{s['import_s']:.2f}", f"{s['peak_mb_before']:.0f}", f"{s['peak_mb']:.0f}",
                            f"{s['err_orig']:.2g}", f"{s['err_ref']:.2g}" if "err_ref" in s else "-"])
        others = [t[x] for x in TOOLS[:2] if t[x]["ok"]]
        opt, nv = t["onnxopt"], t.get("onnxopt-nv")
        if opt["ok"] and others:
            best = min(others, key=lambda s: s["nodes"])
            diff = {op: n - best.get("ops", {}).get(op, 0) for op, n in opt.get("ops", {}).items()}
            extra = ", ".join(f"{op} +{d}" for op, d in sorted(diff.items(), key=lambda kv: -kv[1]) if d > 0)
            best = best["nodes"]
            slim = t["onnxslim"]
            ratios.append([name, f"{opt['nodes']}/{best} = {opt['nodes'] / best:.2f}",
                           f"{opt['call_s'] / slim['call_s']:.2f}x" if slim["ok"] else "-",
                           f"{opt['process_s'] / slim['process_s']:.2f}x" if slim["ok"] else "-",
                           f"{nv['call_s']:.2f} vs {opt['call_s']:.2f}" if nv and nv["ok"] else "-",
                           extra or "-"])
    print("\nTimes: seconds of the tool call on a loaded ModelProto, median over repeats; in parentheses the"
          "\nwhole child process (start, imports, load, call, save). Peak MB: child's max RSS through the call."
          "\nMatch: ORT outputs allclose(rtol 1e-4, atol 1e-5) vs the original model (and the reference for"
          "\nlight models); err = the tool failed, ORT! = onnxruntime cannot run the result.\n")
    print(table(rows, ["model", "nodes in", *TOOLS, *(f"time {x}" for x in TOOLS),
                       "peak MB sim/slim/opt", "outputs match sim slim opt"]))
    print("\nDetails (import s = tool imports, medians; peak MB before call = imports + loaded model):\n")
    print(table(details, ["model", "tool", "import s", "peak MB before call", "peak MB", "max|err| vs orig",
                          "max|err| vs ref"]))
    if failures:
        print("\nFailures:\n" + "\n".join(failures))
    print("\nRatios (onnxopt nodes / best of onnxsim and onnxslim; onnxopt time / onnxslim time):\n")
    print(table(ratios, ["model", "nodes opt/best", "call opt/slim", "process opt/slim",
                         "opt call s verify=none vs structure", "ops onnxopt has more of than the best other"]))
    if ratios:
        gm = lambda xs: math.exp(statistics.mean(math.log(x) for x in xs))  # noqa: E731
        ok = [r for r in results.values() if r["tools"]["onnxopt"]["ok"] and r["tools"]["onnxslim"]["ok"]]
        print(f"\ngeometric mean over {len(ok)} models: onnxopt call / onnxslim call = "
              f"{gm([r['tools']['onnxopt']['call_s'] / r['tools']['onnxslim']['call_s'] for r in ok]):.2f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", help=f"comma-separated subset of: {', '.join(all_models())}")
    p.add_argument("--repeat", type=int, default=3, help="runs per (model, tool); median wall time (default 3)")
    p.add_argument("--json", help="also write all results (every run, op histograms) to this file")
    p.add_argument("--quick", action="store_true", help=f"skip {', '.join(HEAVY)} (folded weights 250-575 MB)")
    p.add_argument("--no-verify-none", action="store_true", help="do not also time onnxopt with verify='none'")
    args = p.parse_args(argv)
    print(describe(), flush=True)
    names = all_models()
    if args.models:
        names = [ALIASES.get(n.strip(), n.strip()) for n in args.models.split(",") if n.strip()]
        unknown = sorted(set(names) - set(all_models()))
        if unknown:
            p.error(f"unknown model(s) {unknown}; known: {all_models()}")
    if args.quick:
        names = [n for n in names if n not in HEAVY]
    tools = list(TOOLS) + ([] if args.no_verify_none else list(EXTRA_TOOLS))
    start = time.perf_counter()
    results = {}
    with tqdm(total=len(names) * len(tools) * args.repeat, unit="run", file=sys.stderr) as bar:
        for name in names:
            results[name] = bench_model(name, tools, args.repeat, bar)
    report(results)
    print(f"\n{len(names)} models x {len(tools)} tools x {args.repeat} repeats in {time.perf_counter() - start:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
