"""Fit the step model's rates to measured runs: time = max(bytes / bw, flops / peak) + overhead.

The max() makes the fit piecewise linear, but which branch a sample is on depends only on its arithmetic
intensity r = flops / bytes: compute-bound exactly when r > peak / bw. So we sort the samples by r, try every
split into a memory-bound prefix and a compute-bound suffix, solve each as one weighted linear least-squares
problem, time = x1 * bytes [memory side] + x2 * flops [compute side] + x3, and keep the split whose max() model
fits best in relative error. Example: samples (1 GB, 1 GFLOP, 0.0201 s) and (1 MB, 1 TFLOP, 0.0101 s) and a few
more recover bw = 50 GB/s, peak = 100 TFLOP/s, overhead = 0.1 ms.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .errors import PerfError
from .hardware import Hardware


@dataclass(frozen=True)
class StepFit:
    bw: float            # bytes/s
    peak: float          # flop/s (inf when no sample was compute-bound: the data cannot tell)
    overhead: float      # seconds per call
    rel_rmse: float      # root mean square relative error of the fitted model on the samples
    compute_bound: tuple[bool, ...]

    def predict(self, bytes_, flops) -> np.ndarray:
        return np.maximum(np.asarray(bytes_, float) / self.bw, np.asarray(flops, float) / self.peak) + self.overhead

    def apply(self, hw: Hardware, dtype_bytes: float, name: str | None = None) -> Hardware:
        """`hw` with the fitted rates (reachable rates, so the efficiencies become 1)."""
        kw = {"mem_bw_gbs": self.bw / 1e9, "layer_overhead_s": self.overhead, "mem_eff": 1.0}
        if np.isfinite(self.peak):
            kw["peak_fp32_tflops" if dtype_bytes >= 4 else "peak_bf16_tflops"] = self.peak / 1e12
            other = "peak_bf16_tflops" if dtype_bytes >= 4 else "peak_fp32_tflops"
            kw[other] = getattr(hw, other) * hw.flops_eff
            kw["flops_eff"] = 1.0
        return replace(hw, name=name or hw.name, **kw)


def _solve(b, f, y, mem):
    """Weighted lstsq of y = x1 b [mem] + x2 f [~mem] + x3 (weights 1/y: relative error)."""
    cols = [np.where(mem, b, 0.0), np.where(mem, 0.0, f), np.ones_like(y)]
    use = [c.any() for c in cols]
    A = np.stack([c for c, u in zip(cols, use) if u], axis=1) / y[:, None]
    x, *_ = np.linalg.lstsq(A, np.ones_like(y), rcond=None)
    full = np.zeros(3)
    full[np.array(use)] = x
    if full[2] < 0:                                   # a negative overhead is noise: refit through the origin
        A = A[:, :-1]
        x, *_ = np.linalg.lstsq(A, np.ones_like(y), rcond=None)
        full[:] = 0.0
        full[np.array(use[:2])] = x
    return full


def fit_step(bytes_, flops, times, calls=None) -> StepFit:
    """Least-squares fit of bandwidth, peak flop/s and per-call overhead from (bytes, flops, seconds) samples.

    `calls[i]` is how many identical layer calls sample i timed (default 1): the sample is then divided by it,
    so whole forwards of n similar layers can be used directly. Samples should span both memory-bound (small
    batches) and compute-bound (large batches) runs; with none compute-bound the peak is returned as inf.
    """
    b, f, y = (np.asarray(v, dtype=float).ravel() for v in (bytes_, flops, times))
    if not (len(b) == len(f) == len(y)) or len(y) < 3:
        raise PerfError("fit_step needs at least 3 samples of equal-length bytes, flops and times")
    if calls is not None:
        c = np.asarray(calls, dtype=float).ravel()
        b, f, y = b / c, f / c, y / c
    if np.any(y <= 0) or np.any(b < 0) or np.any(f < 0):
        raise PerfError("fit_step: times must be positive and bytes / flops non-negative")
    order = np.argsort(f / np.maximum(b, 1e-30))
    best = None
    for split in range(len(y) + 1):                   # samples order[:split] are memory-bound
        mem = np.zeros(len(y), dtype=bool)
        mem[order[:split]] = True
        x1, x2, x3 = _solve(b, f, y, mem)
        if x1 < 0 or x2 < 0 or (x1 == 0 and x2 == 0):
            continue
        pred = np.maximum(b * x1, f * x2) + x3
        err = float(np.sqrt(np.mean(((pred - y) / y) ** 2)))
        if best is None or err < best[0]:
            best = (err, x1, x2, x3)
    if best is None:
        raise PerfError("fit_step: no consistent fit (are the times increasing with bytes and flops?)")
    err, x1, x2, x3 = best
    bw = float(1.0 / x1) if x1 > 0 else float("inf")
    peak = float(1.0 / x2) if x2 > 0 else float("inf")
    return StepFit(bw=bw, peak=peak, overhead=float(x3), rel_rmse=err,
                   compute_bound=tuple(bool(v) for v in (f / peak > b / bw)))


def fit_link(bytes_, times) -> tuple[float, float]:
    """(bandwidth bytes/s, latency s) of a link from timed transfers: time = bytes / bw + latency."""
    b, y = np.asarray(bytes_, float).ravel(), np.asarray(times, float).ravel()
    if len(b) < 2 or len(b) != len(y) or np.ptp(b) == 0:
        raise PerfError("fit_link needs at least 2 transfers of different sizes")
    A = np.stack([b, np.ones_like(b)], axis=1) / y[:, None]
    (inv_bw, lat), *_ = np.linalg.lstsq(A, np.ones_like(y), rcond=None)
    if inv_bw <= 0:
        raise PerfError("fit_link: transfer time does not grow with size; cannot fit a bandwidth")
    return 1.0 / inv_bw, max(float(lat), 0.0)
