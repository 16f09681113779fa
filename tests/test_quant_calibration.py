"""Quantization calibration: streaming histograms, the four range methods, the Calibrator and its cache."""
from __future__ import annotations

import os
import time
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ROOT, parse
from onnx import TensorProto, helper, numpy_helper

from onnxopt.data import open_batches
from onnxopt.cache import Cache
from onnxopt.errors import OnnxoptError
from onnxopt.passes.quant import calibration as qc
from onnxopt.passes.quant.calibration import Calibrator, TensorStats, compute_range, load_or_collect

rng = np.random.default_rng(0)
NORMAL = rng.standard_normal(400_000).astype(np.float32)


def stats_of(*parts, bins=qc.DEFAULT_BINS) -> TensorStats:
    stats = TensorStats(bins)
    for part in parts:
        stats.update(part)
    return stats


def best_of(calls, fn) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def test_growing_histogram_equals_one_shot_histogram():
    parts = [rng.standard_normal(5000) * scale for scale in (1e-3, 0.5, 40.0, 3e3)]
    streamed = stats_of(*(p.astype(np.float32) for p in parts))
    whole = np.concatenate(parts).astype(np.float32)
    one_shot = stats_of(whole)
    assert streamed.half_range == one_shot.half_range == 2.0 ** 14
    np.testing.assert_array_equal(streamed.hist, one_shot.hist)
    reference, _ = np.histogram(whole, bins=streamed.bins, range=(-streamed.half_range, streamed.half_range))
    np.testing.assert_array_equal(streamed.hist, reference)
    assert streamed.count == whole.size and streamed.hist.size == qc.DEFAULT_BINS


def test_minmax_is_exact_and_includes_zero():
    parts = [NORMAL[:1000], NORMAL[1000:] * 2]
    stats = stats_of(*parts)
    both = np.concatenate(parts)
    assert compute_range(stats, "minmax") == (float(both.min()), float(both.max()))
    positive = stats_of(np.abs(NORMAL) + 1)
    assert compute_range(positive, "minmax") == (0.0, float((np.abs(NORMAL) + 1).max()))
    lo, hi = compute_range(positive, "minmax", symmetric=True)
    assert lo == -hi and hi == positive.max


def test_constant_tensors_get_a_nondegenerate_range():
    for method in qc.METHODS:
        lo, hi = compute_range(stats_of(np.zeros(100)), method)
        assert lo <= 0 < hi and hi - lo <= 1e-6
        lo, hi = compute_range(stats_of(np.full(100, 3.0)), method)
        assert lo == 0 and 2.9 < hi <= 3.0


def test_percentile_of_a_normal_distribution():
    stats = stats_of(NORMAL)
    lo, hi = compute_range(stats, "percentile", percentile=99.99, symmetric=True)
    expected = np.percentile(np.abs(NORMAL), 99.99)
    assert lo == -hi and abs(hi - expected) <= 2 * stats.bin_width
    assert abs(hi - 3.89) < 0.15  # 99.99th percentile of |N(0, 1)|
    lo, hi = compute_range(stats, "percentile", percentile=99.9)
    assert abs(lo - np.percentile(NORMAL, 0.05)) <= 2 * stats.bin_width
    assert abs(hi - np.percentile(NORMAL, 99.95)) <= 2 * stats.bin_width


@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_entropy_and_mse_clip_outliers_quickly(method):
    outliers = np.array([1e3, -1e3, 1e3], np.float32)
    stats = stats_of(np.concatenate([rng.standard_normal(1_000_000).astype(np.float32), outliers]))
    lo, hi = compute_range(stats, method, symmetric=True)
    assert lo == -hi and 1 < hi < 500
    assert best_of(5, lambda: compute_range(stats, method, symmetric=True)) < 0.05
    clean_lo, clean_hi = compute_range(stats_of(NORMAL), method, symmetric=True)
    assert 2.5 < clean_hi <= float(np.abs(NORMAL).max())


