"""Expert weights as fixed pools of slots, one contiguous blob per slot.

A blob holds one expert's gate+up [2I, D] followed by its down [D, I], so loading or evicting an
expert is one read or one copy. The MoE block reads weights through `slot_of[expert]`, so the same
compute runs whether every expert is resident (slot = expert) or a cache maps a few of them.
"""
from __future__ import annotations

import mmap
from typing import Iterator, Protocol

import torch

from ..prepack import pack

PAGE = 4096


def round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def float_blob_bytes(hidden: int, inter: int, element_size: int, bias: bool = False) -> int:
    """Bytes of one float expert's blob: gate+up [2I, D], down [D, I], and the biases [2I] + [D] when it has them."""
    return (3 * inter * hidden + (2 * inter + hidden if bias else 0)) * element_size


def slot_memory(slots: int, nbytes: int, device, align: int) -> tuple[mmap.mmap | None, int, torch.Tensor]:
    """(mmap or None, padded stride in bytes or 0, blob uint8 [slots, nbytes]) for `slots` blobs of nbytes.

    With `align` (CPU only) every slot starts on an `align`-byte boundary and owns a padded stride of whole
    pages, in anonymous mmap memory (zero filled; untouched pages cost no RSS until first written)."""
    if align and torch.device(device).type == "cpu":
        stride = round_up(nbytes, align)
        mm = mmap.mmap(-1, max(slots, 1) * stride)
        flat = torch.frombuffer(mm, dtype=torch.uint8)
        return mm, stride, flat[:slots * stride].view(slots, stride)[:, :nbytes]
    return None, 0, torch.zeros(slots, nbytes, dtype=torch.uint8, device=device)


def pack_bias(pool, slot: int, b13: torch.Tensor | None, b2: torch.Tensor | None) -> None:
    """An expert's biases [2I] / [D] into the slot of a pool that keeps biases (gpt-oss); nothing for one that does
    not."""
    if pool.b13 is None:
        return
    if b13 is None or b2 is None:
        raise ValueError("this expert pool keeps biases: pack() needs b13 and b2")
    pool.b13[slot].copy_(b13)
    pool.b2[slot].copy_(b2)


class ExpertPool:
    """`slots` blobs of one MoE layer: views w13 [S, 2I, D] and w2 [S, D, I] into one [S, blob] tensor, and with
    `bias` the experts' biases b13 [S, 2I] and b2 [S, D] after them (gpt-oss; else None).

    t13 / t2 store that matrix of every slot column-major (its transpose contiguous) inside the blob,
    when that layout multiplies faster here (models/layout.py); the views keep the logical shapes.

    With `align` (CPU only) every slot starts on an `align`-byte boundary and owns a padded stride of
    whole pages, in anonymous mmap memory: an O_DIRECT read can then land straight in the slot
    (`raw(slot)`), with no staging copy. Untouched pages cost no RSS until first written.
    """

    def __init__(self, slots: int, hidden: int, inter: int, dtype: torch.dtype, device="cpu",
                 t13: bool = False, t2: bool = False, align: int = 0, bias: bool = False):
        self.hidden, self.inter, self.slots, self.dtype = hidden, inter, slots, dtype
        self.t13, self.t2, self.bias = bool(t13), bool(t2), bool(bias)
        self.n13 = 2 * inter * hidden
        n = self.n13 + hidden * inter
        es = torch.empty((), dtype=dtype).element_size()
        self._mm, self.stride_bytes, raw = slot_memory(slots, float_blob_bytes(hidden, inter, es, bias), device, align)
        self.blob = raw.view(dtype)
        w13, w2 = self.blob[:, :self.n13], self.blob[:, self.n13:n]
        self.w13 = w13.view(slots, hidden, 2 * inter).transpose(1, 2) if t13 else w13.view(slots, 2 * inter, hidden)
        self.w2 = w2.view(slots, inter, hidden).transpose(1, 2) if t2 else w2.view(slots, hidden, inter)
        self._views = (self.w13, self.w2)         # the blob's dense views (PrepackingPool swaps w13 / w2 for copies)
        self.b13 = self.blob[:, n:n + 2 * inter] if bias else None
        self.b2 = self.blob[:, n + 2 * inter:n + 2 * inter + hidden] if bias else None

    @property
    def layout(self) -> dict:
        """What a blob's bytes mean (a packed expert file must match it to be read into this pool)."""
        lay = {"hidden": self.hidden, "inter": self.inter, "dtype": str(self.dtype).removeprefix("torch."),
               "t13": self.t13, "t2": self.t2}
        return {**lay, "bias": True} if self.bias else lay

    @property
    def blob_bytes(self) -> int:
        return self.blob.shape[1] * self.blob.element_size()

    def flat(self) -> torch.Tensor:
        """[S, 3 I D] every slot's weights flattened in logical order (gate+up then down)."""
        return torch.cat([self.w13.reshape(self.slots, -1), self.w2.reshape(self.slots, -1)], dim=1)

    def raw(self, slot: int) -> memoryview | None:
        """The slot's whole padded stride as writable bytes (aligned pools only), for direct reads."""
        if self._mm is None:
            return None
        return memoryview(self._mm)[slot * self.stride_bytes:(slot + 1) * self.stride_bytes]

    def after_load(self, slots: list[int]) -> None:
        """Called by the loader once these slots hold new experts, before anyone computes with them (a hook:
        models/packed.py's PrepackingPool repacks there)."""

    def hit(self, slot: int) -> None:
        """Called by the cache when it hands a loaded slot to a forward (a hook, as after_load)."""

    def pack(self, slot: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
             b13: torch.Tensor | None = None, b2: torch.Tensor | None = None) -> None:
        """gate/up [I, D], down [D, I] (HF per-expert layout), and the biases [2I] / [D] of a pool with biases, into
        one slot."""
        w13, w2 = self._views
        w13[slot, :self.inter].copy_(gate)
        w13[slot, self.inter:].copy_(up)
        w2[slot].copy_(down)
        pack_bias(self, slot, b13, b2)


