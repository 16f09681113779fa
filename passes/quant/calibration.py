"""Calibration for int8 quantization: streaming activation statistics and the ranges chosen from them.

Histogram. B bins (B % 4 == 0) over [-R, R), R a power of two strictly above max|x|; bin
i = floor(x * B / 2R) + B/2, exact in float64 because B/2R is a power of two. When a batch exceeds R,
R doubles and bin pairs merge into the middle half: old bins 2k, 2k+1 are exactly new bin B/4 + k,
so the streamed histogram equals a one-shot histogram of all the data at the final R. R stops at
MAX_RANGE (values beyond land in the end bins and the stats are `saturated`); tensors with
|min| or |max| >= 1e6 (attention masks: -1e9, -3.4e38) are `is_mask_like` and should stay float.

Ranges (`compute_range`), on the folded histogram of |x| (bin k = [k w, (k+1) w), w = 2R/B):
  minmax      [min, max] exactly.
  percentile  symmetric: t with P(|x| <= t) = p (linear inside a bin); asymmetric: clip (100 - p)/2 %
              of the samples from each tail of the signed histogram.
  entropy     TensorRT: for each candidate i >= L bins, P = h[:i] with the outliers h[i:] added to
              bin i-1; Q = h[:i] merged into L levels, each level's mass spread evenly over its
              nonzero bins (an empty level under P's last bin gets 1e-4 counts: TensorRT's smoothing);
              t = i w minimizing KL(P || Q). Vectorized over all candidates with prefix
              sums: KL = sum p log p - sum_levels P_j log(Q_j / nnz_j), normalized by N and by |h[:i]|.
  mse         for each t = m w: E(t) = sum_{|c_k| <= t} h_k step^2 / 12 + sum_{|c_k| > t} h_k (|c_k| - t)^2,
              c_k the bin centers, step = 2t / (qmax - qmin) (t / (qmax - qmin) for one-sided data
              under asymmetric quantization); suffix sums make every candidate O(1).
L = (qmax - qmin + 1) / 2 levels per side (128), or all of them for one-sided asymmetric data.
Every range includes 0 (zero must be exact) and has hi - lo >= MIN_SPAN.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper
from onnxopt.cache import Cache, key as cache_key, model_fingerprint
from onnxopt.errors import OnnxoptError
from onnxopt.progress import Progress, as_progress
from onnxopt.fetch import fetching_session
from onnxopt.graph import scopes

DEFAULT_BINS = 2048
MIN_RANGE, MAX_RANGE = 2.0**-40, 2.0**24
MASK_LIKE = 1e6
MIN_SPAN = 1e-7
METHODS = ("minmax", "percentile", "entropy", "mse")
CACHE_KIND = "calib"  # the cache folder of calibration statistics
STATS_FORMAT = "2"  # part of the cache key: bumped when TensorStats gains a field (2: channel sums)
# Entropy: a level with no mass under a bin that P fills (outliers folded into the last bin) gets
# this many counts instead of 0, as TensorRT's smoothing does, so KL stays finite and comparable.
_SMOOTHING = 1e-4
_CHUNK = 1 << 16  # values binned at a time: float64 temporaries stay in cache


@dataclasses.dataclass
class TensorStats:
    """Streaming statistics of one tensor: O(bins) memory however many batches are seen."""

    bins: int = DEFAULT_BINS
    count: int = 0  # every value seen, NaN and inf included
    nonfinite: int = 0
    min: float = math.inf  # over finite values
    max: float = -math.inf
    half_range: float = 0.0  # R; 0 until a finite value arrives
    saturated: bool = False
    hist: np.ndarray | None = None
    # Per-channel (last axis) min/max/sum, kept for tensors that feed a MatMul weight: smoothing
    # needs the extremes, bias correction the means.
    track_channels: bool = False
    channel_min: np.ndarray | None = None
    channel_max: np.ndarray | None = None
    channel_sum: np.ndarray | None = None  # float64
    channel_count: int = 0

    def __post_init__(self):
        if self.bins < 8 or self.bins % 4:
            raise OnnxoptError(f"histogram bins must be a multiple of 4 and at least 8, not {self.bins}")
        if self.hist is None:
            self.hist = np.zeros(self.bins, dtype=np.int64)

    @property
    def is_mask_like(self) -> bool:
        return max(abs(self.min), abs(self.max)) >= MASK_LIKE if self.count > self.nonfinite else False

    @property
    def channel_mean(self) -> np.ndarray | None:
        return self.channel_sum / self.channel_count if self.channel_sum is not None and self.channel_count else None

    @property
    def bin_width(self) -> float:
        return 2 * self.half_range / self.bins

    def update(self, values) -> None:
        values = np.asarray(values)
        if self.track_channels and values.ndim >= 1 and values.size:
            self._update_channels(values)
        flat = values.reshape(-1)
        self.count += flat.size
        for start in range(0, flat.size, _CHUNK):
            chunk = flat[start:start + _CHUNK].astype(np.float64)
            lo, hi = chunk.min(), chunk.max()
            if not (np.isfinite(lo) and np.isfinite(hi)):  # NaN or inf somewhere: drop them
                finite = np.isfinite(chunk)
                self.nonfinite += int(chunk.size - np.count_nonzero(finite))
                chunk = chunk[finite]
                if not chunk.size:
                    continue
                lo, hi = chunk.min(), chunk.max()
            self._add(chunk, float(lo), float(hi))

    def _update_channels(self, values: np.ndarray) -> None:
        rows = values.reshape(-1, values.shape[-1])
        lo, hi = np.nanmin(rows, axis=0), np.nanmax(rows, axis=0)
        total = np.nansum(rows, axis=0, dtype=np.float64)
        if self.channel_min is None:
            self.channel_min, self.channel_max, self.channel_sum = lo, hi, total
        elif self.channel_min.shape == lo.shape:
            np.minimum(self.channel_min, lo, out=self.channel_min)
            np.maximum(self.channel_max, hi, out=self.channel_max)
            self.channel_sum += total
        else:  # the last axis is not a channel axis (it changed size): nothing per-channel to keep
            self.track_channels = False
            self.channel_min = self.channel_max = self.channel_sum = None
            return
        self.channel_count += rows.shape[0]

    def _add(self, chunk: np.ndarray, lo: float, hi: float) -> None:
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self._cover(max(-lo, hi))
        if self.saturated:
            chunk = np.clip(chunk, -self.half_range, self.half_range)
        # x * B/2R + B/2 lies in [0, B], so truncation is floor; both steps are exact in float64 for
        # float32 data (24 + 12 bits), which keeps streamed and one-shot histograms identical.
        chunk *= self.bins / (2 * self.half_range)
        chunk += self.bins // 2
        index = chunk.astype(np.int32)
        if self.saturated:  # x == R lands one past the end
            np.minimum(index, self.bins - 1, out=index)
        self.hist += np.bincount(index, minlength=self.bins)

    def _cover(self, amax: float) -> None:
        """Grows R (doubling, merging bin pairs) until amax < R, or up to MAX_RANGE."""
        wanted = 2.0 ** (math.floor(math.log2(amax)) + 1) if amax > 0 else MIN_RANGE
        wanted = min(max(wanted, MIN_RANGE), MAX_RANGE)
        if amax >= MAX_RANGE:
            self.saturated = True
        if self.half_range == 0:
            self.half_range = wanted
        quarter = self.bins // 4
        while self.half_range < wanted:
            merged = self.hist.reshape(-1, 2).sum(axis=1)
            self.hist = np.zeros_like(self.hist)
            self.hist[quarter:quarter + merged.size] = merged
            self.half_range *= 2


def compute_range(stats: TensorStats, method: str, *, percentile: float = 99.99, symmetric: bool = False,
                  qmin: int = 0, qmax: int = 255) -> tuple[float, float]:
    """The (lo, hi) float range to quantize the tensor to [qmin, qmax]; see the module docstring."""
    if method not in METHODS:
        raise OnnxoptError(f"unknown calibration method '{method}'", f"choose one of {', '.join(METHODS)}")
    if not 0 < percentile <= 100:
        raise OnnxoptError(f"percentile {percentile} is outside (0, 100]", "e.g. percentile=99.99")
    if qmax <= qmin:
        raise OnnxoptError(f"quantized range [{qmin}, {qmax}] is empty", "e.g. qmin=0, qmax=255")
    if stats.count == stats.nonfinite:
        raise OnnxoptError("calibration saw no finite value for this tensor", "check the calibration data")
    one_sided = not symmetric and (stats.min >= 0 or stats.max <= 0)
    if method == "minmax":
        lo, hi = stats.min, stats.max
    elif method == "percentile" and not symmetric:
        lo, hi = _signed_percentiles(stats, percentile)
    else:
        absolute = _folded(stats)
        width = stats.bin_width
        if method == "percentile":
            t = _quantile(absolute, percentile / 100, width)
        elif method == "entropy":
            levels = (qmax - qmin + 1) // (1 if one_sided else 2)
            t = _entropy_threshold(absolute, levels) * width
        else:
            t = _mse_threshold(absolute, width, (qmax - qmin) / (1 if one_sided else 2))
        lo, hi = -t, t
    return _usable(stats, lo, hi, symmetric)


def _usable(stats: TensorStats, lo: float, hi: float, symmetric: bool) -> tuple[float, float]:
    """Clamped to the data, widened to include 0, never narrower than MIN_SPAN."""
    lo, hi = min(max(lo, stats.min), 0.0), max(min(hi, stats.max), 0.0)
    if symmetric:
        lo, hi = -max(-lo, hi, MIN_SPAN / 2), max(-lo, hi, MIN_SPAN / 2)
    elif hi - lo < MIN_SPAN:
        hi = lo + MIN_SPAN
    return float(lo), float(hi)


def _folded(stats: TensorStats) -> np.ndarray:
    """Histogram of |x|, bin k = [k w, (k+1) w), trimmed after its last nonzero bin."""
    half = stats.bins // 2
    absolute = stats.hist[half:] + stats.hist[:half][::-1]
    nonzero = np.flatnonzero(absolute)
    return absolute[:nonzero[-1] + 1] if nonzero.size else absolute[:1]


def _quantile(hist: np.ndarray, q: float, width: float, origin: float = 0.0) -> float:
    cdf = np.cumsum(hist)
    target = q * cdf[-1]
    k = min(int(np.searchsorted(cdf, target)), hist.size - 1)
    below = cdf[k - 1] if k else 0
    inside = (target - below) / hist[k] if hist[k] else 1.0
    return origin + (k + min(max(inside, 0.0), 1.0)) * width


def _signed_percentiles(stats: TensorStats, percentile: float) -> tuple[float, float]:
    cut = (100 - percentile) / 200
    lo = _quantile(stats.hist, cut, stats.bin_width, -stats.half_range)
    hi = _quantile(stats.hist, 1 - cut, stats.bin_width, -stats.half_range)
    return lo, hi


def _entropy_threshold(hist: np.ndarray, levels: int) -> int:
    """Number of |x| bins to keep: the TensorRT KL search, all candidates at once."""
    size = hist.size
    if size <= levels:
        return size
    h = hist.astype(np.float64)
    total = h.sum()
    prefix = np.concatenate([[0.0], np.cumsum(h)])
    plogp = np.concatenate([[0.0], np.cumsum(np.where(h > 0, h * np.log(np.maximum(h, 1)), 0.0))])
    nonzero = np.concatenate([[0], np.cumsum(h > 0)])
    kept = np.arange(levels, size + 1)  # candidate i
    bounds = (np.arange(levels + 1)[None, :] * kept[:, None]) // levels  # level j = bins [bounds_j, bounds_j+1)
    mass = np.diff(prefix[bounds], axis=1)  # h in each level, outliers excluded
    nnz = np.diff(nonzero[bounds], axis=1).astype(np.float64)
    last = h[kept - 1] + (total - prefix[kept])  # P's last bin, outliers folded in
    nnz[:, -1] += (h[kept - 1] == 0) & (last > 0)
    p_mass = mass.copy()
    p_mass[:, -1] += total - prefix[kept]
    with np.errstate(divide="ignore", invalid="ignore"):
        p_log_p = plogp[kept - 1] + np.where(last > 0, last * np.log(np.maximum(last, 1)), 0.0)
        log_q = np.log(np.maximum(mass / nnz, _SMOOTHING) / prefix[kept][:, None])
        cross = np.where(p_mass > 0, p_mass * log_q, 0.0).sum(axis=1)
        divergence = (p_log_p - cross) / total - np.log(total)
    divergence[~np.isfinite(divergence) | (prefix[kept] == 0)] = np.inf  # nothing kept: no Q to compare
    return int(kept[np.argmin(divergence)])


def _mse_threshold(hist: np.ndarray, width: float, steps: float) -> float:
    """Clipping threshold minimizing the histogram's expected quantization + clipping error."""
    h = hist.astype(np.float64)
    centers = (np.arange(h.size) + 0.5) * width
    t = np.arange(1, h.size + 1) * width  # candidate m keeps bins [0, m)
    suffix = lambda x: np.cumsum(x[::-1])[::-1]  # noqa: E731  sum over bins k >= m
    count, first, second = suffix(h), suffix(h * centers), suffix(h * centers**2)
    inside = np.cumsum(h) * (t / steps) ** 2 / 12
    clipped = np.append(second[1:] - 2 * t[:-1] * first[1:] + t[:-1] ** 2 * count[1:], 0.0)
    return float(t[np.argmin(inside + clipped)])