def reference_entropy_bins(hist: np.ndarray, levels: int) -> int:
    """The TensorRT loop, one candidate at a time (q smoothed to 1e-4 where p > 0 = q)."""
    best, best_kl = None, np.inf
    total = hist.sum()
    for i in range(levels, hist.size + 1):
        p = hist[:i].astype(np.float64)
        p[-1] += hist[i:].sum()
        q = np.zeros(i)
        bounds = [(j * i) // levels for j in range(levels + 1)]
        for a, b in zip(bounds[:-1], bounds[1:]):
            nonzero = p[a:b] > 0
            if nonzero.any():
                q[a:b][nonzero] = max(hist[a:b].sum() / nonzero.sum(), 1e-4)
        mask = p > 0
        kl = np.sum(p[mask] / total * np.log((p[mask] / total) / (q[mask] / hist[:i].sum())))
        if kl < best_kl:
            best, best_kl = i, kl
    return best


def test_vectorized_entropy_matches_the_loop():
    for seed, size in ((0, 300), (1, 200)):
        local = np.random.default_rng(seed)
        hist = local.poisson(np.exp(-np.linspace(0, 6, size)) * 500).astype(np.int64)
        hist[-1] += 3  # outliers past a gap of empty bins
        assert qc._entropy_threshold(hist, 128) == reference_entropy_bins(hist, 128)


def test_mse_threshold_is_near_the_true_optimum():
    data = np.concatenate([NORMAL, [60.0, -60.0]]).astype(np.float64)
    lo, hi = compute_range(stats_of(data), "mse", symmetric=True)

    def true_mse(t):
        step = 2 * t / 255
        return np.mean((np.clip(np.round(data / step), -127.5, 127.5) * step - data) ** 2)
    grid = np.linspace(1, 60, 300)
    assert true_mse(hi) <= 1.05 * min(true_mse(t) for t in grid)


def test_nonfinite_values_are_counted_not_binned():
    stats = stats_of(np.array([1.0, np.nan, np.inf, -np.inf, -2.0], np.float32))
    assert stats.count == 5 and stats.nonfinite == 3 and stats.hist.sum() == 2
    assert (stats.min, stats.max) == (-2.0, 1.0)
    with pytest.raises(OnnxoptError, match="no finite value"):
        compute_range(stats_of(np.array([np.nan])), "minmax")


def test_mask_like_tensor_is_flagged_without_huge_memory():
    mask = np.where(rng.random((4, 128)) < 0.5, np.float32(-3.4e38), np.float32(0))
    stats = stats_of(mask, np.full(10, -1e9, np.float32), NORMAL[:100])
    assert stats.saturated and stats.is_mask_like and stats.hist.size == qc.DEFAULT_BINS
    assert stats.half_range == qc.MAX_RANGE and stats.hist.sum() == mask.size + 110
    for method in qc.METHODS:
        lo, hi = compute_range(stats, method)
        assert lo < hi and np.isfinite([lo, hi]).all()
    assert not stats_of(NORMAL).is_mask_like


def test_bad_arguments():
    stats = stats_of(NORMAL[:10])
    with pytest.raises(OnnxoptError, match="unknown calibration method 'kl'"):
        compute_range(stats, "kl")
    with pytest.raises(OnnxoptError, match="percentile 0 is outside"):
        compute_range(stats, "percentile", percentile=0)
    with pytest.raises(OnnxoptError, match="multiple of 4"):
        TensorStats(bins=1000 + 2)


def small_model(shape=(2, 3, 16), out=8) -> onnx.ModelProto:
    """x -> Relu -> MatMul(W) -> Add(b) -> y, all float."""
    local = np.random.default_rng(1)
    weight = numpy_helper.from_array(local.standard_normal((shape[-1], out)).astype(np.float32), "W")
    bias = numpy_helper.from_array(local.standard_normal(out).astype(np.float32), "b")
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("MatMul", ["r", "W"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["y"])]
    dims = ["batch", *shape[1:]]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight, bias])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_calibrator_matches_numpy_and_takes_inputs_from_feeds():
    model = small_model()
    batches = [{"x": rng.standard_normal((2, 3, 16)).astype(np.float32)} for _ in range(3)]
    calibrator = Calibrator(model, ["x", "r", "m", "y", "W"])
    stats = calibrator.collect(batches, progress=False)
    assert calibrator.runs == 3
    everything = np.concatenate([b["x"] for b in batches])
    assert stats["x"].min == everything.min() and stats["r"].max == np.maximum(everything, 0).max()
    assert stats["r"].min == 0 and stats["x"].count == everything.size
    weight = numpy_helper.to_array(model.graph.initializer[0])
    assert stats["W"].max == weight.max()
    with pytest.raises(OnnxoptError, match="tensor.* nope not in the model"):
        Calibrator(model, ["r", "nope"])


