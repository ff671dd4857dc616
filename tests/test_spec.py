"""Speculative decoding: acceptance rules (exact distributions), drafters, and lossless engine output."""
import json
import subprocess
import sys

import pytest
import torch

import hf_models
from moespec import LLM, MoespecError, SamplingParams
from moespec.config import OffloadConfig
from moespec.spec_decode.drafters import NgramDrafter
from moespec.spec_decode.verify import chain_accept, greedy_accept


def test_greedy_accept():
    assert greedy_accept([5, 7, 9], [5, 7, 2, 4]) == (2, 2)
    assert greedy_accept([5, 7], [5, 7, 3]) == (2, 3)      # all accepted: bonus token
    assert greedy_accept([], [8]) == (0, 8)
    assert greedy_accept([1], [2, 3]) == (0, 2)


def test_ngram_drafter():
    d = NgramDrafter(3, 1)
    assert d.lookup([1, 2, 3, 9, 1, 2], 3) == [3, 9, 1]
    assert d.lookup([4, 4, 4, 4, 4], 2) == [4, 4]
    assert d.lookup([1, 2, 3], 2) == []                      # no earlier occurrence
    assert NgramDrafter(2, 2).lookup([7, 1, 2, 8, 3, 2], 2) == []  # only a 1-gram matches
    assert d.propose("seq", [1, 2, 3, 9, 1, 2], 3, None, None).tokens == [3, 9, 1]


def test_rejection_rule_accepts_with_the_analytic_probability():
    # Deterministic drafter (q one-hot at token 0), p(0) = 0.3: accept with probability 0.3 exactly.
    p = torch.tensor([[0.3, 0.5, 0.2], [0.1, 0.1, 0.8]])
    g = torch.Generator().manual_seed(0)
    n = 20000
    accepted = sum(chain_accept([0], None, p, g)[0] for _ in range(n))
    assert abs(accepted / n - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5
    # Draft distribution q: acceptance probability is sum_x min(p(x), q(x)) = 0.7 here.
    q = torch.tensor([[0.6, 0.2, 0.2]])
    acc = 0
    for _ in range(n):
        x = int(torch.multinomial(q[0], 1, generator=g))
        acc += chain_accept([x], q, p, g)[0]
    assert abs(acc / n - 0.7) < 4 * (0.7 * 0.3 / n) ** 0.5


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.slow
@pytest.mark.parametrize("with_q", [False, True])
def test_emitted_tokens_follow_the_target_distribution(with_q):
    # Tiny vocabulary, a 2-token chain: the first emitted token must be distributed as p1 exactly,
    # and the second (given the first draft was accepted) as p2 -- checked by chi-square over 1e5 draws.
    V = 5
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(3, V, generator=g), -1)
    q = torch.softmax(torch.randn(2, V, generator=g), -1)
    first = torch.zeros(V)
    n = 100_000
    for _ in range(n):
        if with_q:
            d = [int(torch.multinomial(q[0], 1, generator=g)), int(torch.multinomial(q[1], 1, generator=g))]
            k, tok = chain_accept(d, q, p, g)
        else:
            d = [1, 3]
            k, tok = chain_accept(d, None, p, g)
        first[d[0] if k >= 1 else tok] += 1
    # df = 4; the 0.999 quantile of chi-square(4) is 18.47.
    assert chi_square(first, p[0]) < 18.47


PROMPTS = ["def wrap(text, width=70):\n    return wrap(text, width=70)\n\ndef wrap(",
           "import re\nimport os\nimport re\nimport", "class A:\n    pass\nclass A:\n"]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_ngram_speculation_equals_plain_greedy(text_model, batch, k):
    p = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    plain = LLM(text_model).generate(PROMPTS[:batch], p)
    spec = LLM(text_model, speculative={"method": "ngram", "num_speculative_tokens": k}).generate(PROMPTS[:batch], p)
    for a, b in zip(plain, spec):
        assert a.token_ids == b.token_ids and a.text == b.text
    s = spec[0].stats
    assert s["draft_steps"] > 0 and 0 <= s["acceptance_rate"] <= 1
    assert s["accepted_tokens"] > 0                          # repetitive prompts: some drafts are accepted
    if batch == 1:   # tokens per step: the accepted drafts plus the target's own token
        assert s["mean_accepted_len"] == pytest.approx((s["accepted_tokens"] + s["draft_steps"]) / s["draft_steps"])
    assert s["mean_accepted_len"] > 1
    assert len(s["accepted_per_position"]) == k
    assert s["verify_s"] > 0 and s["draft_s"] >= 0


def test_speculation_with_expert_offloading_is_lossless(text_model, tmp_path):
    p = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    plain = LLM(text_model).generate(PROMPTS, p)
    off = OffloadConfig(expert_cache=2, offload="disk", offload_dir=str(tmp_path))
    llm = LLM(text_model, offload=off, speculative={"method": "ngram", "num_speculative_tokens": 3})
    spec = llm.generate(PROMPTS, p)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert spec[0].stats["expert_misses"] > 0
    llm.close()


