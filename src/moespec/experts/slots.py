"""Per-layer slot state of the expert cache, its counters and its invariants."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .policy import POLICIES
from .prefetch import Load

COUNTERS = ("hits", "misses", "bytes_read", "evictions", "stall_s", "prefetch_issued", "prefetch_used",
            "prefetch_wasted", "preloaded", "chunked_layers", "load_errors")


@dataclass
class Counters:
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    evictions: int = 0
    stall_s: float = 0.0         # time the compute thread waited for loads
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    preloaded: int = 0
    chunked_layers: int = 0      # layer forwards that needed more experts than slots
    load_errors: int = 0         # failed loads (each also raised in the forward that waited on it, if any)


class LayerSlots:
    """One MoE layer's S slots: who is where, what is loading, what is locked or pinned."""

    def __init__(self, slots: int, num_experts: int, policy: str):
        self.expert_in = [-1] * slots
        self.loads: list[Load | None] = [None] * slots
        self.locks = [0] * slots
        self.pinned: set[int] = set()          # by pin()
        self.hot: set[int] = set()             # by the static policy
        self.prefetched: set[int] = set()      # slots loaded ahead of need and not used yet
        self.policy = POLICIES[policy](slots, num_experts)
        self.n = Counters()


def check_layer(st: LayerSlots, table: torch.Tensor, slots: int, layer: int) -> None:
    """Assert the slot table [E] and st agree: at most S cached, one expert per slot, locks sane."""
    cached = (table >= 0).nonzero().squeeze(1).tolist()
    assert len(cached) <= slots, f"layer {layer}: {len(cached)} experts cached in {slots} slots"
    assert len({int(table[e]) for e in cached}) == len(cached), f"layer {layer}: two experts share a slot"
    for e in cached:
        assert st.expert_in[int(table[e])] == e, f"layer {layer}: slot table and expert_in disagree"
    for s, e in enumerate(st.expert_in):
        assert e < 0 or int(table[e]) == s, f"layer {layer}: slot {s} holds {e} but the table disagrees"
        assert st.locks[s] >= 0, f"layer {layer}: slot {s} unlocked more often than locked"
        assert st.locks[s] == 0 or e >= 0, f"layer {layer}: locked slot {s} holds no expert"


def totals(per_layer: dict[int, Counters]) -> dict:
    """{counter: sum over layers, hit_rate, per_layer: {layer: {counter: value}}}."""
    per = {i: asdict(n) for i, n in per_layer.items()}
    total = {k: sum(p[k] for p in per.values()) for k in COUNTERS}
    seen = total["hits"] + total["misses"]
    return {**total, "hit_rate": total["hits"] / seen if seen else 0.0, "per_layer": per}
