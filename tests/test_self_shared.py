"""Self-drafting on the target's KV (SpecMoE as published) and shadow experts: exact output, no I/O while drafting,
no second cache, and the acceptance the shared KV and the shadow copies buy on the bundled model."""
import pytest
import torch

from moespec import LLM, MoespecError, SamplingParams
from moespec.assets import REFERENCE_MODEL
from moespec.config import OffloadConfig
from moespec.spec_config import SpecConfig
from moespec.spec_decode.self_shared import SharedSelfDrafter

PROMPTS = ["def add(a, b):\n    return", "import os\n\ndef list_files(path):", "class Stack:\n    def push(self, x):",
           "def fibonacci(n):"]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)


def tokens(llm, prompts):
    return [o.token_ids for o in llm.generate(prompts, GREEDY)]


@pytest.fixture(scope="module")
def plain():
    llm = LLM(REFERENCE_MODEL, dtype="float32")
    return tokens(llm, PROMPTS), [tokens(llm, [p])[0] for p in PROMPTS]


@pytest.mark.parametrize("experts", ["shadow-int4", "shadow-int8", 8, None])
@pytest.mark.parametrize("offloaded", [False, True])
def test_shared_kv_self_drafting_equals_plain_decoding(experts, offloaded, plain, tmp_path):
    batch, single = plain
    off = OffloadConfig(expert_cache="25%", offload="disk", offload_dir=str(tmp_path)) if offloaded else None
    spec = {"method": "self", "num_speculative_tokens": 4, **({"draft_experts": experts} if experts else {})}
    llm = LLM(REFERENCE_MODEL, dtype="float32", offload=off, speculative=spec)
    assert isinstance(llm.drafter, SharedSelfDrafter) and (llm.drafter.shadow is not None) == isinstance(experts, str)
    outs = llm.generate(PROMPTS, GREEDY)                                     # batch 4
    assert [o.token_ids for o in outs] == batch and outs[0].stats["draft_kv"] == "shared"
    if isinstance(experts, str):   # low-bit copies draft nearly perfectly (measured 0.94 int4, 1.0 int8 here)
        assert outs[0].stats["acceptance_rate"] >= (0.85 if experts == "shadow-int4" else 0.95), outs[0].stats
    assert [tokens(llm, [p])[0] for p in PROMPTS[:2]] == single[:2]          # batch 1
    llm.close()


def test_drafting_reads_nothing_and_leaves_the_cache_where_it_was(tmp_path):
    off = OffloadConfig(expert_cache=4, offload="disk", offload_dir=str(tmp_path))
    for experts in ("shadow-int4", None):
        llm = LLM(REFERENCE_MODEL, dtype="float32", offload=off,
                  speculative={"method": "self", "num_speculative_tokens": 4,
                               **({"draft_experts": experts} if experts else {})})
        ids = llm.encode(PROMPTS[1])
        kv = llm.model.new_cache(1, len(ids) + 16)
        llm.model.forward(torch.tensor([ids[:-1]]), kv)
        kv.advance(len(ids) - 1)
        before = llm.expert_stats()["bytes_read"]
        k_before = kv.k.clone()
        params = [SamplingParams(temperature=0).with_defaults({})]
        drafts = llm.drafter.propose_batch(kv, torch.tensor([ids[-1]]), params, [None], 4)
        assert llm.expert_stats()["bytes_read"] == before                 # not one byte from the slow tier
        assert kv.lens == [len(ids) - 1] and len(drafts[0].tokens) == 4
        # only the 4 scratch positions past the committed length were written (verification overwrites them)
        n = len(ids) - 1
        assert torch.equal(kv.k[:, :, :, :n], k_before[:, :, :, :n])
        assert not torch.equal(kv.k[:, :, :, n:n + 4], k_before[:, :, :, n:n + 4])
        llm.close()


def test_shared_kv_beats_own_kv_acceptance_on_the_bundled_model(tmp_path):
    """The draft attends to the target's KV instead of a copy built with the draft set: on the bundled model
    (8 of 16 experts, HumanEval-like prompts) it accepts more of the same drafts' kind."""
    acc = {}
    for kv in ("shared", "own"):
        llm = LLM(REFERENCE_MODEL, dtype="float32",
                  speculative={"method": "self", "num_speculative_tokens": 3, "draft_experts": 8, "draft_kv": kv})
        outs = llm.generate(PROMPTS, SamplingParams(max_new_tokens=48, temperature=0, ignore_eos=True))
        acc[kv] = sum(o.stats["accepted_tokens"] for o in outs[:1]) / sum(o.stats["draft_tokens"] for o in outs[:1])
    assert acc["shared"] > acc["own"], acc