def test_seeded_sampling_with_speculation_is_reproducible(text_model):
    llm = LLM(text_model, speculative={"method": "ngram", "num_speculative_tokens": 3})
    p = SamplingParams(max_new_tokens=30, temperature=0.8, seed=3, ignore_eos=True)
    assert llm.generate(PROMPTS[0], p)[0].token_ids == llm.generate(PROMPTS[0], p)[0].token_ids


def test_bad_speculative_configs(text_model):
    with pytest.raises(MoespecError, match="speculative method 'eagle' is not available"):
        LLM(text_model, speculative={"method": "eagle"})
    with pytest.raises(MoespecError, match="num_speculative_tokens=0"):
        LLM(text_model, speculative={"method": "ngram", "num_speculative_tokens": 0})
    with pytest.raises(MoespecError, match="unknown field"):
        LLM(text_model, speculative={"method": "ngram", "k": 3})


@pytest.mark.slow
def test_cli_spec_flags(text_model):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "moespec.cli", "generate", str(text_model), "--prompt",
                               PROMPTS[1], "--max-new-tokens", "12", "--temperature", "0", "--ignore-eos",
                               "--json", *args], capture_output=True, text=True, timeout=120)
    plain = json.loads(run().stdout)
    a = json.loads(run("--spec", "ngram", "--draft-len", "3").stdout)
    b = json.loads(run("--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}').stdout)
    assert a["token_ids"] == b["token_ids"] == plain["token_ids"]
    for key in ("acceptance_rate", "mean_accepted_len", "draft_steps"):
        assert key in a["stats"]
    r = run("--speculative-config", "{bad")
    assert r.returncode == 2 and "--speculative-config is not valid JSON" in r.stderr


def test_draft_model_speculation_is_lossless_and_the_target_as_its_own_draft_accepts_everything(text_model, tmp_path):
    import json as _json
    vocab = _json.loads((text_model / "config.json").read_text())["vocab_size"]
    hf_models.build("qwen3", tmp_path / "draft", seed=5, vocab_size=vocab)
    p = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    plain = LLM(text_model).generate(PROMPTS, p)
    spec = LLM(text_model, speculative={"method": "draft_model", "model": str(tmp_path / "draft"),
                                        "num_speculative_tokens": 3}).generate(PROMPTS, p)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    same = LLM(text_model, speculative={"method": "draft_model", "model": str(text_model),
                                        "num_speculative_tokens": 4})
    out = same.generate(PROMPTS[0], p)[0]
    assert out.token_ids == plain[0].token_ids
    assert out.stats["acceptance_rate"] == 1.0
    sampled = SamplingParams(max_new_tokens=20, temperature=0.9, seed=2, ignore_eos=True)
    assert same.generate(PROMPTS[0], sampled)[0].stats["acceptance_rate"] > 0.95  # q == p: (almost) always accepted


def test_draft_model_must_share_the_vocabulary(text_model, tmp_path):
    hf_models.build("qwen3", tmp_path / "other", vocab_size=97)
    with pytest.raises(MoespecError, match="vocabulary size 97"):
        LLM(text_model, speculative={"method": "draft_model", "model": str(tmp_path / "other")})
    with pytest.raises(MoespecError, match="needs a draft model folder"):
        LLM(text_model, speculative={"method": "draft_model"})


def test_self_drafter_is_lossless_and_with_every_expert_accepts_everything(text_model):
    p = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    plain = LLM(text_model).generate(PROMPTS, p)
    E = LLM(text_model).config.num_experts
    for n in (1, 3):
        spec = LLM(text_model, speculative={"method": "self", "draft_experts": n, "num_speculative_tokens": 3})
        assert [o.token_ids for o in spec.generate(PROMPTS, p)] == [o.token_ids for o in plain]
    full = LLM(text_model, speculative={"method": "self", "draft_experts": E, "num_speculative_tokens": 4})
    out = full.generate(PROMPTS[0], p)[0]
    assert out.token_ids == plain[0].token_ids and out.stats["acceptance_rate"] == 1.0


@pytest.mark.parametrize("routing", ["substitute", "reroute"])
def test_self_drafting_with_offloading_reads_nothing_while_drafting(text_model, tmp_path, routing):
    from moespec.spec_decode.drafters import SelfDrafter
    off = OffloadConfig(expert_cache=3, offload="disk", offload_dir=str(tmp_path))
    llm = LLM(text_model, offload=off, speculative={"method": "self", "num_speculative_tokens": 3,
                                                    "draft_routing": routing, "draft_kv": "own"})
    assert llm.drafter.routing == routing
    assert isinstance(llm.drafter, SelfDrafter) and llm.drafter.n == 3
    p = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    plain = LLM(text_model).generate(PROMPTS[0], p)[0]
    llm.generate(PROMPTS[0], SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True))  # warm the cache
    # Draft alone: every expert it computes is resident, so the store reads nothing.
    ctx = llm.encode(PROMPTS[0])
    before = llm.expert_stats()["bytes_read"]
    llm.drafter.propose("probe", ctx, 3, SamplingParams(temperature=0).with_defaults({}), None)
    assert llm.expert_stats()["bytes_read"] == before
    assert llm.generate(PROMPTS[0], p)[0].token_ids == plain.token_ids
    llm.close()
