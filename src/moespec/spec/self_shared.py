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
    N (an int): the N experts the last verifications chose most among those already cached (HotTemporal); a token
      routed outside them takes its top-K inside them (re-routing).
Greedy rows draft the argmax; sampled rows draw from the draft's distribution and return it as q for the rejection
rule. The output equals plain decoding (greedy) or follows the target distribution (sampling) whatever is drafted.
"""
from __future__ import annotations

import torch

from ..sampling import SamplingParams, target_probs
from .drafters import Draft


class SharedSelfDrafter:
    batched = True            # speculative_step calls propose_batch once for all rows
    tree = None               # chains only

    def __init__(self, model, n_experts: int | None = None, shadow=None, kind: str = "cached"):
        """model: the target DecoderLM; shadow: an expert provider of low-bit copies of every expert (kind
        "shadow-int4" / "shadow-int8"), else the draft set is n_experts cached experts per MoE layer."""
        self.model, self.shadow, self.kind = model, shadow, kind
        E = model.cfg.num_experts
        self.E, self.moe_layers = E, list(model.cfg.moe_layer_ids)
        self.n = max(model.cfg.top_k, min(n_experts or E, E))
        self.sets = {}
        if shadow is None:
            for i in self.moe_layers:
                cached = model.experts.cached(i)
                self.sets[i] = (cached if len(cached) else torch.arange(E))[:self.n].clone()

    def plan(self):
        from ..models.decoder import ForwardPlan
        if self.shadow is not None:
            return ForwardPlan(experts=self.shadow)
        masks = {}
        for layer in self.moe_layers:
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
        return ForwardPlan(expert_sets=masks)

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
        finally:
            kv.rollback(fed)
        return [Draft(d, torch.stack(q) if q else None) for d, q in zip(drafts, qs)]

    def observe_verification(self, routing: list[torch.Tensor], keep: torch.Tensor) -> None:
        """HotTemporal: the N experts the verified positions chose most, among the cached ones, draft next."""
        if self.shadow is not None:
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

    def forget(self, key) -> None:
        pass


def shadow_experts(path, cfg, dtype: torch.dtype, method: str):
    """Every expert of every MoE layer quantized (`method` int4 or int8) and resident: the shadow copies."""
    from ..experts.pool import ResidentExperts
    from ..loading import Checkpoint
    from ..loading.build import expert_layout, load_expert_pool
    from ..quant.scheme import QuantConfig
    ck = Checkpoint(path)
    layout = expert_layout(cfg, dtype, quant=QuantConfig(method))
    return ResidentExperts({i: load_expert_pool(ck, cfg, i, layout) for i in cfg.moe_layer_ids}, cfg.num_experts)
