"""Self-drafting as SpecMoE publishes it: the target drafts on its own KV cache, all rows in one forward per draft
position, with experts that cost no I/O.

Shapes: R rows (live sequences), k draft length, V vocabulary.

- Shared KV: the committed tokens' keys and values are the target's own (written by verification); a draft
  forward writes its position's entries past the committed length, uncommitted, and the verification forward
  overwrites them. No draft prefill, no second cache, and the draft never drifts over the context: only the k
  draft positions are computed with the draft's experts.
- Batched: every row drafts in the same forward, one per draft position (cost grows with k, not with R x k).
- The draft's experts, per MoE layer:
    "shadow": a low-bit copy (int4 or int8, quant/) of every expert, held in memory for drafting only. The draft
      uses the router's own picks through these copies and reads nothing from the slow tier; verification at
      full precision keeps the output exact.
    N (an int): N experts per layer among those already cached, chosen by SpecMoE's refresh policies (the ones
      the last verification chose most: HotTemporal, the default; the hottest of a routing profile, pinned:
      HotGlobal; a random draw each step: Random); a token routed outside them takes its top-K inside them
      (re-routing).
- Draft-guided prefetch (SP-MoE, spec_decode/prefetch.py) combines with either: the router's picks of each draft
  position are loaded for verification while drafting goes on (never evicting the draft set).
Greedy rows draft the argmax; sampled rows draw from the draft's distribution and return it as q for the rejection
rule. The output equals plain decoding (greedy) or follows the target distribution (sampling) whatever is drafted.
"""
from __future__ import annotations

import torch

from ..sampling import SamplingParams, target_probs
from .drafters import Draft, Drafter


