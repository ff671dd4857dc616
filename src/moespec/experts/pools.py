"""Pools by storage layout: the one place that knows every kind of expert pool (float, quantized, prepacked bf16),
so the cache, the stores and the packed file build and size them from a pool's `layout` dict alone."""
from __future__ import annotations

import torch

from .quant_pool import QuantExpertPool, field_offsets
from .pool import ExpertPool, PrepackingPool, float_blob_bytes


def make_pool(layout: dict, slots: int, device="cpu", align: int = 0, prepack: bool = False):
    """An empty pool of `slots` blobs in the storage `layout` describes (ExpertPool.layout or the quantized pools'
    layout, which names its method). prepack: a bf16 pool computed from prepacked copies (pool.PrepackingPool)."""
    dtype = getattr(torch, layout["dtype"])
    if layout.get("quant"):
        return QuantExpertPool(slots, layout["hidden"], layout["inter"], dtype, layout["quant"],
                               layout.get("group_size") or 0, device, align, layout.get("bias", False))
    # (a prepacking pool gives a packed slot's pages back, and the biases live there too)
    kind = PrepackingPool if prepack and not layout.get("bias") else ExpertPool
    return kind(slots, layout["hidden"], layout["inter"], dtype, device, layout["t13"], layout["t2"], align,
                bias=layout.get("bias", False))


def layout_blob_bytes(layout: dict) -> int:
    """Bytes of one expert's blob in this storage layout."""
    dtype = getattr(torch, layout["dtype"])
    if layout.get("quant"):
        return field_offsets(layout["hidden"], layout["inter"], layout["quant"], layout.get("group_size") or 0,
                             dtype if layout.get("bias") else None)[1]
    return float_blob_bytes(layout["hidden"], layout["inter"], torch.empty((), dtype=dtype).element_size(),
                            layout.get("bias", False))
