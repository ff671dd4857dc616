"""bf16 weights prepacked for oneDNN on CPUs with native bf16 (AVX512-BF16, AMX).

A bf16 `F.linear` on CPU reorders the weight into oneDNN's blocked layout on every call, so a decode step
streams each weight twice (read, write the reordered copy, read it again), and the same product on a weight
reordered once at load streams markedly faster, for one row as for a few. The result is bit-identical to
F.linear (the same oneDNN kernel runs on the same blocked layout), so packing changes speed only. A packed
weight is an opaque tensor (`layout == torch._mkldnn`) with the logical shape [out, in]; `layers.linear` sends
it to the prepacked kernel. `to_dense()` gives the matrix back.

Experts of a resident bf16 model are packed one matrix per expert (`PackedExperts`, the ExpertPool shape the
MoE block reads: `w13[slot]`, `w2[slot]`); offloaded experts stay in their slot blobs, which I/O fills.
"""
from __future__ import annotations

import functools

import torch

from ..experts.pool import ExpertPool
from ..prepack import pack
from .layers import SLOW_BF16_GEMM, linear

@functools.cache
def packing_supported() -> bool:
    """oneDNN can prepack bf16 weights here and multiplies them natively (CPUs without native bf16 run
    multi-row bf16 products through fp32 instead, layers.SLOW_BF16_GEMM, which needs dense weights). Probed once."""
    if SLOW_BF16_GEMM or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ones(16, 16, dtype=torch.bfloat16)
        x = torch.ones(1, 16, dtype=torch.bfloat16)
        return bool(torch.equal(linear(x, pack(w)), torch.nn.functional.linear(x, w)))
    except (RuntimeError, AttributeError):
        return False


class PackedExperts:
    """Every expert of one MoE layer with its two matrices prepacked: w13[e] [2I, D], w2[e] [D, I].

    Replaces the layer's ExpertPool (whose blob is freed), so packing costs no extra memory."""

    def __init__(self, pool: ExpertPool):
        self.hidden, self.inter, self.dtype, self.slots = pool.hidden, pool.inter, pool.dtype, pool.slots
        self.blob_bytes = pool.blob_bytes
        self.w13 = [pack(pool.w13[e]) for e in range(pool.slots)]
        self.w2 = [pack(pool.w2[e]) for e in range(pool.slots)]
        self.b13 = None if pool.b13 is None else pool.b13.clone()     # (the pool's blob is freed)
        self.b2 = None if pool.b2 is None else pool.b2.clone()

    def flat(self) -> torch.Tensor:
        """[E, 3 I D] every expert's weights flattened (gate+up then down), as dense rows."""
        return torch.stack([torch.cat([a.to_dense().reshape(-1), b.to_dense().reshape(-1)])
                            for a, b in zip(self.w13, self.w2)])
