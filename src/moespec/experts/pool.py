"""Expert weights as fixed pools of slots, one contiguous blob per slot.

A blob holds one expert's gate+up [2I, D] followed by its down [D, I], so loading or evicting an
expert is one read or one copy. The MoE block reads weights through `slot_of[expert]`, so the same
compute runs whether every expert is resident (slot = expert) or a cache maps a few of them.
"""
from __future__ import annotations

from typing import Protocol

import torch


class ExpertPool:
    """`slots` blobs of one MoE layer: views w13 [S, 2I, D] and w2 [S, D, I] into one [S, blob] tensor."""

    def __init__(self, slots: int, hidden: int, inter: int, dtype: torch.dtype, device="cpu"):
        self.hidden, self.inter = hidden, inter
        self.n13 = 2 * inter * hidden
        self.blob = torch.zeros(slots, self.n13 + hidden * inter, dtype=dtype, device=device)
        self.w13 = self.blob[:, :self.n13].view(slots, 2 * inter, hidden)
        self.w2 = self.blob[:, self.n13:].view(slots, hidden, inter)

    @property
    def blob_bytes(self) -> int:
        return self.blob.shape[1] * self.blob.element_size()

    def pack(self, slot: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        """gate/up [I, D], down [D, I] (HF per-expert layout) into one slot."""
        self.w13[slot, :self.inter].copy_(gate)
        self.w13[slot, self.inter:].copy_(up)
        self.w2[slot].copy_(down)


class ExpertProvider(Protocol):
    """What the MoE block needs from the expert memory (one call per MoE layer per forward)."""

    def ensure(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """Make these experts computable; return their slot ids (same shape as ids)."""

    def pool(self, layer: int) -> ExpertPool:
        """The layer's slot pool."""

    def resident(self, layer: int) -> torch.Tensor:
        """Experts usable right now without I/O."""


class ResidentExperts:
    """Every expert in fast memory: slot = expert id, no I/O, nothing to wait for."""

    def __init__(self, pools: dict[int, ExpertPool], num_experts: int):
        self.pools = pools
        self.num_experts = num_experts
        self._all = torch.arange(num_experts)

    def ensure(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        return ids

    def pool(self, layer: int) -> ExpertPool:
        return self.pools[layer]

    def resident(self, layer: int) -> torch.Tensor:
        return self._all

    def expert_bytes(self) -> int:
        return next(iter(self.pools.values())).blob_bytes if self.pools else 0