@pytest.mark.parametrize("spec, message", [
    ({"draft_experts": "shadow-int2"}, "draft_experts='shadow-int2' must be a number of experts or one of"),
    ({"method": "ngram", "draft_experts": "shadow-int4"}, "shadow draft experts are the self drafter's"),
    ({"method": "ngram", "draft_kv": "shared"}, "draft_kv chooses the self drafter's KV cache"),
    ({"draft_kv": "both"}, "draft_kv='both' is not one of: auto, shared, own"),
])
def test_bad_self_drafting_settings(spec, message):
    with pytest.raises(MoespecError, match=message):
        SpecConfig.from_dict({"method": "self", **spec})


def test_shadow_experts_do_not_combine_with_own_kv_extras():
    with pytest.raises(MoespecError, match="does not combine with a draft tree"):
        LLM(REFERENCE_MODEL, speculative={"method": "self", "draft_experts": "shadow-int4", "tree": "2,1"})
    with pytest.raises(MoespecError, match="drop draft_kv 'own'"):
        LLM(REFERENCE_MODEL, speculative={"method": "self", "draft_experts": "shadow-int4", "draft_kv": "own"})


def _profile(tmp_path, hot: list[int]) -> str:
    """A routing profile where `hot` are the most used experts of every MoE layer (the rest by id)."""
    from moespec.experts.policy import save_profile
    llm_cfg = LLM(REFERENCE_MODEL).config
    counts = {layer: [100.0 if e in hot else float(16 - e) for e in range(16)] for layer in llm_cfg.moe_layer_ids}
    path = tmp_path / "profile.json"
    save_profile(path, counts, 16)
    return str(path)


@pytest.mark.parametrize("extra", [{"draft_refresh": "random"}, {"draft_refresh": "hot-global"},
                                   {"draft_pin": True}, {"draft_experts": "shadow-int8", "prefetch": True},
                                   {"prefetch": True}])
@pytest.mark.slow
def test_refresh_policies_pinning_and_draft_prefetch_equal_plain_decoding(extra, plain, tmp_path):
    batch, single = plain
    extra = dict(extra)
    prefetch = "draft" if extra.pop("prefetch", False) else "none"
    if extra.get("draft_refresh") == "hot-global":
        extra["draft_profile"] = _profile(tmp_path, [3, 7, 11])
    off = OffloadConfig(expert_cache=4, offload="disk", offload_dir=str(tmp_path / "off"), prefetch=prefetch,
                        prefetch_cutoff=6)
    llm = LLM(REFERENCE_MODEL, dtype="float32", offload=off,
              speculative={"method": "self", "num_speculative_tokens": 3, **extra})
    assert isinstance(llm.drafter, SharedSelfDrafter)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == batch
    assert [tokens(llm, [p])[0] for p in PROMPTS[:2]] == single[:2]
    cache = llm.model.experts
    for layer in llm.config.moe_layer_ids:
        st = cache._st[layer]
        if extra.get("draft_refresh") == "hot-global":     # the profile's 3 hottest, pinned, all the way through
            assert llm.drafter.sets[layer].tolist() == [3, 7, 11] and st.pinned == {3, 7, 11}
        elif extra.get("draft_pin"):                        # the current draft set and nothing else is pinned
            assert st.pinned == set(llm.drafter.sets[layer].tolist()) and len(st.pinned) == 3
        else:
            assert not st.pinned
    if prefetch == "draft":
        s = outs[0].stats
        assert s["prefetch_issued"] > 0 and s["prefetch_used"] > 0, s
        if "draft_experts" in extra:    # the shadow draft routes as verification will: its picks are the experts used
            assert s["predictor_recall"] >= 0.9, s
    llm.drafter.close()
    assert all(not cache._st[layer].pinned for layer in llm.config.moe_layer_ids)
    llm.close()


def test_random_refresh_is_seeded_and_draws_among_cached_experts(tmp_path):
    off = OffloadConfig(expert_cache=6, offload="disk", offload_dir=str(tmp_path))
    llm = LLM(REFERENCE_MODEL, dtype="float32", offload=off,
              speculative={"method": "self", "draft_experts": 3, "draft_refresh": "random"})
    llm.generate(PROMPTS[0], GREEDY)
    draws = []
    for seed in (0, 0, 1):
        d = SharedSelfDrafter(llm.model, 3, refresh="random", seed=seed)
        plans = [d.plan() for _ in range(2)]           # a new draw each step
        draws.append([[p.expert_sets[layer].nonzero().reshape(-1).tolist() for layer in d.moe_layers]
                      for p in plans])
    assert draws[0] == draws[1] != draws[2] and draws[0][0] != draws[0][1]
    for step in draws[0]:
        for layer, s in zip(llm.config.moe_layer_ids, step):
            assert len(s) == 3 and set(s) <= set(llm.model.experts.cached(layer).tolist())
    llm.close()


