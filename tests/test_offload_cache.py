"""The expert cache gives exactly the resident engine's outputs, and keeps its invariants doing so.

Every offloaded run installs a debug hook that checks the slot table at every ensure and every
eviction: capacity never exceeded, no two experts in one slot, never evicting a locked (in use),
pinned or hot expert.
"""
import threading

import pytest
import torch

from moespec.config import OffloadConfig
from moespec.errors import MoespecError
from moespec.experts import profile_from_routing, save_profile
from moespec.generate import generate
from moespec.sequence import new_sequence
from moespec.models import ForwardPlan
from moespec.loading import load_model
from moespec.sampling import SamplingParams

FAMILIES = ["mixtral", "qwen3_moe"]          # E=6 K=2 all layers MoE; E=8 K=3 MoE layers 1 and 3
PROMPTS = [[5, 17, 3, 99, 42, 7, 11], [200, 1, 64, 9, 33], [12, 250, 8, 8, 120, 77, 2, 31, 150]]


def greedy(model, prompts, n=6):
    p = SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True).with_defaults({})
    seqs = [new_sequence(list(x), p, set(), None) for x in prompts]
    generate(model, seqs)
    return [s.token_ids for s in seqs]


@pytest.fixture(scope="module")
def refs(family_dirs, tmp_path_factory):
    """Per family: resident model, its greedy tokens (batch 1 and 3), prefill logits, a hot profile."""
    out = {}
    for fam in FAMILIES:
        folder, _ = family_dirs[fam]
        m = load_model(folder, auto_layout=False)
        toks = torch.tensor([PROMPTS[2]])
        fo = m.forward(toks, m.new_cache(1, 16), plan=ForwardPlan(record_routing=True))
        layers = m.cfg.moe_layer_ids
        prof = tmp_path_factory.mktemp("profile") / f"{fam}.json"
        save_profile(prof, profile_from_routing(fo.routing, layers, m.cfg.num_experts), m.cfg.num_experts)
        out[fam] = dict(folder=folder, model=m, b1=greedy(m, PROMPTS[:1]), b3=greedy(m, PROMPTS),
                        logits=fo.logits, profile=str(prof))
    return out


def install_checks(cache):
    """Check the slot table after every ensure and before every eviction; count events."""
    seen = {"ensure": 0, "evict": 0}

    def hook(event, layer, info):
        seen[event] += 1
        cache.check(layer)
        st = cache._st[layer]
        if event == "evict":
            assert st.locks[info["slot"]] == 0, "evicted an expert a forward in flight is using"
            assert info["expert"] not in st.pinned | st.hot, "evicted a pinned expert"
        else:
            for e, s in zip(info["experts"], info["slots"]):
                assert int(cache.slot_of[layer, e]) == s and st.locks[s] > 0
    cache.debug_hook = hook
    return seen


def offloaded(ref, tmp_path, **kw):
    kw.setdefault("offload_dir", str(tmp_path / "offload"))
    if kw.get("policy") == "static":
        kw["hot_profile"] = ref["profile"]
    m = load_model(ref["folder"], auto_layout=False, offload=OffloadConfig(**kw))
    return m, install_checks(m.experts)


def check_bytes(stats):
    loads = stats["misses"] + stats["prefetch_issued"] + stats["preloaded"]
    assert stats["bytes_read"] == loads * stats["expert_bytes"] == stats["store_bytes_read"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy, cache", [(p, c) for p in ("lru", "lfu", "static") for c in (1, 2, "50%")]
                         + [("lru", None)])       # None: every expert fits, so the policy never acts
def test_identical_tokens_for_every_cache_size_and_policy(family, policy, cache, refs, tmp_path):
    ref = refs[family]
    m, seen = offloaded(ref, tmp_path, expert_cache=cache, policy=policy)
    try:
        S, K = m.experts.S, m.cfg.top_k
        assert greedy(m, PROMPTS[:1]) == ref["b1"]
        assert greedy(m, PROMPTS) == ref["b3"]
        logits = m.forward(torch.tensor([PROMPTS[2]]), m.new_cache(1, 16)).logits
        assert torch.equal(logits, ref["logits"])          # bit-exact, not just close
        st = m.experts.stats()
        check_bytes(st)
        if policy != "static":
            assert st["bytes_read"] == st["misses"] * st["expert_bytes"]
        assert seen["ensure"] > 0
        if S < K:
            assert st["chunked_layers"] > 0                 # fewer slots than top-k: chunked every time
    finally:
        m.experts.close()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tier", ["ram", "disk", "disk-buffered"])