class PrepackingPool(ExpertPool):
    """An expert cache's bf16 pool whose slots are computed from prepacked copies from their `after_uses`-th use
    since loading: a dense bf16 weight is reordered on every call (markedly slower on the expert shapes), but
    packing one costs as much as tens of products with it, which only an expert that stays cached repays, so the
    cache uses this pool only when it holds every expert (build.py) and packs on first use. The slot's own
    pages are released once packed, so it still holds about one copy of each expert. w13 / w2 are per-slot lists
    of dense views or packed copies; the blob's views stay in _views for I/O and packing."""

    def __init__(self, *args, after_uses: int = 1, **kw):
        super().__init__(*args, **kw)
        self.w13, self.w2 = list(self.w13), list(self.w2)
        self._uses, self._after = [0] * self.slots, after_uses

    def after_load(self, slots: list[int]) -> None:
        d13, d2 = self._views
        for s in slots:
            self.w13[s], self.w2[s], self._uses[s] = d13[s], d2[s], 0

    def hit(self, slot: int) -> None:
        self._uses[slot] += 1
        if self._uses[slot] == self._after:
            d13, d2 = self._views
            self.w13[slot], self.w2[slot] = pack(d13[slot]), pack(d2[slot])
            if self._mm is not None:          # the bytes now live in the packed copies: give the pages back
                self._mm.madvise(mmap.MADV_DONTNEED, slot * self.stride_bytes, self.stride_bytes)

    def flat(self) -> torch.Tensor:
        """[S, 3 I D] every slot's weights (packed ones read back from their copies)."""
        return torch.stack([torch.cat([(a.to_dense() if a.layout == torch._mkldnn else a).reshape(-1),
                                       (b.to_dense() if b.layout == torch._mkldnn else b).reshape(-1)])
                            for a, b in zip(self.w13, self.w2)])


class ExpertProvider(Protocol):
    """What the MoE block needs from the expert memory (one call per MoE layer per forward)."""

    def observe(self, layer: int, x: torch.Tensor) -> None:
        """The hidden state [N, D] entering `layer`'s MoE block (a prediction hook for prefetchers)."""

    def chunks(self, layer: int, ids: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Yield (slots [N, K], mask [N, K] bool | None) until every (token, k) of ids was computable once.

        The experts of a yielded chunk stay in their slots until the caller asks for the next chunk
        (or closes the generator). mask None means the whole of ids in one pass.
        """

    def ensure(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """Make these experts computable; return their slot ids (same shape as ids)."""

    def pool(self, layer: int) -> ExpertPool:
        """The layer's slot pool."""

    def resident(self, layer: int) -> torch.Tensor:
        """Experts usable right now without I/O."""

    def cached(self, layer: int) -> torch.Tensor:
        """Experts usable without starting I/O (resident, or loading into a slot already)."""


class ResidentExperts:
    """Every expert in fast memory: slot = expert id, no I/O, nothing to wait for."""

    def __init__(self, pools: dict[int, ExpertPool], num_experts: int):
        self.pools = pools
        self.num_experts = num_experts
        self._all = torch.arange(num_experts)

    def observe(self, layer: int, x: torch.Tensor) -> None:
        pass

    def chunks(self, layer: int, ids: torch.Tensor):
        yield ids, None

    def ensure(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        return ids

    def release(self, layer: int) -> None:
        pass

    def pool(self, layer: int) -> ExpertPool:
        return self.pools[layer]

    def resident(self, layer: int) -> torch.Tensor:
        return self._all

    def cached(self, layer: int) -> torch.Tensor:
        return self._all

    def expert_bytes(self) -> int:
        return next(iter(self.pools.values())).blob_bytes if self.pools else 0

    def stats(self) -> dict:
        return {"capacity": self.num_experts, "tier": "resident"}

    def close(self) -> None:
        pass