@dataclasses.dataclass
class Probe:
    """One input whose float activations the calibration session also returns (`values`, filled by
    `Calibrator.collect`): the quantization report compares against them without building a second
    session of the float model. `values` stays None when the statistics came from the cache."""

    feeds: dict[str, np.ndarray]
    values: dict[str, np.ndarray] | None = None


class Calibrator:
    """Collects TensorStats of chosen tensors with one ORT session run batch by batch; only one
    batch's activations are alive at a time."""

    def __init__(self, model: onnx.ModelProto, tensor_names: Iterable[str], ep: str = "cpu",
                 bins: int = DEFAULT_BINS, channel_tensors: Iterable[str] = ()):
        self.names = list(dict.fromkeys(tensor_names))
        self.channel_tensors = set(channel_tensors)
        self.bins = bins
        self.runs = 0  # session.run calls, for callers and tests
        graph = model.graph
        self._inputs = {i.name for i in graph.input} - {t.name for t in graph.initializer}
        self._constants, produced = {}, set()
        for scope, _ in scopes(model):  # a tensor inside an If branch or a Loop body is fetched from there
            self._constants.update({t.name: t for t in scope.initializer if t.name in self.names})
            produced.update(out for node in scope.node for out in node.output)
        unknown = [n for n in self.names if n not in produced | self._inputs | set(self._constants)]
        if unknown:
            raise OnnxoptError(f"tensor(s) {', '.join(unknown[:5])} not in the model",
                               "calibrate tensors that a node produces or a graph input")
        self._fetched = [n for n in self.names if n in produced]
        self._model, self._ep = model, ep

    def collect(self, data: Iterable[dict], progress: Progress | bool = True, total: int | None = None,
                probe: Probe | None = None) -> dict[str, TensorStats]:
        stats = {name: TensorStats(self.bins, track_channels=name in self.channel_tensors) for name in self.names}
        for name, tensor in self._constants.items():
            stats[name].update(numpy_helper.to_array(tensor))
        session, fetch = fetching_session(self._model, self._fetched, self._ep) if self._fetched else (None, {})
        outputs_of = [fetch[n] for n in self._fetched]
        feed_names = {i.name for i in session.get_inputs()} if session else self._inputs
        total = total if total is not None else getattr(data, "num_batches", None)
        batches = as_progress(progress)(data, "calibration", "batch", total)
        for feeds in batches:
            for name in self.names:
                if name in self._inputs and name not in self._constants:
                    stats[name].update(feeds[name])
            if session is not None:
                outputs = session.run(outputs_of, {k: v for k, v in feeds.items() if k in feed_names})
                self.runs += 1
                for name, value in zip(self._fetched, outputs):
                    stats[name].update(value)
                del outputs
        if probe is not None:
            probe.values = {name: probe.feeds[name] for name in self.names if name in probe.feeds}
            if session is not None:
                fed = {k: v for k, v in probe.feeds.items() if k in feed_names}
                probe.values.update(zip(self._fetched, session.run(outputs_of, fed)))
        return stats


