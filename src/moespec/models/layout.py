"""Pick the storage layout of each weight matrix for fast one-token decode on this machine.

Decode is memory-bound: each token streams every active weight once through a matrix-vector
product, and the speed of that product depends on whether the [out, in] matrix is stored row-major
or column-major, in a way that varies with the shape, the CPU and the BLAS (with F.linear on one AVX2
CPU some shapes ran faster column-major and others row-major; on another CPU row-major through
layers.linear's W @ X^T path won every shape, by more at four rows than at one). So each distinct
shape is timed once at load (one row and four rows: decode and verification), on matrices too many to
stay in cache, and the faster layout is kept.
Both layouts give the same logical [out, in] tensor, so compute code is unchanged.
"""
from __future__ import annotations

import time

import torch

from .layers import linear
from .packed import pack, packing_supported


def as_layout(w: torch.Tensor, colmajor: bool) -> torch.Tensor:
    """The same [out, in] matrix, stored column-major (its transpose contiguous) if asked."""
    if colmajor:
        return w.t().contiguous().t()
    # A fresh copy when the tensor is a view at an odd offset (e.g. into a checkpoint file): BLAS rounding
    # depends on operand alignment, and the same weights must give the same logits however they were stored.
    return w.contiguous() if w.is_contiguous() and w.data_ptr() % 64 == 0 else w.clone(memory_format=torch.contiguous_format)


def sample_matrices(shape: tuple[int, int], dtype: torch.dtype, budget_bytes: int = 64 << 20) -> list[torch.Tensor]:
    """2-16 random [out, in] matrices of `dtype`, as many as fit `budget_bytes`: too many to stay in cache."""
    out_f, in_f = shape
    n = max(2, min(16, budget_bytes // max(1, out_f * in_f * torch.finfo(dtype).bits // 8)))
    return [torch.randn(out_f, in_f).to(dtype) for _ in range(n)]


def product_time(ws: list[torch.Tensor], rows: tuple[int, ...] = (1, 4)) -> float:
    """Best of 3 of the summed seconds of `layers.linear` over every weight in `ws` at each row count (after a
    warm-up on two of them): the cost decode (1 row) and verification (a few rows) would see."""
    xs = [torch.randn(m, ws[0].shape[1]).to(ws[0].dtype) for m in rows]
    for x in xs:
        for w in ws[:2]:
            linear(x, w)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        for x in xs:
            for w in ws:
                linear(x, w)
        times.append(time.perf_counter() - t)
    return min(times)


def faster_colmajor(shape: tuple[int, int], dtype: torch.dtype, device, budget_bytes: int = 64 << 20,
                    rows: tuple[int, ...] = (1, 4)) -> bool:
    """True if the products decode and verification make (1 and 4 rows, times summed) are faster with W stored
    column-major than row-major, each through `layers.linear` (which takes the W @ X^T path for row-major
    fp32 weights)."""
    if torch.device(device).type != "cpu":
        return False
    mats = sample_matrices(shape, dtype, budget_bytes)
    t_row = product_time(mats, rows)
    cols = []
    while mats:             # one copy at a time: the timing should not hold twice its samples
        cols.append(as_layout(mats.pop(), True))
    return product_time(cols, rows) < 0.9 * t_row    # keep the usual layout unless the other clearly wins


def faster_packed(shape: tuple[int, int], colmajor: bool, budget_bytes: int = 64 << 20,
                  rows: tuple[int, ...] = (1, 4)) -> bool:
    """True if bf16 products of 1 and 4 rows (decode, verification) are clearly faster on the prepacked
    weight than through layers.linear on the layout the chooser picked, timed on matrices too many to stay
    in cache."""
    if not packing_supported():
        return False
    dense = [as_layout(w, colmajor) for w in sample_matrices(shape, torch.bfloat16, budget_bytes)]
    t_dense = product_time(dense, rows)
    packed = []
    while dense:            # one copy at a time: loading should not peak at twice the timing samples
        packed.append(pack(dense.pop()))
    return product_time(packed, rows) < 0.9 * t_dense


class LayoutChooser:
    """Caches one decision per (shape, dtype) for a load; `auto=False` keeps HF's row-major layout.

    bf16 weights on CPUs with native bf16 may also be prepacked for oneDNN (packed.py) where that is faster:
    `pack` None times it per shape, True / False force it (True only where packing is supported)."""

    def __init__(self, dtype: torch.dtype, device, auto: bool = True, pack: bool | None = None,
                 sample_bytes: int = 64 << 20):
        """sample_bytes: memory the timing may hold (under a --memory budget a smaller sample than the default,
        which is sized to defeat a 32 MB L3)."""
        self.dtype, self.device, self.auto, self.sample_bytes = dtype, device, auto, sample_bytes
        self.choice: dict[tuple[int, int], bool] = {}
        self._pack: dict[tuple[int, int], bool] = {}
        able = (dtype is torch.bfloat16 and torch.device(device).type == "cpu" and packing_supported())
        self.pack = False if not able or (pack is None and not auto) else pack

    def colmajor(self, shape: tuple[int, int]) -> bool:
        if not self.auto:
            return False
        if shape not in self.choice:
            self.choice[shape] = faster_colmajor(shape, self.dtype, self.device, self.sample_bytes)
        return self.choice[shape]

    def packs(self, shape: tuple[int, int]) -> bool:
        """Store this shape prepacked (packed.py)?"""
        if self.pack is not None:
            return self.pack
        if shape not in self._pack:
            self._pack[shape] = faster_packed(shape, self.colmajor(shape), self.sample_bytes)
        return self._pack[shape]

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        if self.packs(tuple(w.shape)):
            return pack(w)
        return as_layout(w, self.colmajor(tuple(w.shape)))
