"""Benchmark: pruning without training — onnxopt, onnxsim 0.8.1's pruners and Torch-Pruning 1.6 — in one run.

    .venv/bin/python bench/prune.py                          # digits, minilm, resnet (~40 min on 2 cores)
    .venv/bin/python bench/prune.py --models digits --json out.json

Every tool gets the same fp32 model and representative data (digits: 200 training images; MiniLM:
the corpus's first 1,000 sentences padded to 128 tokens, or the first 160 in the rows marked @160;
ResNet-18-like net with random weights: 32 random-normal images). onnxsim's MiniLM rows are all
@160: it keeps every activation of its calibration set in memory, and on 1,000 sentences its
structured wanda pruner with finetune held 15 GB and had not finished after 10 minutes. No row is
trained after pruning. Each pruning runs in a fresh process (bench/_prune_child.py): its wall time and peak
RSS are the tool's own. Then all candidates and fp32 are timed alternately (round robin, shuffled
each round) with ORT on the CPU, 1 intra-op thread, batch 1 and 8; ratios are fp32 median /
candidate median (> 1 is faster), fp32 being the faster of its two sessions (`quant.reference`).
"fp32, 2nd session" is the fp32 file timed like a candidate: its distance from the first fp32 row
is this run's noise.

onnxsim's structured and head pruners only match graphs in the form they expect: on MiniLM that is
ONNX Runtime's BERT fusion (onnxruntime.transformers optimize_model, opt_level 1; on the plain
export they change nothing), on the CNNs onnxsim.simplify's output. The rows "fp32 ORT-fused" and
"fp32 onnxsim-simplified" are those forms unpruned, so a peer's speed-up from its graph form alone
can be told from its pruning's. onnxopt runs on the plain export, as `fold,fuse,prune:...`.
The MiniLM rows marked "measured" (`allocation=measured`) remove as many FFN neurons in all as the
uniform row of the same ratio, spread over the layers by measured sensitivity.
Torch-Pruning prunes the digits CNN's torch module (DepGraph, L2 magnitude, the classifier kept) and
is exported like the fp32 model; the ResNet here is built in ONNX, so it has no torch row.

Accuracy: digits, held-out top-1; MiniLM, mean cosine of mean-pooled L2-normalised embeddings to
fp32 and nearest-neighbour agreement on 300 other sentences; ResNet, top-1 agreement with fp32 on
64 other random-normal images. Columns: params (float weights, millions), nonzero (millions), file
MB, deflate MB (zlib level 6 of the file: what sparsity saves in a compressed download).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _machine import describe  # noqa: E402
from quant import NOISE_ROW, _agreement, _embedding_accuracy, _next_byte, _top1, evaluate, measure, reference  # noqa: E402

FUSED, SIMPLIFIED = "fp32 ORT-fused", "fp32 onnxsim-simplified"


def _minilm_rows(samples: int, tag: str) -> dict[str, tuple[str, str]]:
    prune = f"fold,fuse,prune:samples={samples}"
    return {f"onnxopt FFN 50%{tag}": (f"onnxopt:{prune},ratio=0.5", "plain"),
            f"onnxopt FFN 25%{tag}": (f"onnxopt:{prune},ratio=0.25", "plain"),
            f"onnxopt heads 50%{tag}": (f"onnxopt:{prune},structure=heads,ratio=0.5", "plain")}


def case(name: str, quick: bool) -> dict:
    """fp32 path, representative data, evaluation inputs, candidates {row: (tool, graph form[, calib])}."""
    if name == "digits":
        from models import digits

        images, labels = digits.heldout()
        candidates = {
            "onnxopt 50%": ("onnxopt:fold,fuse,prune:ratio=0.5", "plain"),
            "onnxopt 50% measured": ("onnxopt:fold,fuse,prune:ratio=0.5,allocation=measured", "plain"),
            "onnxopt min_speedup=1.6": ("onnxopt:fold,fuse,prune:min_speedup=1.6", "plain"),
            "onnxopt 50% magnitude, no refit": ("onnxopt:fold,fuse,prune:ratio=0.5,importance=magnitude,recover=false",
                                                "plain"),
            "onnxsim structured 50%": ("onnxsim:structured_pruning:0.5", "simplified"),
            "onnxsim structured 50% +ft": ("onnxsim:structured_pruning:0.5+ft", "simplified"),
            "onnxsim structured wanda 50%": ("onnxsim:structured_wanda_pruning:0.5", "simplified"),
            "onnxsim structured wanda 50% +ft": ("onnxsim:structured_wanda_pruning:0.5+ft", "simplified"),
            "torch-pruning 50%": ("torch-pruning:0.5", "plain"),
            "onnxopt 2:4": ("onnxopt:prune:structure=2:4", "plain"),
            "onnxsim sparsegpt 2:4": ("onnxsim:sparsegpt_pruning:0.5:2:4", "simplified"),
        }
        return {"path": digits.build(), "calib": digits.calibration_npz(), "eval": {"image": images},
                "rounds": (3000, 2000), "candidates": candidates, "accuracy": lambda outs: _top1(outs, labels)}
    if name == "minilm":
        from models import minilm

        feeds = minilm.evaluation_feeds(300)
        candidates = {"onnxopt fold,fuse": ("onnxopt:fold,fuse", "plain"), **_minilm_rows(1000, "")}
        if not quick:
            candidates |= {k: (*v, "small") for k, v in _minilm_rows(160, " @160").items()}
        candidates |= {
            "onnxopt FFN max_error=0.02": ("onnxopt:fold,fuse,prune:samples=1000,max_error=0.02", "plain"),
            "onnxopt FFN 37.5% (uniform)": ("onnxopt:fold,fuse,prune:samples=1000,ratio=0.375", "plain"),
            "onnxopt FFN min_speedup=1.3": ("onnxopt:fold,fuse,prune:samples=1000,min_speedup=1.3", "plain"),
            "onnxopt FFN 25% measured": ("onnxopt:fold,fuse,prune:samples=1000,ratio=0.25,allocation=measured",
                                         "plain"),
            "onnxopt FFN 50% measured": ("onnxopt:fold,fuse,prune:samples=1000,ratio=0.5,allocation=measured",
                                         "plain"),
            "onnxopt fold,fuse,quant": ("onnxopt:fold,fuse,quant", "plain"),
            "onnxopt fold,fuse,prune 50%,quant": ("onnxopt:fold,fuse,prune:samples=1000,ratio=0.5,quant", "plain"),
            "onnxsim FFN wanda 50% @160": ("onnxsim:structured_wanda_pruning:0.5", "fused", "small"),
            "onnxsim FFN wanda 50% +ft @160": ("onnxsim:structured_wanda_pruning:0.5+ft", "fused", "small"),
            "onnxsim FFN wanda 25% +ft @160": ("onnxsim:structured_wanda_pruning:0.25+ft", "fused", "small"),
            "onnxsim heads wanda 50% @160": ("onnxsim:attention_head_wanda_pruning:0.5", "fused", "small"),
            "onnxsim heads wanda 50% +ft @160": ("onnxsim:attention_head_wanda_pruning:0.5+ft", "fused", "small"),
            "onnxopt unstructured 50%": ("onnxopt:fold,fuse,prune:samples=1000,structure=unstructured,ratio=0.5",
                                         "plain"),
            "onnxsim magnitude 50% @160": ("onnxsim:magnitude_pruning:0.5", "fused", "small"),
            "onnxsim wanda 50% @160": ("onnxsim:wanda_pruning:0.5", "fused", "small"),
            "onnxsim sparsegpt 50% @160": ("onnxsim:sparsegpt_pruning:0.5", "fused", "small"),
            "onnxopt 2:4": ("onnxopt:fold,fuse,prune:samples=1000,structure=2:4", "plain"),
            "onnxopt unstructured 50% @160": ("onnxopt:fold,fuse,prune:structure=unstructured,ratio=0.5", "plain",
                                              "small"),
            "onnxopt 2:4 @160": ("onnxopt:fold,fuse,prune:structure=2:4", "plain", "small"),
            "onnxsim magnitude 2:4 @160": ("onnxsim:magnitude_pruning:0.5:2:4", "fused", "small"),
            "onnxsim wanda 2:4 @160": ("onnxsim:wanda_pruning:0.5:2:4", "fused", "small"),
            "onnxsim sparsegpt 2:4 @160": ("onnxsim:sparsegpt_pruning:0.5:2:4", "fused", "small"),
        }
        return {"path": minilm.build(), "calib": minilm.calibration_npz(1000), "small_calib": minilm.calibration_npz(160),
                "eval": feeds, "rounds": (30, 10), "candidates": candidates,
                "accuracy": lambda outs: _embedding_accuracy(outs, feeds)}
    if name == "decoder":  # the Llama-style byte LM: SwiGLU FFN, heads as key/value groups (2 a layer)
        from models import decoder

        feeds = decoder.evaluation_feeds(200)
        candidates = {
            "onnxopt FFN 50%": ("onnxopt:fold,fuse,prune:ratio=0.5", "plain"),
            "onnxopt heads 50%": ("onnxopt:fold,fuse,prune:structure=heads,ratio=0.5", "plain"),
            "onnxopt unstructured 50%": ("onnxopt:fold,fuse,prune:structure=unstructured,ratio=0.5", "plain"),
            "onnxopt 2:4": ("onnxopt:fold,fuse,prune:structure=2:4", "plain"),
            "onnxsim structured wanda 50% +ft": ("onnxsim:structured_wanda_pruning:0.5+ft", "simplified"),
            "onnxsim heads wanda 50% +ft": ("onnxsim:attention_head_wanda_pruning:0.5+ft", "simplified"),
            "onnxsim sparsegpt 50%": ("onnxsim:sparsegpt_pruning:0.5", "simplified"),
            "onnxsim sparsegpt 2:4": ("onnxsim:sparsegpt_pruning:0.5:2:4", "simplified"),
        }
        return {"path": decoder.build(), "calib": decoder.calibration_npz(), "eval": feeds, "rounds": (100, 30),
                "candidates": candidates, "accuracy": lambda outs: _next_byte(outs, feeds)}
    if name == "resnet":
        from models import resnet

        candidates = {"onnxopt 50%": ("onnxopt:fold,fuse,prune:ratio=0.5", "plain"),
                      "onnxsim structured wanda 50% +ft": ("onnxsim:structured_wanda_pruning:0.5+ft", "simplified")}
        return {"path": resnet.build(), "calib": resnet.calibration_npz(), "eval": {"image": resnet.images(64, 1)},
                "rounds": (10, 5), "candidates": candidates, "accuracy": _agreement}
    raise SystemExit(f"unknown model {name}")


def graph_form(form: str, fp32: Path, workdir: Path) -> Path:
    """The fp32 model in the form a peer's pruners match: ORT-fused (transformers) or onnxsim-simplified."""
    dest = workdir / f"{fp32.stem}.{form}.onnx"
    if form == "plain" or dest.exists():
        return fp32 if form == "plain" else dest
    if form == "fused":
        from onnxruntime.transformers.optimizer import optimize_model

        # MiniLM: 12 heads of 32 over a 384-wide stream; opt_level 1 keeps the graph runnable on any EP.
        optimize_model(str(fp32), model_type="bert", num_heads=12, hidden_size=384, opt_level=1).save_model_to_file(str(dest))
    else:
        import onnxsim

        simplified, ok = onnxsim.simplify(onnx.load(str(fp32)))
        if not ok:
            raise RuntimeError("onnxsim.simplify failed its own check")
        onnx.save(simplified, str(dest))
    return dest


