"""A preallocated KV cache passed explicitly to every forward.

Layout: k, v [layers, B, G, S, hd] (G kv heads, S capacity; v may be narrower, or empty for MLA's latent). Row b holds `lens[b]` committed
tokens at slots 0..lens[b]-1. A forward over T new tokens writes them at slots
lens[b]..lens[b]+T-1 without committing; the caller then commits what it keeps (`advance`), so
speculative tokens beyond the committed length are simply overwritten by the next forward.
"""
from __future__ import annotations

import torch

from .errors import MoespecError


class KVCache:
    def __init__(self, num_layers: int, batch: int, capacity: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", v_dim: int | None = None):
        """v_dim: the values' width when it differs from the keys' (0: no values, MLA keeps one latent as keys)."""
        shape = (num_layers, batch, num_kv_heads, capacity, head_dim)
        # Zeros, not empty: masked slots still enter SDPA, and 0 * NaN garbage would poison outputs.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape[:-1] + (head_dim if v_dim is None else v_dim,), dtype=dtype, device=device)
        self.capacity = capacity
        self.lens = [0] * batch    # committed length per row, as Python ints: no device syncs to read

    @property
    def batch(self) -> int:
        return len(self.lens)

    def lens_tensor(self) -> torch.Tensor:
        return torch.tensor(self.lens, dtype=torch.long, device=self.k.device)

    def check_room(self, t: int) -> None:
        if max(self.lens) + t > self.capacity:
            raise MoespecError(f"sequence would exceed the KV cache capacity of {self.capacity} tokens")

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, G, T, hd] after each row's committed tokens; return the visible k/v [B, G, L, hd]."""
        t = k.shape[2]
        lo, hi = min(self.lens), max(self.lens)
        if lo == hi:
            self.k[layer, :, :, lo:lo + t] = k
            self.v[layer, :, :, lo:lo + t] = v
        else:
            rows = torch.arange(self.batch, device=k.device)[:, None]
            slots = self.lens_tensor()[:, None] + torch.arange(t, device=k.device)[None, :]
            # (a bf16 model keeps a float32 cache on CPU: index_put, unlike slice assignment, does not convert)
            self.k[layer][rows, :, slots] = k.transpose(1, 2).to(self.k.dtype)
            self.v[layer][rows, :, slots] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[layer, :, :, :hi + t], self.v[layer, :, :, :hi + t]

    def mask(self, t: int, tree: torch.Tensor | None = None, window: int | None = None,
             positions: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor | None:
        """Visibility [B, 1, T, L] (True = attend) for T new tokens, or None when plain causal needs none.

        tree [T, T] or [B, T, T] (one per row) bool: which new tokens each new token sees (itself
        included); None = causal. positions [B, T]: the new tokens' positions, for the sliding window
        (default committed length + 0..T-1; a tree's are its depths). chunk: tokens see only keys of their own chunk of
        positions (Llama 4's chunked attention).
        """
        lo, hi = min(self.lens), max(self.lens)
        if tree is None and window is None and chunk is None and lo == hi and t == 1:
            return None
        dev = self.k.device
        L = hi + t
        rel = torch.arange(L, device=dev)[None, :] - self.lens_tensor()[:, None]        # [B, L]
        new = torch.tril(torch.ones(t, t, dtype=torch.bool, device=dev)) if tree is None else tree.to(dev)
        in_new = (rel >= 0) & (rel < t)
        relc = rel.clamp(0, t - 1)
        if new.dim() == 3:                                                               # per-row trees
            vis_new = torch.gather(new, 2, relc[:, None, :].expand(-1, t, -1))
        else:
            vis_new = new[:, relc].permute(1, 0, 2)                                        # [B, T, L]
        vis_new = vis_new & in_new[:, None, :]
        vis = (rel < 0)[:, None, :] | vis_new
        if window is not None or chunk is not None:
            qpos = self.lens_tensor()[:, None] + torch.arange(t, device=dev)[None, :] if positions is None \
                else positions.to(dev)                                                     # [B, T]
            kpos = torch.arange(L, device=dev).expand(self.batch, -1)                      # [B, L]
            if positions is not None:          # new tokens sit at their own positions (a tree's depths)
                kpos = torch.where(in_new, torch.gather(qpos, 1, relc), kpos)
            if window is not None:
                vis = vis & (qpos[:, :, None] - kpos[:, None, :] < window)
            if chunk is not None:
                vis = vis & (qpos[:, :, None] // chunk == kpos[:, None, :] // chunk)
        return vis[:, None]

    def advance(self, n: int | list[int]) -> None:
        """Commit n more tokens per row (the ones the last forward wrote)."""
        ns = [n] * self.batch if isinstance(n, int) else n
        self.lens = [a + b for a, b in zip(self.lens, ns)]

    def rollback(self, n: int | list[int]) -> None:
        """Forget the last n committed tokens of each row (an int for all rows, or one per row)."""
        ns = [n] * self.batch if isinstance(n, int) else n
        if any(b < 0 or b > a for a, b in zip(self.lens, ns)):
            raise ValueError(f"cannot roll back {ns} tokens from rows of lengths {self.lens}")
        self.lens = [a - b for a, b in zip(self.lens, ns)]

    def keep(self, row: int, slots: list[int]) -> None:
        """Commit the uncommitted entries at `slots` (ascending, each >= lens[row]) of one row, compacted.

        Used after tree verification: the accepted path's nodes are scattered among the written
        slots; they move to lens[row], lens[row]+1, ... and become committed.
        """
        base = self.lens[row]
        if any(s < base for s in slots) or sorted(slots) != list(slots):
            raise ValueError(f"keep needs ascending uncommitted slots >= {base}, got {slots}")
        if slots:
            src = torch.tensor(slots, device=self.k.device)
            dst = slice(base, base + len(slots))
            self.k[:, row, :, dst] = self.k[:, row, :, src]
            self.v[:, row, :, dst] = self.v[:, row, :, src]
        self.lens[row] = base + len(slots)

    def select_rows(self, rows: list[int], capacity: int | None = None) -> None:
        """Keep only these batch rows (in this order), e.g. to stop spending compute on finished sequences;
        `capacity`: the new capacity (default unchanged; at least the longest kept row): once the longest row
        has finished, the others need not keep its room."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.k.device)
        hi = max(self.lens[r] for r in rows) if rows else 0
        cap = self.capacity if capacity is None else capacity
        if cap < hi:
            raise MoespecError(f"a KV capacity of {cap} tokens cannot hold a kept row of {hi}")
        shape = (self.k.shape[0], len(rows), self.k.shape[2], cap)
        k = self.k.new_zeros(shape + self.k.shape[4:])
        v = self.v.new_zeros(shape + self.v.shape[4:])
        k[:, :, :, :hi] = self.k[:, idx, :, :hi]
        v[:, :, :, :hi] = self.v[:, idx, :, :hi]
        self.k, self.v, self.capacity = k, v, cap
        self.lens = [self.lens[r] for r in rows]

    def append_rows(self, other: KVCache) -> KVCache:
        """Append other's rows after these (sequences joining a running batch); the capacity becomes the
        larger of the two. Returns self."""
        cap = max(self.capacity, other.capacity)
        shape = (self.k.shape[0], self.batch + other.batch, *self.k.shape[2:3], cap)
        k = self.k.new_zeros(shape + self.k.shape[4:])
        v = self.v.new_zeros(shape + self.v.shape[4:])
        for dst, a, b in ((k, self.k, other.k), (v, self.v, other.v)):
            dst[:, :self.batch, :, :self.capacity] = a
            dst[:, self.batch:, :, :other.capacity] = b
        self.k, self.v, self.capacity = k, v, cap
        self.lens = self.lens + other.lens
        return self
