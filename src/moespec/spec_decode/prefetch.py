"""Draft-guided prefetch (SP-MoE): the draft's router picks say which experts verification will need.

While the self drafter runs the target with its draft expert set, every MoE layer's router still
scores the draft token over all E experts. Those top-K picks are what verification will route the
same token to (its hidden state differs only by the substitutions made at earlier layers), so once
a draft forward has finished layer i, the picks not cached are queued to the background loader for
layer i: they load while drafting goes on, and verification finds them resident.

Only MoE layers before a cutoff are prefetched: a prefetch helps only if it lands before verification
reaches its layer, and every one takes a slot. The automatic cutoff is the largest L with
L * m * t_load <= T_draft (m: experts per layer per step the draft predicts that were not cached,
t_load: measured seconds per expert read, T_draft: measured drafting seconds per step; moving averages)
and whose layers' predictions fit in their free slots (m_l <= slots - draft set, per MoE layer l): past
that, prefetches push out experts verification was going to hit (on the reference model with a small
cache, deeper cutoffs cut the stall but not TPOT, and the time rule alone chose a cutoff measurably slower
than the best one).

Predictor quality is measured against what verification really routed: per layer, recall = |P & U| / |U|
and precision = |P & U| / |P| (P: experts predicted this step, U: experts the verification forward used).
"""
from __future__ import annotations

import torch


class DraftPrefetch:
    """Owned by the engine; the drafter feeds it routing (observe), the speculative step brackets each
    step (begin_step / end_step)."""

    def __init__(self, cache, moe_layers: list[int], cutoff: int | None = None, smoothing: float = 0.3):
        self.cache = cache
        self.rank = {layer: r for r, layer in enumerate(sorted(moe_layers))}   # cutoff counts MoE layers
        self.auto = cutoff is None
        self.cutoff = len(moe_layers) if cutoff is None else max(0, min(int(cutoff), len(moe_layers)))
        self.alpha = smoothing
        self.predicted: dict[int, list[int]] = {layer: [] for layer in self.rank}
        self.protect: dict[int, set[int]] = {layer: set() for layer in self.rank}
        self.uncached_in = {layer: 0 for layer in self.rank}   # predicted experts not cached when predicted,
                                                               # this step, per MoE layer
        self.free = {layer: cache.S for layer in self.rank}           # slots outside the draft set
        self.m: float | None = None            # moving averages used by the automatic cutoff
        self.m_layer: dict[int, float] = {}
        self.t_draft: float | None = None
        self.n = {layer: {"tp": 0, "predicted": 0, "used": 0} for layer in self.rank}
        self.steps = 0
        self.queued = 0                        # prefetch loads this object queued

    def begin_step(self) -> None:
        for layer in self.rank:
            self.predicted[layer] = []
            self.protect[layer] = set()
            self.uncached_in[layer] = 0

    def observe(self, layer: int, picks: list[int], keep: torch.Tensor | None = None) -> None:
        """picks: experts verification will likely need in this layer, best first (the router's top-K
        for the token being drafted); keep: experts prefetch must not evict (the drafter's set, so
        drafting stays free of I/O)."""
        if keep is not None:
            self.protect[layer].update(keep.reshape(-1).tolist())
            self.free[layer] = self.cache.S - len(self.protect[layer])
        new = [e for e in picks if e not in self.predicted[layer]]
        if not new:
            return
        table = self.cache.slot_of[layer]
        # This step's earlier predictions that are cached (or loading) stay: with a small cache a later draft
        # token's picks would otherwise evict them before verification uses them.
        earlier = {e for e in self.predicted[layer] if int(table[e]) >= 0}
        self.predicted[layer].extend(new)
        self.uncached_in[layer] += sum(1 for e in new if int(table[e]) < 0)
        if self.rank[layer] < self.cutoff:
            self.queued += self.cache.prefetch(layer, new, self.protect[layer] | earlier)

    def end_step(self, verify_routing: list[torch.Tensor], draft_s: float) -> None:
        """verify_routing: per MoE layer (in order) the ids [N, K] verification routed."""
        for layer, ids in zip(sorted(self.rank), verify_routing):
            used = set(torch.unique(ids).tolist())
            pred = set(self.predicted[layer])
            c = self.n[layer]
            c["tp"] += len(pred & used)
            c["predicted"] += len(pred)
            c["used"] += len(used)
        self.steps += 1
        m = sum(self.uncached_in.values()) / max(1, len(self.rank))
        a = self.alpha
        self.m = m if self.m is None else (1 - a) * self.m + a * m
        self.t_draft = draft_s if self.t_draft is None else (1 - a) * self.t_draft + a * draft_s
        for layer, u in self.uncached_in.items():
            self.m_layer[layer] = u if layer not in self.m_layer else (1 - a) * self.m_layer[layer] + a * u
        if self.auto:
            fits = [self.m_layer[layer] <= self.free[layer] for layer in sorted(self.rank)]
            self.cutoff = auto_cutoff(len(self.rank), self.m, self.cache.loader.seconds_per_expert(), self.t_draft,
                                      fits)

    def stats(self) -> dict:
        tp = sum(c["tp"] for c in self.n.values())
        pred = sum(c["predicted"] for c in self.n.values())
        used = sum(c["used"] for c in self.n.values())
        return {"prefetch_cutoff": self.cutoff, "prefetch_cutoff_auto": self.auto,
                "predictor_recall": tp / used if used else 0.0,
                "predictor_precision": tp / pred if pred else 0.0,
                "predictor_per_layer": {layer: {"recall": c["tp"] / c["used"] if c["used"] else 0.0,
                                                "precision": c["tp"] / c["predicted"] if c["predicted"] else 0.0}
                                        for layer, c in self.n.items()}}


def auto_cutoff(layers: int, m: float | None, t_load: float | None, t_draft: float | None,
                fits: list[bool] | None = None) -> int:
    """Largest L <= layers with L * m * t_load <= t_draft and fits[l] for every MoE layer l < L (its predicted
    misses fit its free slots); every layer while a figure is unknown.

    >>> auto_cutoff(6, 2.0, 0.001, 0.0045)
    2
    >>> auto_cutoff(6, 2.0, 0.001, 1.0, [True, True, False, True, True, True])
    2
    """
    if fits is not None and not all(fits):
        layers = min(layers, fits.index(False))
    if m is None or t_load is None or t_draft is None or m * t_load <= 0:
        return layers
    return max(0, min(layers, int(t_draft / (m * t_load))))