def prune_all(name: str, spec: dict, workdir: Path) -> dict:
    results = {}
    limit_s = spec.get("build_limit_s", 1800)  # a case that trains long gives its own
    for row, (tool, form, *calib) in tqdm(spec["candidates"].items(), desc=f"{name}: prune", unit="row"):
        # form "row:NAME": start from that earlier row's output (quant on a distilled model, say)
        src = Path(results[form[4:]]["path"]) if form.startswith("row:") else graph_form(form, Path(spec["path"]), workdir)
        if form.startswith("row:") and results[form[4:]].get("error"):
            results[row] = {"error": f"needs the row '{form[4:]}', which failed", "tool": tool}
            continue
        data = spec["small_calib"] if calib else spec["calib"]
        out = workdir / f"{name}.{len(results)}.onnx"
        try:
            train = [str(spec["train"])] if spec.get("train") else []
            proc = subprocess.run([sys.executable, str(ROOT / "bench/_prune_child.py"), tool, str(src), str(data),
                                   str(out), *train], capture_output=True, text=True, timeout=limit_s, cwd=workdir)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            info = json.loads(lines[-1]) if lines else {"error": (proc.stderr.strip().splitlines() or ["crashed"])[-1][:120]}
        except subprocess.TimeoutExpired:
            info = {"error": f"ran past {limit_s // 60} min"}
        if not info.get("error") and not out.exists():
            info["error"] = "no output written"
        results[row] = {**info, "tool": tool, "path": str(out)}
    return results


