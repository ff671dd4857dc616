"""Pick the storage layout of each weight matrix for fast one-token decode on this machine.

Decode is memory-bound: each token streams every active weight once through a matrix-vector
product, and the speed of that product depends on whether the [out, in] matrix is stored row-major
or column-major, in a way that varies with the shape and the BLAS (measured on a 2-core AVX2 EPYC:
[2048, 512] runs 1.6x faster column-major, [512, 1024] 1.4x faster row-major). So each distinct
shape is timed once at load, on matrices too many to stay in cache, and the faster layout is kept.
Both layouts give the same logical [out, in] tensor, so compute code is unchanged.
"""
from __future__ import annotations

import time

import torch


def as_layout(w: torch.Tensor, colmajor: bool) -> torch.Tensor:
    """The same [out, in] matrix, stored column-major (its transpose contiguous) if asked."""
    return w.t().contiguous().t() if colmajor else w.contiguous()


def faster_colmajor(shape: tuple[int, int], dtype: torch.dtype, device, budget_bytes: int = 64 << 20) -> bool:
    """True if y = x W^T (x one row) is faster with W stored column-major."""
    if torch.device(device).type != "cpu":
        return False
    out_f, in_f = shape
    n = max(2, min(16, budget_bytes // max(1, out_f * in_f * torch.finfo(dtype).bits // 8)))
    rows = [torch.randn(out_f, in_f).to(dtype) for _ in range(n)]
    x = torch.randn(1, in_f).to(dtype)
    best = {}
    for col in (False, True):
        ws = [as_layout(w, col) for w in rows]
        for w in ws[:2]:
            torch.nn.functional.linear(x, w)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            for w in ws:
                torch.nn.functional.linear(x, w)
            times.append(time.perf_counter() - t)
        best[col] = min(times)
    return best[True] < 0.9 * best[False]    # keep the usual layout unless the other clearly wins


class LayoutChooser:
    """Caches one decision per (shape, dtype) for a load; `auto=False` keeps HF's row-major layout."""

    def __init__(self, dtype: torch.dtype, device, auto: bool = True):
        self.dtype, self.device, self.auto = dtype, device, auto
        self.choice: dict[tuple[int, int], bool] = {}

    def colmajor(self, shape: tuple[int, int]) -> bool:
        if not self.auto:
            return False
        if shape not in self.choice:
            self.choice[shape] = faster_colmajor(shape, self.dtype, self.device)
        return self.choice[shape]

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        return as_layout(w, self.colmajor(tuple(w.shape)))
