"""Benchmark: one MatMul dense against its two low-rank factors, fp32 and int8, as ORT runs them.

    .venv/bin/python bench/matmul_shapes.py                     # MiniLM's FFN shapes, ranks 128..256
    .venv/bin/python bench/matmul_shapes.py --k 768 --n 3072 --ranks 256,384 --rows 512

Why it exists: whether `lowrank` pays after `quant` depends on how the CPU's int8 kernels scale with
the reduction and output widths, which whole-model timings blur. Each case is a one-node model (int8:
QuantizeLinear/DequantizeLinear around the MatMul, which ORT fuses into MatMulIntegerToFloat, as it
does for what `quant` writes), timed alone on 1 thread with random inputs of `--rows` rows (1,024 =
batch 8 x 128 tokens); the printed time is the median of `--runs` runs after 5 warm-up runs, and
each factored pair's sum is compared with its dense layer. Only MatMul time is measured: the middle
activation's QuantizeLinear of a factored pair at int8 is extra (see docs/lowrank.md).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe  # noqa: E402

RNG = np.random.default_rng(0)


def one_matmul(k: int, n: int, int8: bool) -> bytes:
    """x [rows, k] @ W [k, n] as a serialized model; int8: both operands through QDQ (per-tensor)."""
    w = (RNG.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    if int8:
        scale = float(np.abs(w).max()) / 127
        inits = [numpy_helper.from_array(np.float32(0.05), "xs"), numpy_helper.from_array(np.int8(0), "xz"),
                 numpy_helper.from_array(np.clip(np.round(w / scale), -127, 127).astype(np.int8), "wq"),
                 numpy_helper.from_array(np.float32(scale), "ws"), numpy_helper.from_array(np.int8(0), "wz")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"]),
                 helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    else:
        inits, nodes = [numpy_helper.from_array(w, "w")], [helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def time_us(k: int, n: int, int8: bool, rows: int, runs: int) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(one_matmul(k, n, int8), options, providers=["CPUExecutionProvider"])
    x = RNG.standard_normal((rows, k)).astype(np.float32)
    for _ in range(5):
        session.run(None, {"x": x})
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"x": x})
        samples.append(time.perf_counter() - start)
    return float(np.median(samples)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=384, help="the model width (MiniLM: 384)")
    parser.add_argument("--n", type=int, default=1536, help="the FFN width (MiniLM: 1536)")
    parser.add_argument("--ranks", default="128,154,192,256")
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    print(describe(), flush=True)
    ranks = [int(r) for r in args.ranks.split(",")]
    header = f"{'layer':>14} {'rank':>5} {'fp32 us':>16} {'vs dense':>8} {'int8 us':>14} {'vs dense':>8}"
    for k, n, what in ((args.k, args.n, "up"), (args.n, args.k, "down")):
        print(f"\n{what}-projection {k} -> {n}, {args.rows} rows, 1 thread\n{header}")
        dense = {int8: time_us(k, n, int8, args.rows, args.runs) for int8 in (False, True)}
        print(f"{'dense':>14} {'-':>5} {dense[False]:>16.0f} {'1.00x':>8} {dense[True]:>14.0f} {'1.00x':>8}", flush=True)
        for rank in ranks:
            cells = []
            for int8 in (False, True):
                first, second = time_us(k, rank, int8, args.rows, args.runs), time_us(rank, n, int8, args.rows, args.runs)
                cells.append(f"{first:.0f} + {second:.0f}")
                cells.append(f"{dense[int8] / (first + second):.2f}x")
            print(f"{'factored':>14} {rank:>5} {cells[0]:>16} {cells[1]:>8} {cells[2]:>14} {cells[3]:>8}", flush=True)


if __name__ == "__main__":
    main()