def weights(path: str) -> dict:
    """Float weight count, nonzero count, file MB and deflate MB of a model file."""
    model = onnx.load(path)
    total = nonzero = 0
    for init in model.graph.initializer:
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            array = numpy_helper.to_array(init)
            total += array.size
            nonzero += int(np.count_nonzero(array))
    raw = Path(path).read_bytes()
    return {"params_m": total / 1e6, "nonzero_m": nonzero / 1e6, "file_mb": len(raw) / 2**20,
            "deflate_mb": len(zlib.compress(raw, 6)) / 2**20}


def run_model(name: str, quick: bool, workdir: Path, cases=None, rows: str | None = None) -> dict:
    """Builds every candidate of `name` (from `cases`, default this bench's; only those matching the
    regular expression `rows` if given), times and scores them."""
    spec = (cases or case)(name, quick)
    if rows:
        spec["candidates"] = {k: v for k, v in spec["candidates"].items() if re.search(rows, k)}
    pruned = prune_all(name, spec, workdir)
    fp32 = Path(spec["path"])
    forms = {FUSED: "fused", SIMPLIFIED: "simplified"}
    used = {f for _, f, *_ in spec["candidates"].values() if not f.startswith("row:")}
    paths = {"fp32": str(fp32)} | {row: str(graph_form(f, fp32, workdir)) for row, f in forms.items() if f in used}
    paths |= {row: info["path"] for row, info in pruned.items() if not info.get("error")}
    rounds = tuple(max(3, r // 3) for r in spec["rounds"]) if quick else spec["rounds"]
    timings = measure(paths | {NOISE_ROW: paths["fp32"]}, spec["eval"], rounds, thread_counts=(1,))
    accuracy = spec["accuracy"](_outputs(paths, spec["eval"]))
    rows = {}
    for row in [*paths, NOISE_ROW, *(r for r in pruned if r not in paths)]:
        info = pruned.get(row, {})
        if info.get("error"):
            rows[row] = info
            continue
        rows[row] = {**info, **weights(paths.get(row, paths["fp32"])), "timing": timings[row],
                     "accuracy": accuracy["fp32" if row == NOISE_ROW else row]}
    if any("unstructured" in row or "2:4" in row for row in pruned):
        rows["fp32"]["deflate_half_zeroed_mb"] = _deflate_half_zeroed(paths["fp32"])
    return rows


def _deflate_half_zeroed(path: str) -> float:
    """Deflate MB of the model with the smaller half (by magnitude) of every constant MatMul/Gemm
    weight set to zero: what deflate makes of 50 % sparsity in those weights, whatever the method
    (a reference for the deflate target, no accuracy claim)."""
    model = onnx.load(path)
    read = {n.input[1] for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1}
    for init in model.graph.initializer:
        if init.name in read and init.data_type == onnx.TensorProto.FLOAT:
            w = numpy_helper.to_array(init).copy()
            w[np.abs(w) < np.median(np.abs(w))] = 0
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    return len(zlib.compress(model.SerializeToString(), 6)) / 2**20


def _outputs(paths: dict[str, str], feeds: dict) -> dict:
    collected = {}

    def capture(outputs):
        collected.update(outputs)
        return outputs

    evaluate(paths, feeds, capture)
    return collected


def print_table(name: str, rows: dict) -> None:
    base = reference(rows)
    metrics = list(rows["fp32"]["accuracy"])
    header = ["candidate", "params M", "nonzero M", "file MB", "deflate MB", "b1", "b8", *metrics, "build s", "peak MB"]
    lines = []
    for row, r in rows.items():
        if r.get("error"):
            lines.append([row, f"failed: {r['error']}"] + [""] * (len(header) - 2))
            continue
        lines.append([row, f"{r['params_m']:.3f}", f"{r['nonzero_m']:.3f}", f"{r['file_mb']:.2f}", f"{r['deflate_mb']:.2f}",
                      *(f"{base[k] / r['timing'][k]:.2f}x" for k in ("b1_1t", "b8_1t")),
                      *(f"{r['accuracy'][m]:.4f}" for m in metrics),
                      f"{r['seconds']:.1f}" if "seconds" in r else "-", f"{r['peak_mb']:.0f}" if "peak_mb" in r else "-"])
    widths = [max(len(str(line[i])) for line in lines + [header]) for i in range(len(header))]
    print(f"\n{name}: fp32 b1 {base['b1_1t']:.2f} ms, b8 {base['b8_1t']:.2f} ms (1 thread; the faster of its two "
          "sessions); latency ratios vs that, > 1 is faster")
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-|-".join("-" * w for w in widths))
    for line in lines:
        print(" | ".join(str(c).ljust(w) for c, w in zip(line, widths)))
    for row, r in rows.items():
        for note in r.get("notes") or []:
            print(f"  {row}: {note}")


class Checks:
    """A bench's target lines (PASS/FAIL) over its results: `row` is a candidate's results (None when
    missing or failed), `speed` its latency ratio against fp32, `acc` one of its accuracy metrics."""

    def __init__(self, results: dict):
        self.results, self.lines = results, []

    def check(self, label: str, ok: bool, value: str) -> None:
        self.lines.append(f"{'PASS' if ok else 'FAIL'}  {label}: {value}")

    def row(self, model: str, name: str) -> dict | None:
        r = self.results.get(model, {}).get(name)
        return None if r is None or r.get("error") else r

    def speed(self, model: str, name: str, key: str = "b8_1t") -> float:
        return reference(self.results[model])[key] / self.results[model][name]["timing"][key]

    def acc(self, model: str, name: str, metric: str) -> float:
        return self.results[model][name]["accuracy"][metric]


def targets(results: dict) -> list[str]:
    c = Checks(results)
    if c.row("digits", "onnxopt 50%"):
        c.check("digits 50% channels: top-1 >= 0.95", c.acc("digits", "onnxopt 50%", "top1") >= 0.95,
                f"{c.acc('digits', 'onnxopt 50%', 'top1'):.4f}")
        c.check("digits 50% channels: >= 1.6x at b8", c.speed("digits", "onnxopt 50%") >= 1.6,
                f"{c.speed('digits', 'onnxopt 50%'):.2f}x")
    if c.row("minilm", "onnxopt FFN 50%"):
        r = "onnxopt FFN 50%"
        c.check("MiniLM FFN 50%: cosine >= 0.95", c.acc("minilm", r, "cosine") >= 0.95, f"{c.acc('minilm', r, 'cosine'):.4f}")
        c.check("MiniLM FFN 50%: NN agreement >= 0.85", c.acc("minilm", r, "nn_agreement") >= 0.85,
                f"{c.acc('minilm', r, 'nn_agreement'):.3f}")
        c.check("MiniLM FFN 50%: >= 1.3x at b8", c.speed("minilm", r) >= 1.3, f"{c.speed('minilm', r):.2f}x")
        run = results["minilm"][r]
        c.check("MiniLM FFN 50% with refit on 1,000 sentences: < 90 s, < 2 GB", run["seconds"] < 90 and run["peak_mb"] < 2048,
                f"{run['seconds']:.0f} s, {run['peak_mb']:.0f} MB")
    for r in ("onnxopt FFN 25%", "onnxopt FFN 25% measured"):
        if c.row("minilm", r):
            value = c.acc("minilm", r, "cosine")
            c.check(f"MiniLM {r.removeprefix('onnxopt ')}: cosine >= 0.985", value >= 0.985, f"{value:.4f}")
    for ratio in ("25%", "50%"):
        uniform, measured = f"onnxopt FFN {ratio}", f"onnxopt FFN {ratio} measured"
        if c.row("minilm", uniform) and c.row("minilm", measured):
            c.check(f"MiniLM FFN {ratio}: per-group ratios chosen by measurement beat one ratio everywhere at the "
                    "same size (cosine; b8 speed within 3 %)",
                    c.acc("minilm", measured, "cosine") > c.acc("minilm", uniform, "cosine")
                    and c.speed("minilm", measured) >= 0.97 * c.speed("minilm", uniform),
                    f"measured {c.acc('minilm', measured, 'cosine'):.4f} at {c.speed('minilm', measured):.2f}x, "
                    f"uniform {c.acc('minilm', uniform, 'cosine'):.4f} at {c.speed('minilm', uniform):.2f}x")
    if c.row("minilm", "onnxopt FFN 50% measured"):
        r = "onnxopt FFN 50% measured"
        c.check("MiniLM FFN 50% measured: cosine >= 0.95, NN agreement >= 0.85, >= 1.3x at b8",
                c.acc("minilm", r, "cosine") >= 0.95 and c.acc("minilm", r, "nn_agreement") >= 0.85
                and c.speed("minilm", r) >= 1.3, f"{c.acc('minilm', r, 'cosine'):.4f} / "
                f"{c.acc('minilm', r, 'nn_agreement'):.3f} / {c.speed('minilm', r):.2f}x")
    if c.row("minilm", "onnxopt heads 50%"):
        value = c.acc("minilm", "onnxopt heads 50%", "cosine")
        c.check("MiniLM heads 50%: cosine >= 0.88", value >= 0.88, f"{value:.4f}")
    b = "onnxopt FFN max_error=0.02"
    uniforms = [u for u in ("onnxopt FFN 25%", "onnxopt FFN 37.5% (uniform)", "onnxopt FFN 50%") if c.row("minilm", u)]
    if c.row("minilm", b) and uniforms:  # the one ratio everywhere whose speed-up is nearest the budget's
        u = min(uniforms, key=lambda row: abs(c.speed("minilm", row) - c.speed("minilm", b)))
        c.check("MiniLM max_error beats one uniform ratio at a like speed-up (cosine; b8 speed, the nearest of "
                "25 %, 37.5 % and 50 %)",
                c.acc("minilm", b, "cosine") > c.acc("minilm", u, "cosine") and c.speed("minilm", b) >= 0.97 * c.speed("minilm", u),
                f"budget {c.acc('minilm', b, 'cosine'):.4f} at {c.speed('minilm', b):.2f}x, "
                f"{u.removeprefix('onnxopt ')} {c.acc('minilm', u, 'cosine'):.4f} at {c.speed('minilm', u):.2f}x")
    goal = "onnxopt FFN min_speedup=1.3"
    if c.row("minilm", goal) and len(uniforms) >= 2:  # a speed goal is worth it if it beats one ratio at its speed
        speed = c.speed("minilm", goal)
        curve = sorted((c.speed("minilm", u), c.acc("minilm", u, "cosine")) for u in uniforms)
        uniform_cosine = float(np.interp(speed, *zip(*curve)))  # one ratio everywhere, read at the goal's speed-up
        c.check("MiniLM min_speedup=1.3: >= 1.3x at b8 here too, and cosine ahead of one ratio everywhere at its "
                "speed-up (interpolated between the uniform rows)",
                speed >= 1.3 and c.acc("minilm", goal, "cosine") > uniform_cosine,
                f"{c.acc('minilm', goal, 'cosine'):.4f} at {speed:.2f}x, uniform {uniform_cosine:.4f} there ("
                + ", ".join(f"{a:.4f} at {v:.2f}x" for v, a in curve) + ")")
    if c.row("minilm", "onnxopt fold,fuse,prune 50%,quant"):
        r = "onnxopt fold,fuse,prune 50%,quant"
        c.check("MiniLM fold,fuse,prune 50%,quant: >= 2.9x at b8 with cosine >= 0.94",
                c.speed("minilm", r) >= 2.9 and c.acc("minilm", r, "cosine") >= 0.94,
                f"{c.speed('minilm', r):.2f}x, cosine {c.acc('minilm', r, 'cosine'):.4f}")
    fp32 = results.get("minilm", {}).get("fp32")
    for ours, peers in (("onnxopt unstructured 50%", ("onnxsim magnitude 50% @160", "onnxsim wanda 50% @160", "onnxsim sparsegpt 50% @160")),
                        ("onnxopt 2:4", ("onnxsim magnitude 2:4 @160", "onnxsim wanda 2:4 @160", "onnxsim sparsegpt 2:4 @160"))):
        r = c.row("minilm", ours)
        if not r:
            continue
        best = max((c.acc("minilm", p, "cosine") for p in peers if c.row("minilm", p)), default=None)
        if best is not None:  # the peers' rows were run
            c.check(f"MiniLM {ours.removeprefix('onnxopt ')}: cosine ahead of onnxsim's best",
                    r["accuracy"]["cosine"] > best, f"{r['accuracy']['cosine']:.4f} vs {best:.4f}")
        c.check(f"MiniLM {ours.removeprefix('onnxopt ')}: file <= input, deflate <= 0.8x",
                r["file_mb"] <= fp32["file_mb"] * 1.001 and r["deflate_mb"] <= 0.8 * fp32["deflate_mb"],
                f"file {r['file_mb']:.1f} MB vs {fp32['file_mb']:.1f}, "
                f"deflate {r['deflate_mb'] / fp32['deflate_mb']:.3f}x "
                f"(the smaller half of each MatMul weight zeroed: "
                f"{fp32.get('deflate_half_zeroed_mb', float('nan')) / fp32['deflate_mb']:.3f}x)")
    return c.lines


def parser_for(description: str, models: str, quick_help: str) -> argparse.ArgumentParser:
    """The command line this bench and bench/lowrank.py share."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", default=models)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--rows", help="only the candidates whose name matches this regular expression")
    parser.add_argument("--json", help="write all results here")
    return parser


def run_bench(args: argparse.Namespace, cases, checks, heading: str = "targets (no training):") -> None:
    """Every model's candidates built, timed and scored (`cases`), its table printed, then `checks`."""
    print(describe(), flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        for name in args.models.split(","):
            results[name] = run_model(name, args.quick, Path(tmp), cases=cases, rows=args.rows)
            print_table(name, results[name])
            if args.json:  # after every model, so that a long run's first tables survive a later failure
                Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    print(f"\n{heading}")
    for line in checks(results):
        print("  " + line)


def main() -> None:
    args = parser_for(__doc__.splitlines()[0], "digits,minilm,resnet", "no @160 rows, fewer timing rounds").parse_args()
    run_bench(args, case, targets)


if __name__ == "__main__":
    main()