def load_or_collect(model: onnx.ModelProto, tensor_names: Iterable[str], data, cache: Cache | None = None,
                    *, ep: str = "cpu", bins: int = DEFAULT_BINS, progress: Progress | bool = True,
                    channel_tensors: Iterable[str] = (), probe: Probe | None = None) -> dict[str, TensorStats]:
    """TensorStats from the cache when this model, data, tensor set and bin count were seen before,
    else collected (one inference pass) and stored. Data without `fingerprint()` (a plain iterable, a
    one-shot iterator) is collected without the cache. A `probe` is filled only when collecting."""
    names = sorted(set(tensor_names))
    channels = sorted(set(channel_tensors))
    if not getattr(data, "reiterable", False) or not hasattr(data, "fingerprint"):
        return Calibrator(model, names, ep, bins, channels).collect(data, progress, probe=probe)
    cache = cache or Cache()
    entry = cache_key(STATS_FORMAT, model_fingerprint(model), data.fingerprint(), ep, str(bins), *names,
                      "channels", *channels)
    cached = cache.load(CACHE_KIND, entry, lambda arrays: _decode_stats(arrays, names, bins))
    if cached is not None:
        return cached
    stats = Calibrator(model, names, ep, bins, channels).collect(data, progress, probe=probe)
    cache.save(CACHE_KIND, entry, _encode_stats(stats))
    return stats