def test_hot_temporal_refresh_takes_what_verification_routed_to_most_among_cached():
    llm = LLM(REFERENCE_MODEL, dtype="float32", speculative={"method": "self", "draft_experts": 3})
    d = llm.drafter
    layers = d.moe_layers
    # Verified positions routed to 5 (three times), 9 (twice), 2 (once); a rejected position to 14 (ignored).
    ids = torch.tensor([[5, 9], [5, 9], [5, 2], [14, 14]])
    d.observe_verification([ids] * len(layers), torch.tensor([True, True, True, False]))
    assert all(d.sets[layer].tolist() == [2, 5, 9] for layer in layers)


@pytest.mark.parametrize("spec, message", [
    ({"draft_refresh": "coldest"}, "draft_refresh='coldest' is not one of: hot-temporal, hot-global, random"),
    ({"draft_refresh": "hot-global"}, "give draft_profile"),
    ({"draft_profile": "p.json"}, "draft_profile is what draft_refresh 'hot-global' ranks experts by"),
    ({"draft_experts": "shadow-int4", "draft_pin": True}, "without shadow experts"),
])
def test_bad_refresh_settings(spec, message):
    with pytest.raises(MoespecError, match=message):
        SpecConfig.from_dict({"method": "self", **spec})


def test_draft_model_guided_prefetch_equals_plain_and_predicts_the_experts(plain, tmp_path):
    """SP-MoE with the bundled draft model: its hidden states through the shipped router projection guess the
    target's experts; the cache loads them for verification. Output unchanged; most guesses are used."""
    from moespec.assets import REFERENCE_DRAFT
    from moespec.spec_decode.router_proj import FILE, load_projection
    batch, single = plain
    # cutoff: every layer (the automatic one follows measured times, and may choose none on a fast disk)
    off = OffloadConfig(expert_cache=4, offload="disk", offload_dir=str(tmp_path), prefetch="auto", prefetch_cutoff=6)
    llm = LLM(REFERENCE_MODEL, dtype="float32", offload=off,
              speculative={"method": "draft_model", "model": str(REFERENCE_DRAFT), "num_speculative_tokens": 3})
    assert llm.drafter.projection is not None and llm.offload.prefetch == "draft"
    shipped = load_projection(REFERENCE_DRAFT / FILE, llm.model, llm.drafter.model)
    assert shipped is not None and shipped.meta["held_out_topk_recall"] > 0.5     # random guesses: 2/16
    outs = [llm.generate(p, GREEDY)[0] for p in PROMPTS[:2]]
    assert [o.token_ids for o in outs] == single[:2]
    s = outs[-1].stats
    assert s["prefetch_issued"] > 0 and s["prefetch_used"] > 0 and s["predictor_recall"] > 0.5, s
    llm.close()


def test_a_projection_for_other_routers_is_refitted_and_cached(tmp_path, monkeypatch):
    """A draft folder's projection fitted for another target is not used: one is fitted for this pair (once)
    and found in the cache the next time."""
    from moespec.assets import REFERENCE_DRAFT
    from moespec.loading import load_model
    from moespec.spec_decode import router_proj
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    target, draft = load_model(REFERENCE_MODEL, "float32"), load_model(REFERENCE_DRAFT, "float32")
    layer = target.cfg.moe_layer_ids[0]
    target.w.layers[layer].moe.router = target.w.layers[layer].moe.router.flip(0)      # other routers
    assert router_proj.load_projection(REFERENCE_DRAFT / router_proj.FILE, target, draft) is None
    small = router_proj.corpus(None, target.cfg.vocab_size, 2048, 128)          # a quick fit on random ids
    monkeypatch.setattr(router_proj, "corpus", lambda tok, vocab: small)
    p = router_proj.projection_for(target, draft, REFERENCE_DRAFT)
    files = list((tmp_path / "moespec" / "router-projection").glob("*.safetensors"))
    assert len(files) == 1 and p.meta["target_routers"] == router_proj.router_signature(target)
    monkeypatch.setattr(router_proj, "fit_projection", lambda *a, **k: pytest.fail("fitted twice"))
    again = router_proj.projection_for(target, draft, REFERENCE_DRAFT)
    assert all(torch.equal(again.w[i], p.w[i]) for i in p.w)


def test_the_substitution_table_sends_each_expert_to_its_nearest_draft_expert():
    """The own-KV drafter's `substitute` routing: draft-set experts map to themselves, every other expert to the
    draft-set expert nearest to it by weight distance."""
    llm = LLM(REFERENCE_MODEL, dtype="float32",
              speculative={"method": "self", "draft_experts": 4, "draft_routing": "substitute"})
    d = llm.drafter
    for layer in d.moe_layers:
        allowed = d.sets[layer]
        table = d.plan().expert_map[layer]
        dist = d.dist[layer]
        assert dist.shape == (16, 16) and torch.allclose(dist, dist.T) and torch.all(dist.diagonal() == 0)
        for e in range(16):
            if e in allowed.tolist():
                assert int(table[e]) == e
            else:
                assert int(table[e]) == int(allowed[dist[e, allowed].argmin()])
