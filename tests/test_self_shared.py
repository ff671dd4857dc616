"""Self-drafting on the target's KV (SpecMoE as published) and shadow experts: exact output, no I/O while drafting,
no second cache, and the acceptance the shared KV and the shadow copies buy on the bundled model."""
import pytest
import torch

from moespec import LLM, MoespecError, SamplingParams
from moespec.assets import REFERENCE_MODEL
from moespec.config import OffloadConfig, SpecConfig
from moespec.spec.self_shared import SharedSelfDrafter

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