class SharedSelfDrafter(Drafter):
    batched = True            # speculative_step calls propose_batch once for all rows
    tree = None               # chains only

    def __init__(self, model, n_experts: int | None = None, shadow=None, kind: str = "cached",
                 refresh: str = "hot-temporal", profile: dict[int, list[float]] | None = None, pin: bool = False,
                 prefetcher=None, seed: int = 0):
        """model: the target DecoderLM; shadow: an expert provider of low-bit copies of every expert (kind
        "shadow-int4" / "shadow-int8"), else the draft set is n_experts cached experts per MoE layer, chosen by
        `refresh` (SpecMoE's three policies):
            "hot-temporal": after each verification, the N experts it routed to most (among the cached ones);
            "hot-global": the N experts a routing profile (`profile`, per MoE layer counts) ranks hottest, fixed
                and pinned in the cache (loaded once when missing);
            "random": N cached experts drawn at random each step (seeded: reproducible).
        pin: keep the draft set in the cache (ExpertCache.pin) from one refresh to the next, so verification's
            loads cannot evict it (at most slots - 1 experts: one slot stays free for the others).
        prefetcher: draft-guided prefetch (spec_decode/prefetch.py): each draft forward hands it the router's picks of
            every row, layer by layer, and the cache loads them for verification while drafting goes on."""
        self.model, self.shadow, self.kind = model, shadow, kind
        self.refresh, self.prefetcher = refresh, prefetcher
        E = model.cfg.num_experts
        self.E, self.moe_layers = E, list(model.cfg.moe_layer_ids)
        self.n = max(model.cfg.top_k, min(n_experts or E, E))
        cache = model.experts
        self.pin = (pin or refresh == "hot-global") and shadow is None and hasattr(cache, "pin")
        if self.pin:                           # one slot stays free for everything else (ExpertCache.pin)
            self.n = max(1, min(self.n, cache.S - 1))
        self.gen = torch.Generator().manual_seed(seed)
        self.sets: dict[int, torch.Tensor] = {}
        self.pinned: dict[int, list[int]] = {}
        if shadow is not None:
            return
        for i in self.moe_layers:
            if refresh == "hot-global":
                counts = torch.tensor(profile[i], dtype=torch.float64)
                # Ties by expert id, as the static cache policy breaks them (experts/policy.hot_set).
                self.sets[i] = torch.tensor(sorted(sorted(range(E), key=lambda e: (-counts[e], e))[:self.n]))
            else:
                cached = cache.cached(i)
                self.sets[i] = (cached if len(cached) else torch.arange(E))[:self.n].clone()
            self._pin(i)

    def _pin(self, layer: int) -> None:
        if not self.pin:
            return
        new = self.sets[layer].tolist()
        old = [e for e in self.pinned.get(layer, []) if e not in new]
        if old:
            self.model.experts.unpin(layer, old)
        self.model.experts.pin(layer, new)
        self.pinned[layer] = new

    def plan(self):
        from ..models.decoder import ForwardPlan
        after = self._after_moe if self.prefetcher is not None else None
        if self.shadow is not None:
            return ForwardPlan(experts=self.shadow, after_moe=after)
        masks = {}
        for layer in self.moe_layers:
            if self.refresh == "random":
                self._draw(layer)
            cached = self.model.experts.cached(layer)       # no read starts while drafting (in-flight loads count)
            base = self.sets[layer]
            keep = base[torch.isin(base, cached)]
            if len(keep) < len(base) and cached.numel():      # evicted meanwhile: cached experts take their place
                fill = cached[~torch.isin(cached, keep)][:len(base) - len(keep)]
                keep = torch.cat([keep, fill])
            self.sets[layer] = keep.sort().values
            mask = torch.zeros(self.E, dtype=torch.bool)
            mask[self.sets[layer]] = True
            masks[layer] = mask
        return ForwardPlan(expert_sets=masks, after_moe=after)

    def _draw(self, layer: int) -> None:
        cached = self.model.experts.cached(layer)
        if cached.numel():
            pick = torch.randperm(cached.numel(), generator=self.gen)[:self.n]
            self.sets[layer] = cached[pick].sort().values
            self._pin(layer)

    def _after_moe(self, layer: int, routed: torch.Tensor) -> None:
        # routed [R, K]: every row's draft token; rank by rank, so each row's first choice is queued first.
        keep = self.sets.get(layer) if self.shadow is None else None
        self.prefetcher.observe(layer, routed.T.reshape(-1).tolist(), keep)

    @torch.inference_mode()
    def propose_batch(self, kv, pending: torch.Tensor, params: list[SamplingParams], gens: list, k: int
                      ) -> list[Draft]:
        """pending [R]: each row's last emitted token (not in the KV yet). Drafts k tokens per row on the target's
        cache, then rolls the cache back to where it was (the verification forward overwrites the entries)."""
        R = pending.shape[0]
        toks = pending[:, None]
        drafts: list[list[int]] = [[] for _ in range(R)]
        qs: list[list[torch.Tensor]] = [[] for _ in range(R)]
        fed = 0
        plan = self.plan()
        try:
            for _ in range(k):
                if max(kv.lens) + 1 > kv.capacity:
                    break
                logits = self.model.forward(toks, kv, plan=plan).logits[:, -1]         # [R, V]
                kv.advance(1)
                fed += 1
                nxt = logits.argmax(-1)
                for r, p in enumerate(params):
                    if not p.is_greedy:
                        q = target_probs(logits[r], p.temperature, p.top_k, p.top_p)
                        nxt[r] = torch.multinomial(q, 1, generator=gens[r])[0]
                        qs[r].append(q)
                for r, t in enumerate(nxt.tolist()):
                    drafts[r].append(t)
                toks = nxt[:, None]
            if self.prefetcher is not None and drafts[0] and max(kv.lens) + 1 <= kv.capacity:
                # Verification also routes the last draft token: one more forward, for its router picks only.
                self.model.forward(toks, kv, plan=plan)
                kv.advance(1)
                fed += 1
        finally:
            kv.rollback(fed)
        return [Draft(d, torch.stack(q) if q else None) for d, q in zip(drafts, qs)]

    def observe_verification(self, routing: list[torch.Tensor], keep: torch.Tensor) -> None:
        """HotTemporal: the N experts the verified positions chose most, among the cached ones, draft next."""
        if self.shadow is not None or self.refresh != "hot-temporal":
            return
        for layer, ids in zip(self.moe_layers, routing):
            counts = torch.bincount(ids[keep].reshape(-1), minlength=self.E).float()
            cached = self.model.experts.cached(layer)
            if not cached.numel():
                continue
            counts[cached] += 0.5                               # ties (and unseen experts) go to cached ones
            usable = torch.zeros(self.E, dtype=torch.bool)
            usable[cached] = True
            counts[~usable] = -1
            self.sets[layer] = torch.topk(counts, min(self.n, int(usable.sum()))).indices.sort().values
            self._pin(layer)

    def forget(self, key) -> None:
        pass

    def close(self) -> None:
        """Unpin the draft sets (the cache outlives a drafter replaced by another)."""
        for layer, experts in self.pinned.items():
            self.model.experts.unpin(layer, experts)
        self.pinned = {}


def shadow_experts(path, cfg, dtype: torch.dtype, method: str):
    """Every expert of every MoE layer quantized (`method` int4 or int8) and resident: the shadow copies."""
    from ..experts.pool import ResidentExperts
    from ..loading import Checkpoint
    from ..loading.build import expert_layout, load_expert_pool
    from ..quant.scheme import QuantConfig
    ck = Checkpoint(path)
    layout = expert_layout(cfg, dtype, quant=QuantConfig(method))
    return ResidentExperts({i: load_expert_pool(ck, cfg, i, layout) for i in cfg.moe_layer_ids}, cfg.num_experts)