def test_probe_gets_the_float_values_of_every_calibrated_tensor():
    from onnxopt.passes.quant.calibration import Probe

    model = small_model()
    x = rng.standard_normal((1, 3, 16)).astype(np.float32)
    probe = Probe({"x": x})
    Calibrator(model, ["x", "r", "y"]).collect([{"x": x * 2}], progress=False, probe=probe)
    assert probe.values.keys() == {"x", "r", "y"}
    np.testing.assert_array_equal(probe.values["x"], x)
    np.testing.assert_allclose(probe.values["r"], np.maximum(x, 0))


def test_variable_sequence_lengths_across_batches():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[batch, seq] ids) => (float[batch, seq, 2] y)
        <float[4, 2] table = {0.0, 1.0, 2.0, 3.0, -4.0, 5.0, 6.0, -7.0}>
        { e = Gather(table, ids)  y = Relu(e) }
    """)
    calls = lambda: iter([{"ids": np.full((2, 32), 1, np.int64)}, {"ids": np.full((3, 57), 2, np.int64)}])  # noqa: E731
    stats = Calibrator(model, ["e", "y"]).collect(open_batches(calls, model), progress=False)
    assert stats["e"].count == (2 * 32 + 3 * 57) * 2 and (stats["e"].min, stats["e"].max) == (-4.0, 5.0)


def test_cache_second_call_runs_no_inference(tmp_path, monkeypatch):
    model = onnx.load(str(ROOT / "models" / "demo.onnx"))
    names = [n.output[0] for n in model.graph.node if n.op_type in ("Relu", "Gemm")]
    data = open_batches(ROOT / "models" / "demo_inputs.npz", model, batch_size=4)
    first = load_or_collect(model, names, data, Cache(tmp_path), progress=False)
    assert [p.suffix for p in (tmp_path / "calib").iterdir()] == [".npz"]

    def no_inference(*args, **kwargs):
        raise AssertionError("inference ran although the stats were cached")
    monkeypatch.setattr(Calibrator, "collect", no_inference)
    again = load_or_collect(model, reversed(names), open_batches(ROOT / "models" / "demo_inputs.npz", model,
                                                                    batch_size=4), Cache(tmp_path))
    for name in names:
        np.testing.assert_array_equal(again[name].hist, first[name].hist)
        assert (again[name].min, again[name].max, again[name].count) == (first[name].min, first[name].max,
                                                                           first[name].count)
        for method in ("percentile", "entropy"):
            assert compute_range(again[name], method) == compute_range(first[name], method)
    fewer = open_batches(ROOT / "models" / "demo_inputs.npz", model, samples=8)
    with pytest.raises(AssertionError, match="inference ran"):  # other data: a miss
        load_or_collect(model, names, fewer, Cache(tmp_path))


def test_cache_location_and_corrupt_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    assert Cache().path(qc.CACHE_KIND, "k").parent == tmp_path / "calib"
    model = small_model()
    data = open_batches({"x": rng.standard_normal((4, 3, 16)).astype(np.float32)}, model)
    first = load_or_collect(model, ["r"], data, progress=False)
    (entry,) = (tmp_path / "calib").iterdir()
    entry.write_bytes(b"truncated")  # unreadable: collected again and rewritten
    again = load_or_collect(model, ["r"], data, progress=False)
    np.testing.assert_array_equal(again["r"].hist, first["r"].hist)
    assert [p.name for p in (tmp_path / "calib").iterdir()] == [entry.name]
    assert load_or_collect(model, ["r", "m"], data, progress=False).keys() == {"r", "m"}  # another key


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_collect_memory_is_bounded_by_one_batch():
    """200 batches of 1 MB activations: numpy temporaries (tracemalloc) and what ORT hands back
    (resident memory, sampled at every batch; tracemalloc does not see ORT's buffers) stay flat."""
    model = small_model(shape=(1, 256, 1024))
    resident = []

    x = rng.standard_normal((1, 256, 1024), dtype=np.float32)

    def batches(count):
        def generate():
            for _ in range(count):
                if Path("/proc/self/statm").exists():
                    resident.append(resident_bytes())
                yield {"x": x}
        return generate

    peaks = []
    for count in (20, 200):
        data = open_batches(batches(count), model)
        tracemalloc.start()
        Calibrator(model, ["x", "r", "y"]).collect(data, progress=False)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 8 * 2**20 and peaks[1] < peaks[0] + 2**20
    if resident:
        last_run = resident[-200:]
        assert max(last_run) - last_run[10] < 40 * 2**20