@pytest.mark.parametrize("prefetch", ["none", "next-layer"])
def test_identical_tokens_for_every_tier_and_prefetch(family, tier, prefetch, refs, tmp_path):
    ref = refs[family]
    cache = 1 if family == "mixtral" else 3           # below top-k (chunked) and between K and E
    m, _ = offloaded(ref, tmp_path, expert_cache=cache, offload=tier.split("-")[0], prefetch=prefetch,
                     direct_io=tier != "disk-buffered", prefetch_min_prob=0.0)   # random routers: every guess
    try:
        assert greedy(m, PROMPTS[:1]) == ref["b1"]
        assert greedy(m, PROMPTS) == ref["b3"]
        st = m.experts.stats()
        check_bytes(st)
        if prefetch == "none":
            assert st["bytes_read"] == st["misses"] * st["expert_bytes"] and st["prefetch_issued"] == 0
        else:
            assert st["prefetch_issued"] > 0
            assert st["prefetch_used"] + st["prefetch_wasted"] <= st["prefetch_issued"]
        if tier.startswith("disk"):
            assert st["direct_io"] == (tier == "disk")
            assert st["io_bytes"] == st["bytes_read"] // st["expert_bytes"] * m.experts.store.stride
    finally:
        m.experts.close()


def test_union_of_a_prefill_larger_than_the_cache_is_chunked_exactly(refs, tmp_path):
    ref = refs["qwen3_moe"]
    m, _ = offloaded(ref, tmp_path, expert_cache=4)
    try:
        logits = m.forward(torch.tensor([PROMPTS[2]]), m.new_cache(1, 16)).logits
        assert torch.equal(logits, ref["logits"])
        assert m.experts.stats()["chunked_layers"] > 0      # 9 tokens x top-3 touch more than 4 of 8 experts
    finally:
        m.experts.close()


def test_pinned_experts_are_never_evicted(refs, tmp_path):
    ref = refs["mixtral"]
    m, seen = offloaded(ref, tmp_path, expert_cache=3)
    try:
        cache = m.experts
        cache.pin(0, [4])
        cache.pin(1, [0, 5])
        with pytest.raises(MoespecError, match="needs one free slot"):
            cache.pin(1, [1])
        assert greedy(m, PROMPTS) == ref["b3"]
        assert seen["evict"] > 0                            # evictions happened, none of them pinned ones
        assert int(cache.slot_of[0, 4]) >= 0 and int(cache.slot_of[1, 0]) >= 0 and int(cache.slot_of[1, 5]) >= 0
        cache.unpin(1, [0, 5])
        assert greedy(m, PROMPTS[:1]) == ref["b1"]
    finally:
        m.experts.close()


def test_experts_in_use_are_never_evicted(refs, tmp_path):
    ref = refs["mixtral"]
    m, _ = offloaded(ref, tmp_path, expert_cache=3)
    cache, resident = m.experts, ref["model"].experts
    try:
        ids = torch.tensor([[0, 1], [1, 2]])
        chunks = cache.chunks(0, ids)
        slots, mask = next(chunks)                          # the forward now computes with experts 0, 1, 2
        assert mask is None
        cache.prefetch(0, [3, 4, 5])                        # wants every slot: none may be taken
        assert sorted(cache.resident(0).tolist()) == [0, 1, 2]
        for e, s in zip(ids.reshape(-1).tolist(), slots.reshape(-1).tolist()):
            assert torch.equal(cache.pool(0).blob[s], resident.pool(0).blob[e])
        with pytest.raises(StopIteration):
            next(chunks)                                    # compute done: locks released
        cache.prefetch(0, [3, 4, 5])                        # now they may go (loads run in the background)
        assert (cache.slot_of[0] >= 0).nonzero().squeeze(1).tolist() == [3, 4, 5]
        slots = cache.ensure(0, torch.tensor([[3, 5]]))     # waits for those loads
        for e, s in zip([3, 5], slots[0].tolist()):
            assert torch.equal(cache.pool(0).blob[s], resident.pool(0).blob[e])
        cache.release(0)
    finally:
        cache.close()


