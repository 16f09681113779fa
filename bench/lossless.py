"""Benchmark: what each lossless simplifier's output costs to run — onnxsim 0.8.1's `simplify`,
onnxslim's `slim` and onnxopt's `fold,fuse` — on MiniLM as TorchScript and as torch's default (dynamo)
exporter write it, as TorchScript writes it at opset 11, and as ORT's transformer optimizer fuses it
(`model_optimized.onnx`), in one run.

    .venv/bin/python bench/lossless.py                     # minilm, minilm-dynamo (~4 min on 2 cores)
    .venv/bin/python bench/lossless.py --models minilm-dynamo --json out.json
    .venv/bin/python bench/lossless.py --models minilm-opset11,minilm-ort-fused

Each tool gets the exported fp32 model and runs in this process with its defaults (onnxopt without
its report). The results and the input are timed alternately with ORT on the CPU (bench/quant.py's
`measure`: round robin, shuffled each round) at batch 1 and 8 with 1 and 2 threads, on 300 real
sentences padded to 128 tokens; ratios are input median / result median (> 1 is faster). "input, 2nd
session" is the input timed as a candidate: how far it strays from 1.00x is this run's noise. Every
result must match the input (max abs difference printed; the lossless rewrites reassociate float sums).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from _machine import describe  # noqa: E402
from quant import evaluate, measure, reference  # noqa: E402

NOISE_ROW = "input, 2nd session"


def simplify(tool: str, source: Path, dest: Path) -> Path:
    model = onnx.load(str(source))
    if tool == "onnxsim":
        import onnxsim

        model, ok = onnxsim.simplify(model)
        if not ok:
            raise RuntimeError("onnxsim's check failed")
    elif tool == "onnxslim":
        import onnxslim

        model = onnxslim.slim(model)
    else:
        import onnxopt

        model, _ = onnxopt.optimize(model, "fold,fuse", compare=False)
    onnx.save(model, str(dest))
    return dest


def source(name: str) -> Path:
    from models import dynamo, minilm, ort_fused

    return {"minilm": minilm.build, "minilm-dynamo": dynamo.minilm, "minilm-ort-fused": ort_fused.minilm,
            "minilm-opset11": lambda: minilm.build(opset=11)}[name]()


def run_model(name: str, workdir: Path) -> dict:
    from models import minilm

    path = source(name)
    paths = {"input": str(path)}
    paths |= {tool: str(simplify(tool, path, workdir / f"{name}.{tool}.onnx"))
              for tool in ("onnxsim", "onnxslim", "onnxopt fold,fuse")}
    feeds = minilm.evaluation_feeds(300)
    timings = measure(paths | {NOISE_ROW: str(path)}, feeds, (20, 8))
    outputs = evaluate(paths, feeds, lambda outs: outs)
    rows = {tool: {"timing": timings[tool], "nodes": len(onnx.load(p).graph.node),
                   "max_abs_diff": float(np.abs(outputs[tool] - outputs["input"]).max())} for tool, p in paths.items()}
    rows[NOISE_ROW] = {"timing": timings[NOISE_ROW], "nodes": rows["input"]["nodes"], "max_abs_diff": 0.0}
    return rows


def print_table(name: str, rows: dict) -> None:
    base = reference(rows, "input", NOISE_ROW)
    print(f"\n{name}: input (the faster of its two sessions) b1_1t {base['b1_1t']:.2f} ms, b8_1t {base['b8_1t']:.2f} ms, "
          f"b1_2t {base['b1_2t']:.2f} ms, b8_2t {base['b8_2t']:.2f} ms")
    keys = ["b1_1t", "b8_1t", "b1_2t", "b8_2t"]
    print(f"{'result':<20} | nodes | {' | '.join(f'{k:>6}' for k in keys)} | max abs diff")
    for tool, row in rows.items():
        ratios = " | ".join(f"{base[k] / row['timing'][k]:5.2f}x" for k in keys)
        print(f"{tool:<20} | {row['nodes']:>5} | {ratios} | {row['max_abs_diff']:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,minilm-dynamo")
    parser.add_argument("--json", help="write all results here")
    args = parser.parse_args()
    print(describe(), flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            results[name] = run_model(name, Path(tmp))
            print_table(name, results[name])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
