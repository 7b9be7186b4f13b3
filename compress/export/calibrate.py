"""Activation ranges for INT8 Q/DQ from calibration batches run through ONNX Runtime (CPU).

Every tensor to quantize is exposed as a graph output; one pass takes ``max|x|`` and ``min x``,
a second a histogram of ``|x|`` (2048 bins on ``[0, max|x|]``). The clipping threshold then
comes from: ``minmax`` (max|x|), ``percentile`` (of |x|), ``entropy`` (TensorRT's KL-divergence
search) or ``mse`` (expected squared error of clipping plus rounding).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from tqdm.auto import tqdm

from adagrow.onnxrt import cpu_session

CALIB_METHODS = ("minmax", "percentile", "entropy", "mse")
BINS = 2048


@dataclass
class TensorStats:
    amax: float          # max |x|
    minimum: float       # min x (>= 0 means the tensor can use an unsigned grid)
    hist: np.ndarray     # counts of |x| in BINS bins on [0, amax]


def _session(model: onnx.ModelProto, names: list[str]) -> ort.InferenceSession:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    present = {o.name for o in m.graph.output}
    for name in names:
        if name not in present:
            m.graph.output.append(onnx.ValueInfoProto(name=name))
    return cpu_session(m, optimize=False)  # keeps tensor names


def collect_stats(model: onnx.ModelProto, names: list[str], feeds: list[dict[str, np.ndarray]],
                  progress: bool = True) -> dict[str, TensorStats]:
    """Run the float graph on ``feeds`` (``{input name: batch}``) and gather range statistics of ``names``."""
    sess = _session(model, names)
    amax = dict.fromkeys(names, 0.0)
    minimum = dict.fromkeys(names, np.inf)
    for feed in tqdm(feeds, desc="calibrate (ranges)", disable=not progress):
        for name, val in zip(names, sess.run(names, feed)):
            amax[name] = max(amax[name], float(np.abs(val).max()))
            minimum[name] = min(minimum[name], float(val.min()))
    hists = {n: np.zeros(BINS, dtype=np.int64) for n in names}
    for feed in tqdm(feeds, desc="calibrate (histograms)", disable=not progress):
        for name, val in zip(names, sess.run(names, feed)):
            top = amax[name] if amax[name] > 0 else 1.0
            hists[name] += np.histogram(np.abs(val), bins=BINS, range=(0.0, top))[0]
    return {n: TensorStats(amax[n], minimum[n], hists[n]) for n in names}


def _kl_threshold(hist: np.ndarray, levels: int) -> int:
    """Number of histogram bins to keep that minimises KL(P || Q) (TensorRT's entropy method).

    The zero bin takes its neighbour's count first, as NVIDIA's calibrators do, so that the exact
    zeros after a ReLU do not dominate the distributions and force a tiny threshold.
    """
    hist = hist.astype(np.float64)
    hist[0] = hist[1]
    best, best_i = np.inf, len(hist)
    for i in range(levels, len(hist) + 1):
        ref = hist[:i].copy()
        ref[-1] += hist[i:].sum()
        edges = np.linspace(0, i, levels + 1).astype(int)
        sums = np.add.reduceat(hist[:i], edges[:-1])
        nonzero = hist[:i] > 0
        counts = np.add.reduceat(nonzero.astype(np.float64), edges[:-1])
        per = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
        q = np.repeat(per, np.diff(edges)) * nonzero
        if ref.sum() == 0 or q.sum() == 0:
            continue
        p, q = ref / ref.sum(), q / q.sum()
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best:
            best, best_i = kl, i
    return best_i


def _mse_threshold(hist: np.ndarray, levels: int) -> int:
    """Bins to keep that minimise the histogram's expected clipping + rounding squared error."""
    centers = np.arange(len(hist)) + 0.5
    cand = np.arange(1, len(hist) + 1)[:, None]
    clip = np.where(centers[None, :] > cand, (centers[None, :] - cand) ** 2, 0.0)
    rounding = np.where(centers[None, :] <= cand, (cand / levels) ** 2 / 12.0, 0.0)
    err = ((clip + rounding) * hist[None, :]).sum(1)
    return int(cand[int(np.argmin(err)), 0])


def threshold(stats: TensorStats, method: str, levels: int, percentile: float = 99.99) -> float:
    """Clipping threshold (>= 0) for a grid with ``levels`` steps on each side of zero."""
    if method not in CALIB_METHODS:
        raise ValueError(f"calibration method must be one of {CALIB_METHODS}, got {method!r}")
    if stats.amax == 0 or method == "minmax":
        return stats.amax
    width = stats.amax / len(stats.hist)
    if method == "percentile":
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        cdf = np.cumsum(stats.hist) / stats.hist.sum()
        return float(min(np.searchsorted(cdf, percentile / 100.0) + 1, len(cdf)) * width)
    keep = _kl_threshold(stats.hist, levels) if method == "entropy" else _mse_threshold(stats.hist, levels)
    return float(keep * width)
