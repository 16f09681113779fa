"""Benchmark: which in-memory graph should passes do their surgery on? protobuf + GraphView, onnx-ir, onnx-graphsurgeon.

    .venv/bin/python bench/ir.py                    # vgg19 (folded, ~550 MB) and MiniLM, 3 repeats (~3 min)
    .venv/bin/python bench/ir.py --models minilm --repeat 1

Each (IR, model, repeat) runs in a fresh Python process (this file with --child) that times
  import  the IR's package (onnx and numpy are imported before the clock starts);
  load    the file into that IR (protobuf: onnx.load; onnx-ir: ir.load; graphsurgeon: gs.import_onnx(onnx.load));
  rewrite a typical surgery step, the same in each IR: every Conv/Gemm/MatMul with a constant weight gets
          that weight replaced by a new tensor computed from it in numpy (W * 1, a copy, as pruning and
          low-rank rewrites do) and a Mul by a constant of ones inserted after it, with every reader of
          its output rewired to the Mul (a graph output keeps its name): lookup of producers and
          consumers, constants to numpy and back, node insertion, use rewiring;
  proto   what the pipeline needs from any IR whenever ONNX Runtime or the onnx checker looks at the
          model (fold's sessions, verification after each pass): the ModelProto (free for protobuf);
  save    to one .onnx file;
and reports the child's peak RSS (VmHWM). The parent checks that every IR's result computes the
same outputs as the original under ORT (the Mul by ones changes nothing), and prints the table.
vgg19 is the onnx package's light model folded by onnxopt (its ConstantOfShape weights made real),
so the file holds 548 MB of weights; MiniLM is models/minilm.py's export (90 MB, 516 nodes).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from _machine import describe  # noqa: E402

IRS = ("protobuf", "onnx-ir", "graphsurgeon")
TARGETS = ("Conv", "Gemm", "MatMul")
STEPS = ("import_s", "load_s", "rewrite_s", "proto_s", "save_s")


def _ones_like_channels(op: str, weight_shape, trans_b: int):
    import numpy as np

    if op == "Conv":
        return np.ones((weight_shape[0], 1, 1), np.float32)
    return np.ones((weight_shape[0] if trans_b else weight_shape[-1],), np.float32)


def _rewrite_protobuf(model) -> int:
    import numpy as np
    import onnx

    from onnxopt.graph import GraphView, NameGenerator
    from onnxopt.surgery import add_initializer

    graph = model.graph
    view = GraphView(graph, model.ir_version)
    names = NameGenerator(graph)
    after: dict[int, onnx.NodeProto] = {}
    for node in graph.node:
        if node.op_type not in TARGETS or len(node.input) < 2:
            continue
        weight = view.constant(node.input[1])
        if weight is None or weight.dtype != np.float32:
            continue
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        new_weight = names(node.input[1] + "_edited")
        add_initializer(graph, weight * np.float32(1), new_weight)
        node.input[1] = new_weight
        scale = names(node.output[0] + "_ones")
        add_initializer(graph, _ones_like_channels(node.op_type, weight.shape, trans_b), scale)
        out = node.output[0]
        if out in view.graph_outputs:
            pre = names(out + "_pre")
            node.output[0] = pre
            after[id(node)] = onnx.helper.make_node("Mul", [pre, scale], [out], name=names(out + "_mul"))
        else:
            scaled = names(out + "_scaled")
            for reader in view.consumers.get(out, []):
                reader.input[:] = [scaled if n == out else n for n in reader.input]
            after[id(node)] = onnx.helper.make_node("Mul", [out, scale], [scaled], name=names(out + "_mul"))
    nodes = []
    for node in graph.node:
        nodes.append(node)
        if id(node) in after:
            nodes.append(after[id(node)])
    del graph.node[:]
    graph.node.extend(nodes)
    kept = {n for node in graph.node for n in node.input}
    stale = [t for t in graph.initializer if t.name not in kept]
    for tensor in stale:
        graph.initializer.remove(tensor)
    return len(after)


def _rewrite_onnx_ir(model) -> int:
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    count = 0
    for node in list(graph):
        if node.op_type not in TARGETS or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        weight_value = node.inputs[1]
        if weight_value.const_value is None:
            continue
        weight = weight_value.const_value.numpy()
        if weight.dtype != np.float32:
            continue
        trans_b = node.attributes["transB"].as_int() if "transB" in node.attributes else 0
        edited = ir.Value(name=f"{weight_value.name}_edited_{count}", const_value=ir.tensor(weight * np.float32(1)))
        graph.register_initializer(edited)
        node.replace_input_with(1, edited)
        ones = _ones_like_channels(node.op_type, weight.shape, trans_b)
        scale = ir.Value(name=f"{node.outputs[0].name}_ones", const_value=ir.tensor(ones))
        graph.register_initializer(scale)
        out = node.outputs[0]
        scaled = ir.Value(name=f"{out.name}_scaled")
        out.replace_all_uses_with(scaled, replace_graph_outputs=True)
        if scaled.is_graph_output():  # keep the graph output's name
            name = out.name
            out.name = f"{name}_pre"
            scaled.name = name
        graph.insert_after(node, ir.node("Mul", [out, scale], outputs=[scaled], name=f"{scaled.name}_mul"))
        if not weight_value.uses() and weight_value.is_initializer():
            graph.initializers.pop(weight_value.name)
        count += 1
    return count


def _rewrite_graphsurgeon(graph) -> int:
    import numpy as np
    import onnx_graphsurgeon as gs

    count = 0
    for node in list(graph.nodes):
        if node.op not in TARGETS or len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
            continue
        weight = node.inputs[1].values
        if weight.dtype != np.float32:
            continue
        trans_b = node.attrs.get("transB", 0)
        node.inputs[1] = gs.Constant(f"{node.inputs[1].name}_edited_{count}", weight * np.float32(1))
        scale = gs.Constant(f"{node.outputs[0].name}_ones", _ones_like_channels(node.op, weight.shape, trans_b))
        out = node.outputs[0]
        scaled = gs.Variable(f"{out.name}_scaled", dtype=out.dtype, shape=out.shape)
        for reader in list(out.outputs):
            for index, tensor in enumerate(reader.inputs):
                if tensor is out:
                    reader.inputs[index] = scaled
        if out in graph.outputs:
            graph.outputs[graph.outputs.index(out)] = scaled
            name = out.name
            out.name, scaled.name = f"{name}_pre", name
        graph.nodes.append(gs.Node("Mul", name=f"{scaled.name}_mul", inputs=[out, scale], outputs=[scaled]))
        count += 1
    graph.cleanup().toposort()
    return count


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(ir_name: str, src: str, dst: str) -> dict:
    import numpy  # noqa: F401 - common to every IR, not counted
    import onnx

    clock = time.perf_counter
    record: dict = {"ir": ir_name}
    start = clock()
    if ir_name == "onnx-ir":
        import onnx_ir as ir
    elif ir_name == "graphsurgeon":
        import onnx_graphsurgeon as gs
    else:
        import onnxopt.graph  # noqa: F401 - GraphView and its helpers
    record["import_s"] = clock() - start
    start = clock()
    if ir_name == "onnx-ir":
        model = ir.load(src)
    elif ir_name == "graphsurgeon":
        model = gs.import_onnx(onnx.load(src))
    else:
        model = onnx.load(src)
    record["load_s"] = clock() - start
    start = clock()
    rewrite = {"protobuf": _rewrite_protobuf, "onnx-ir": _rewrite_onnx_ir, "graphsurgeon": _rewrite_graphsurgeon}
    record["rewritten"] = rewrite[ir_name](model)
    record["rewrite_s"] = clock() - start
    start = clock()
    if ir_name == "onnx-ir":
        proto = ir.to_proto(model)
    elif ir_name == "graphsurgeon":
        proto = gs.export_onnx(model)
    else:
        proto = model
    record["proto_s"] = clock() - start
    del proto
    start = clock()
    if ir_name == "onnx-ir":
        ir.save(model, dst)
    elif ir_name == "graphsurgeon":
        onnx.save(gs.export_onnx(model), dst)
    else:
        onnx.save(model, dst)
    record["save_s"] = clock() - start
    record["peak_mb"] = _peak_mb()
    return record


def prepare(name: str, workdir: Path) -> tuple[Path, dict]:
    """The model file to measure and inputs to check the results with."""
    if name == "minilm":
        from models import corpus, minilm

        return minilm.build(), minilm.encode(corpus.sentences(2, offset=1000), seq_len=128)
    if name == "vgg19":
        import onnxopt
        from models.light import light_case

        path, feeds, _ = light_case("vgg19")
        folded = workdir / "vgg19.folded.onnx"
        onnxopt.optimize(str(path), "fold", output=folded, compare=False)
        return folded, feeds
    raise SystemExit(f"unknown model {name}")


def run_child(ir_name: str, src: Path, dst: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", ir_name, str(src), str(dst)],
                          capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"ir": ir_name, "error": (proc.stderr.strip().splitlines() or ["crashed"])[-1][:200]}
    return json.loads(lines[-1])


def outputs_match(src: Path, dst: Path, feeds) -> bool:
    import numpy as np
    import onnxruntime as ort

    want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, feeds)
    return all(np.allclose(g, w, rtol=1e-5, atol=1e-6) for g, w in zip(got, want, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg19,minilm")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="write all records here")
    args = parser.parse_args()
    print(describe(), flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_ir_") as tmp:
        workdir = Path(tmp)
        for name in args.models.split(","):
            src, feeds = prepare(name, workdir)
            records = {ir_name: [] for ir_name in IRS}
            for r in range(args.repeat):
                for ir_name in IRS[r % len(IRS):] + IRS[:r % len(IRS)]:  # rotate the order each round
                    dst = workdir / f"{name}.{ir_name}.onnx"
                    dst.unlink(missing_ok=True)
                    record = run_child(ir_name, src, dst)
                    if "error" not in record and r == 0:
                        record["outputs_match"] = outputs_match(src, dst, feeds)
                    records[ir_name].append(record)
            results[name] = records
            print_table(name, src, records)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def print_table(name: str, src: Path, records: dict) -> None:
    header = ["IR", "import s", "load s", "rewrite s", "to proto s", "save s", "total s", "peak MB", "rewritten",
              "outputs"]
    rows = []
    for ir_name, runs in records.items():
        good = [r for r in runs if "error" not in r]
        if not good:
            rows.append([ir_name, f"failed: {runs[0]['error']}"] + [""] * (len(header) - 2))
            continue
        med = {k: statistics.median(r[k] for r in good) for k in (*STEPS, "peak_mb")}
        total = statistics.median(sum(r[k] for k in STEPS) for r in good)
        rows.append([ir_name] + [f"{med[k]:.2f}" for k in STEPS] + [f"{total:.2f}", f"{med['peak_mb']:.0f}",
                     str(good[0]["rewritten"]), "match" if good[0].get("outputs_match") else "DIFFER"])
    print(f"\n{name} ({src.stat().st_size / 2**20:.0f} MB, medians of {len(next(iter(records.values())))})")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(row, widths)))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
        print(json.dumps(child(*sys.argv[2:5])))
    else:
        main()
