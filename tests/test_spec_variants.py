"""Cheaper self-drafting variants: fewer experts per token and fewer layers while drafting."""
import json
import subprocess
import sys

import pytest

from moespec import LLM, MoespecError, SamplingParams

PROMPTS = ["def wrap(text, width=70):\n    return wrap(text, width=70)\n\ndef wrap(", "import re\nimport os\nimport"]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def plain(text_model):
    return [o.token_ids for o in LLM(text_model).generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("top_k,layers", [(1, None), (None, 2), (2, 3)])
def test_cheaper_self_drafts_stay_lossless(text_model, plain, top_k, layers):
    llm = LLM(text_model, speculative={"method": "self", "num_speculative_tokens": 3, "draft_experts": 4,
                                       "draft_top_k": top_k, "draft_layers": layers})
    assert llm.drafter.top_k == top_k and llm.drafter.layers == layers
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == plain


@pytest.mark.parametrize("n", [3, 8])
def test_rerouted_self_drafts_stay_lossless(text_model, plain, n):
    llm = LLM(text_model, speculative={"method": "self", "num_speculative_tokens": 3, "draft_experts": n,
                                       "draft_routing": "reroute"})
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == plain
    if n == 8:                 # every expert in the set: nothing is re-routed, the draft is the target
        assert outs[0].stats["acceptance_rate"] == 1.0


def test_reroute_keeps_each_token_inside_the_set():
    import torch
    from moespec.models.budget import reroute_inside
    from moespec.models.routing import Routing
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]])
    w, ids = torch.tensor([[0.625, 0.375], [4 / 7, 3 / 7]]), torch.tensor([[0, 1], [3, 2]])
    inside = torch.tensor([True, True, False, True])
    w2, ids2 = reroute_inside(probs, probs, w, ids, inside, 2, Routing(norm_topk=True))
    assert ids2.tolist() == [[0, 1], [3, 1]]                       # row 0 untouched; row 1: expert 2 -> 1
    assert torch.allclose(w2[1], torch.tensor([4 / 6, 2 / 6])) and torch.equal(w2[0], w[0])
    _, ids3 = reroute_inside(probs, probs, w, ids, torch.ones(4, dtype=torch.bool), 2, Routing(norm_topk=True))
    assert ids3 is ids                                              # all inside: nothing changes
    w4, _ = reroute_inside(probs, probs, w, ids, inside, 2, Routing(norm_topk=False))
    assert torch.allclose(w4[1], torch.tensor([0.4, 0.2]))         # softmax weights when not renormalised


def test_full_variant_is_the_target_itself(text_model, plain):
    # every expert, the model's own top-k and every layer: the draft is the target, acceptance is 100%
    llm = LLM(text_model, speculative={"method": "self", "num_speculative_tokens": 4, "draft_experts": 8,
                                       "draft_top_k": 3, "draft_layers": 4})
    out = llm.generate(PROMPTS[0], GREEDY)[0]
    assert out.token_ids == plain[0] and out.stats["acceptance_rate"] == 1.0


def test_variant_plans_change_the_forward(text_model):
    import torch
    from moespec.models.decoder import ForwardPlan
    m = LLM(text_model).model
    ids = torch.tensor([[5, 9, 17, 33, 2]])

    def logits(plan):
        kv = m.new_cache(1, 16)
        return m.forward(ids, kv, plan=plan).logits
    full = logits(None)
    assert torch.equal(logits(ForwardPlan(top_k=3, layers=4)), full)      # the model's own settings
    assert not torch.allclose(logits(ForwardPlan(top_k=1)), full, atol=1e-4)
    assert not torch.allclose(logits(ForwardPlan(layers=2)), full, atol=1e-4)
    # two layers run means the KV of layers 2 and 3 is never written
    kv = m.new_cache(1, 16)
    m.forward(ids, kv, plan=ForwardPlan(layers=2))
    assert kv.k[2].abs().sum() == 0 and kv.k[1].abs().sum() > 0


@pytest.mark.slow
def test_variant_settings_are_checked(text_model):
    with pytest.raises(MoespecError, match="exceeds the model's experts per token"):
        LLM(text_model, speculative={"method": "self", "draft_top_k": 4})
    with pytest.raises(MoespecError, match="exceeds the model's 4 layers"):
        LLM(text_model, speculative={"method": "self", "draft_layers": 5})
    with pytest.raises(MoespecError, match="need method 'self'"):
        LLM(text_model, speculative={"method": "ngram", "draft_top_k": 1})
    with pytest.raises(MoespecError, match="draft_routing='nearest' is not one of: substitute, reroute"):
        LLM(text_model, speculative={"method": "self", "draft_routing": "nearest"})
    with pytest.raises(MoespecError, match="draft_layers=0 must be a positive integer"):
        LLM(text_model, speculative={"method": "self", "draft_layers": 0})
    r = subprocess.run([sys.executable, "-m", "moespec.cli", "generate", str(text_model), "--prompt", "x",
                        "--draft-top-k", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--draft-top-k, --draft-layers and --draft-routing shape self-drafting" in r.stderr
    r = subprocess.run([sys.executable, "-m", "moespec.cli", "generate", str(text_model), "--prompt", "x",
                        "--max-new-tokens", "4", "--spec", "self", "--draft-top-k", "1", "--draft-layers", "2",
                        "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "acceptance_rate" in json.loads(r.stdout)["stats"]