def _encode_stats(stats: dict[str, TensorStats]) -> dict[str, np.ndarray]:
    arrays_fields = ("hist", "channel_min", "channel_max", "channel_sum")
    meta = {name: {f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.name not in arrays_fields}
            for name, s in stats.items()}
    arrays = {"meta": np.array(json.dumps(meta))}
    for i, s in enumerate(stats.values()):
        arrays[f"hist_{i}"] = s.hist
        if s.channel_min is not None:
            arrays[f"cmin_{i}"], arrays[f"cmax_{i}"], arrays[f"csum_{i}"] = s.channel_min, s.channel_max, s.channel_sum
    return arrays


def _decode_stats(arrays: dict[str, np.ndarray], names: list[str], bins: int) -> dict[str, TensorStats] | None:
    """The cached stats, or None when they are not what this run would have collected (another
    tensor set) or not statistics at all (a histogram of the wrong length, NaN ranges)."""
    meta = json.loads(str(arrays["meta"]))
    if list(meta) != names:
        return None
    stats = {name: TensorStats(**fields, hist=arrays[f"hist_{i}"], channel_min=arrays.get(f"cmin_{i}"),
                               channel_max=arrays.get(f"cmax_{i}"), channel_sum=arrays.get(f"csum_{i}"))
             for i, (name, fields) in enumerate(meta.items())}
    for st in stats.values():
        seen_finite = st.count > st.nonfinite
        if (st.bins != bins or st.hist.shape != (bins,) or st.hist.sum() > st.count - st.nonfinite
                or (seen_finite and not (math.isfinite(st.min) and math.isfinite(st.max) and st.min <= st.max))):
            return None
    return stats