def test_concurrent_prefetching_never_disturbs_a_forward(refs, tmp_path):
    """A thread spams prefetches of random experts while generation runs: tokens stay identical."""
    ref = refs["qwen3_moe"]
    m, _ = offloaded(ref, tmp_path, expert_cache=3, prefetch="next-layer")
    stop = threading.Event()

    def spam():
        g = torch.Generator().manual_seed(0)
        while not stop.is_set():
            layer = m.cfg.moe_layer_ids[int(torch.randint(0, 2, (1,), generator=g))]
            m.experts.prefetch(layer, torch.randperm(8, generator=g)[:3].tolist())
    t = threading.Thread(target=spam)
    t.start()
    try:
        assert greedy(m, PROMPTS) == ref["b3"]
        assert greedy(m, PROMPTS[:1]) == ref["b1"]
    finally:
        stop.set()
        t.join()
        m.experts.close()


def test_next_layer_prefetch_loads_only_confident_guesses():
    from moespec.experts.prefetch import NextLayer
    # Layer 3's router over 4 experts: x = e0 gives probs softmax([2, 1, 0, -9]) = 0.665, 0.245, 0.090, 0.000
    router = torch.tensor([[2.0], [1.0], [0.0], [-9.0]])
    x = torch.tensor([[1.0]])
    assert NextLayer({1: router, 3: router}, top_k=3).predict(1, x) == (3, [0, 1, 2])
    assert NextLayer({1: router, 3: router}, top_k=3, min_prob=0.2).predict(1, x) == (3, [0, 1])
    assert NextLayer({1: router, 3: router}, top_k=3, min_prob=0.9).predict(1, x) == (3, [])
    assert NextLayer({1: router, 3: router}, top_k=3).predict(3, x) is None           # no next MoE layer
    with pytest.raises(MoespecError, match=r"prefetch_min_prob=1.5 must be a probability"):
        OffloadConfig(expert_cache=2, prefetch="next-layer", prefetch_min_prob=1.5).validate()


def test_hot_bf16_slots_are_prepacked_and_reset_on_reload():
    """PrepackingPool: a slot is computed from a prepacked copy from its Nth use on (bit-identical products);
    a new load into the slot goes back to the dense view of the new bytes."""
    from moespec.experts.pool import PAGE, PrepackingPool
    from moespec.models.layers import linear
    from moespec.models.packed import packing_supported
    if not packing_supported():                   # (the engine never prepacks on such a CPU: nothing to test)
        assert not packing_supported()
        return
    g = torch.Generator().manual_seed(0)
    pool = PrepackingPool(2, 64, 32, torch.bfloat16, align=PAGE, after_uses=3)
    experts = [[torch.randn(32, 64, generator=g).bfloat16(), torch.randn(32, 64, generator=g).bfloat16(),
                torch.randn(64, 32, generator=g).bfloat16()] for _ in range(2)]
    pool.pack(0, *experts[0])
    x = torch.randn(3, 64, generator=g).bfloat16()
    dense = linear(x, pool.w13[0])
    pool.after_load([0])
    for _ in range(2):
        pool.hit(0)
    assert pool.w13[0].layout == torch.strided
    pool.hit(0)                                   # the 3rd use packs it
    assert pool.w13[0].layout == torch._mkldnn and torch.equal(linear(x, pool.w13[0]), dense)
    assert torch.equal(pool.flat()[0][:64 * 64], torch.cat([experts[0][0], experts[0][1]]).reshape(-1))
    pool.pack(0, *experts[1])                     # a new expert lands in the slot (the loader writes the bytes)
    pool.after_load([0])
    assert pool.w13[0].layout == torch.strided
    assert torch.equal(pool.w13[0], torch.cat([experts[1][0], experts[1][1]]))
