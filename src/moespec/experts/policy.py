"""Eviction policies, routing profiles and cache capacity parsing for the expert cache.

A policy only ranks slots: the cache decides which slots may be evicted at all (not pinned, not
locked by a forward in flight, not being loaded) and asks the policy to pick among those.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from ..errors import MoespecError


class LRU:
    """Evict the slot used longest ago. One "use" = one forward needing the expert in that layer."""

    def __init__(self, slots: int, num_experts: int):
        self.last = [0] * slots
        self.tick = 0

    def used(self, slot: int, expert: int) -> None:
        self.tick += 1
        self.last[slot] = self.tick

    def victim(self, candidates: list[int], expert_in: list[int]) -> int:
        return min(candidates, key=lambda s: self.last[s])


class LFU(LRU):
    """Evict the expert used least often in this run (counts survive eviction, so an expert that is
    popular overall wins its slot back); ties go to the least recently used."""

    def __init__(self, slots: int, num_experts: int):
        super().__init__(slots, num_experts)
        self.freq = [0] * num_experts

    def used(self, slot: int, expert: int) -> None:
        super().used(slot, expert)
        self.freq[expert] += 1

    def victim(self, candidates: list[int], expert_in: list[int]) -> int:
        return min(candidates, key=lambda s: (self.freq[expert_in[s]], self.last[s]))


POLICIES = {"lru": LRU, "lfu": LFU, "static": LRU}   # static: hot set pinned, the spare slots LRU


def hot_set(counts: list[float], slots: int, top_k: int) -> list[int]:
    """The experts a static policy pins: the hottest ones, leaving spare slots for the rest.

    Spare = min(K, S - 1) but at least 1, so a token whose experts are all cold still has room
    (chunking covers the rest). Example: S=4, K=2 -> the 2 hottest pinned, 2 spare slots.
    """
    spare = max(1, min(top_k, slots - 1))
    order = sorted(range(len(counts)), key=lambda e: (-counts[e], e))
    return sorted(order[:max(0, slots - spare)])


# -- routing profiles ------------------------------------------------------------------------------
PROFILE_FORMAT = "moespec-routing-profile"


def profile_from_routing(routing: list, moe_layers: list[int], num_experts: int,
                         into: dict[int, list[float]] | None = None) -> dict[int, list[float]]:
    """Add one forward's routing record (per MoE layer: ids [N, K]) to per-layer expert counts."""
    import torch
    counts = into if into is not None else {layer: [0.0] * num_experts for layer in moe_layers}
    for layer, ids in zip(moe_layers, routing):
        hist = torch.bincount(ids.reshape(-1).cpu(), minlength=num_experts).tolist()
        counts[layer] = [a + b for a, b in zip(counts[layer], hist)]
    return counts


def save_profile(path: str | Path, counts: dict[int, list[float]], num_experts: int) -> None:
    Path(path).write_text(json.dumps({"format": PROFILE_FORMAT, "version": 1, "num_experts": num_experts,
                                      "layers": {str(k): v for k, v in counts.items()}}))


def load_profile(path: str | Path, moe_layers: list[int], num_experts: int) -> dict[int, list[float]]:
    """Expert frequency per MoE layer, checked against the model it is used with."""
    try:
        raw = json.loads(Path(path).read_text())
        layers = {int(k): [float(x) for x in v] for k, v in raw["layers"].items()}
    except OSError as e:
        raise MoespecError(f"cannot read routing profile {path}: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise MoespecError(f"{path} is not a moespec routing profile: {e}") from None
    if raw.get("format") != PROFILE_FORMAT or raw.get("num_experts") != num_experts:
        raise MoespecError(f"routing profile {path} is not for this model "
                           f"(format {raw.get('format')!r}, {raw.get('num_experts')} experts; model has {num_experts})")
    missing = [layer for layer in moe_layers if len(layers.get(layer, ())) != num_experts]
    if missing:
        raise MoespecError(f"routing profile {path} has no counts of {num_experts} experts for MoE layer {missing[0]}")
    return layers


# -- capacity ----------------------------------------------------------------------------------------
def parse_capacity(spec: str | int | None, num_experts: int, moe_layers: int, slot_bytes: int) -> int:
    """Slots per MoE layer for `--expert-cache`: None = all experts; "6" or 6 experts; "25%" of the
    experts (rounded down, at least 1); "2GiB" / "512MB" split evenly across MoE layers.

    Example: E=8, 4 MoE layers, 1 MiB slots: "25%" -> 2; "12MiB" -> 3; "100" -> 8 (capped at E). Byte sizes read
    as everywhere else (perf/units.parse_size): MB / GB are powers of 1000, MiB / GiB and a bare M / G of 1024.
    """
    if spec is None:
        return num_experts
    s = str(spec).strip().lower()
    if re.fullmatch(r"\d+", s):
        n = int(s)
    elif m := re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", s):
        n = math.floor(num_experts * float(m.group(1)) / 100 + 1e-9)
        n = max(n, 1) if float(m.group(1)) > 0 else 0
    elif m := re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", s):
        if m.group(2) == "":
            raise MoespecError(f"expert cache size {spec!r} must be a whole number of experts per layer")
        from ..perf.errors import PerfError
        from ..perf.units import parse_size        # one reading of sizes for every flag (--memory, plan, ...)
        try:
            total = parse_size(s, "expert cache size")
        except PerfError:
            raise MoespecError(f"expert cache size {spec!r}: unknown unit {m.group(2)!r} "
                               "(use experts per layer, a percentage, or bytes like 512MB / 2GiB)") from None
        n = int(total // max(1, moe_layers) // slot_bytes)
        if n < 1:
            raise MoespecError(f"expert cache of {spec} holds less than one expert per MoE layer "
                               f"(an expert is {slot_bytes / 2**20:.2f} MiB, {moe_layers} MoE layers)")
    else:
        raise MoespecError(f"expert cache size {spec!r} is not N, N% or a byte size like 2GiB")
    if n < 1:
        raise MoespecError(f"expert cache size {spec!r} gives no slots; it needs at least one expert per layer")
    return min(n, num_experts)
