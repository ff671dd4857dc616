"""The drafter a SpecConfig asks for, built against the loaded target (and its expert cache when offloaded)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import MoespecError
from .drafters import DraftModelDrafter, Drafter, NgramDrafter, SelfDrafter
from .prefetch import DraftPrefetch


@dataclass
class Drafters(Drafter):
    """Several drafters for `--spec auto`: the controller (perf/chooser.py) names the one each step uses."""
    members: dict

    def forget(self, key) -> None:
        for d in self.members.values():
            d.forget(key)

    def parts(self) -> list[Drafter]:
        return list(self.members.values())


def make_drafter(spec, model, path, offload, tokenizer, capacity: int, dtype: str, device: str):
    """spec: a validated SpecConfig; capacity: the longest sequence a drafter with its own KV must hold."""
    if spec.method == "ngram":
        return NgramDrafter(spec.prompt_lookup_max, spec.prompt_lookup_min)
    if spec.method == "self":
        return self_drafter(spec, model, path, offload, capacity)
    if spec.method == "draft_model":
        return draft_model_drafter(spec, model, offload, tokenizer, capacity, dtype, device)
    members = {}                                     # "auto": every drafter that applies, the likeliest first
    if model.cfg.is_moe:                             # the self drafter with shadow copies, and with cached experts
        from dataclasses import replace
        if spec.shadow:
            members["shadow"] = self_drafter(spec, model, path, offload, capacity)
        members["self"] = self_drafter(replace(spec, draft_experts=None) if spec.shadow else spec, model, path,
                                       offload, capacity)
    if spec.model:
        members["draft_model"] = draft_model_drafter(spec, model, offload, tokenizer, capacity, dtype, device)
    members["ngram"] = NgramDrafter(spec.prompt_lookup_max, spec.prompt_lookup_min)
    return Drafters(members)


def _prefetcher(model, offload):
    """Draft-guided prefetch (spec_decode/prefetch.py) when the offload config asks for it, else None."""
    if offload is None or offload.prefetch != "draft":
        return None
    cut = offload.prefetch_cutoff
    return DraftPrefetch(model.experts, model.cfg.moe_layer_ids, None if cut == "auto" else int(cut))


def self_drafter(spec, model, path, offload, capacity: int):
    cfg = model.cfg
    if not cfg.is_moe:
        raise MoespecError("the self drafter needs an MoE model (it drafts with fewer experts)")
    E = cfg.num_experts
    prefetch = _prefetcher(model, offload)
    if shared_kv(spec):          # SpecMoE as published: the target's KV, all rows in one forward per position
        from .self_shared import SharedSelfDrafter, shadow_experts
        if spec.shadow:
            return SharedSelfDrafter(model, shadow=shadow_experts(path, cfg, model.dtype, spec.shadow),
                                     kind=spec.draft_experts, prefetcher=prefetch)
        # With prefetch, the slots outside the draft set take its loads: by default half the cache drafts.
        n = spec.draft_experts or (max(1, model.experts.S // 2) if prefetch is not None else
                                   model.experts.S if offload is not None else E // 2)
        profile = None
        if spec.draft_profile is not None:
            from ..experts.policy import load_profile
            profile = load_profile(spec.draft_profile, cfg.moe_layer_ids, E)
        return SharedSelfDrafter(model, n, refresh=spec.draft_refresh, profile=profile, pin=spec.draft_pin,
                                 prefetcher=prefetch)
    if spec.draft_refresh != "hot-temporal" or spec.draft_pin:
        raise MoespecError("draft_refresh and draft_pin shape the shared-KV self drafter: drop draft_kv 'own' and "
                           "what needs it")
    n = spec.draft_experts or (model.experts.S if offload is not None else E // 2)
    if prefetch is not None:     # prefetch fills the slots outside the draft set: half the cache drafts
        n = spec.draft_experts or max(1, model.experts.S // 2)
    if spec.draft_top_k is not None and spec.draft_top_k > cfg.top_k:
        raise MoespecError(f"draft_top_k={spec.draft_top_k} exceeds the model's experts per token ({cfg.top_k}); "
                           "drafting with fewer is what makes it cheaper")
    if spec.draft_layers is not None and spec.draft_layers > cfg.num_layers:
        raise MoespecError(f"draft_layers={spec.draft_layers} exceeds the model's {cfg.num_layers} layers")
    return SelfDrafter(model, n, capacity=capacity, prefetcher=prefetch, top_k=spec.draft_top_k,
                       layers=spec.draft_layers, routing=spec.draft_routing)


def shared_kv(spec) -> bool:
    """Whether the self drafter drafts on the target's KV (spec_decode/self_shared.py): draft_kv "shared", or "auto" when
    nothing asks for the own-KV drafter's extras (trees, substitution, fewer experts per token or fewer layers)."""
    s = spec
    extras = [name for name, on in (("a draft tree", s.tree is not None),
                                    ("draft_routing 'substitute'", s.draft_routing != "reroute"),
                                    ("draft_top_k", s.draft_top_k is not None),
                                    ("draft_layers", s.draft_layers is not None)) if on]
    if s.draft_kv == "own" or (s.draft_kv == "auto" and extras and not s.shadow):
        if s.shadow:
            raise MoespecError("shadow draft experts draft on the target's KV cache: drop draft_kv 'own'")
        return False
    if extras:
        raise MoespecError(f"the shared-KV self drafter (draft_kv 'shared'{', shadow experts' if s.shadow else ''}) "
                           f"drafts chains with the router's picks; it does not combine with {', '.join(extras)}")
    return True


def draft_model_drafter(spec, model, offload, tokenizer, capacity: int, dtype: str, device: str):
    from ..loading.model import load_model
    draft = load_model(spec.model, dtype, device)
    if draft.cfg.vocab_size != model.cfg.vocab_size:
        raise MoespecError(f"draft model {spec.model} has vocabulary size {draft.cfg.vocab_size}, the target "
                           f"{model.cfg.vocab_size}: a draft model must share the target's tokenizer")
    drafter = DraftModelDrafter(draft, capacity=capacity)
    prefetch = _prefetcher(model, offload)
    if prefetch is not None:                        # SP-MoE with a draft model
        if spec.tree is not None:
            raise MoespecError("draft-guided prefetch from a draft model drafts chains: drop the tree")
        from .router_proj import projection_for
        drafter.prefetcher, drafter.projection = prefetch, projection_for(model, draft, spec.model, tokenizer)
    return drafter
