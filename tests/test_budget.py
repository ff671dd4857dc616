"""The verification expert budget (MoE-Spec, lossy): expert selection, re-routing, and the engine path."""
import json

import pytest
import torch

import hf_models
from moespec import LLM, MoespecError, SamplingParams
from moespec.cli import LOSSY_NOTE, main
from moespec.spec_config import SpecConfig
from moespec.models.budget import VerifyBudget, apply_budget, expert_scores, select_experts
from moespec.models.routing import Routing


def routed(probs: torch.Tensor, k: int, norm: bool):
    """What route() computes: top-K of the softmax, renormalised when the family does."""
    w, ids = torch.topk(probs, k, -1)
    return (w / w.sum(-1, keepdim=True) if norm else w), ids


def rand_probs(n: int, e: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(n, e, generator=g), -1)


# -- choosing the kept set ----------------------------------------------------------------------------
def test_top_b_keeps_the_highest_aggregate_scores():
    probs = torch.tensor([[0.50, 0.30, 0.10, 0.05, 0.05],
                          [0.10, 0.20, 0.60, 0.05, 0.05],
                          [0.05, 0.35, 0.05, 0.45, 0.10]])
    # scores: 0.65, 0.85, 0.75, 0.55, 0.20 -> top-2 = {1, 2}, top-3 = {1, 2, 0}; the union {0, 1, 2, 3} is 4.
    w, ids = routed(probs, 2, True)
    _, _, kept = apply_budget(probs, probs, w, ids, VerifyBudget(experts=2), 2, Routing(norm_topk=True))
    assert kept.tolist() == [1, 2]
    _, _, kept = apply_budget(probs, probs, w, ids, VerifyBudget(experts=3), 2, Routing(norm_topk=True))
    assert kept.tolist() == [1, 2, 0]
    # B below K is clamped to K: every token needs K experts.
    assert select_experts(probs.sum(0), VerifyBudget(experts=1), 2).tolist() == [1, 2]


def test_mass_keeps_the_smallest_prefix_reaching_tau():
    probs = torch.tensor([[0.40, 0.30, 0.20, 0.10, 0.00]]).repeat(2, 1)    # normalised scores 0.4 .3 .2 .1 0
    scores = expert_scores(probs, 1.0, None)
    assert select_experts(scores, VerifyBudget(mass=0.65), 1).tolist() == [0, 1]        # 0.4 < .65 <= 0.7
    assert select_experts(scores, VerifyBudget(mass=0.75), 1).tolist() == [0, 1, 2]     # 0.7 < .75 <= 0.9
    assert select_experts(scores, VerifyBudget(mass=0.3), 1).tolist() == [0]
    assert select_experts(scores, VerifyBudget(mass=0.3), 2).tolist() == [0, 1]         # at least K
    assert select_experts(scores, VerifyBudget(mass=1.0), 1).tolist() == [0, 1, 2, 3]  # every expert with mass
    assert len(select_experts(rand_probs(4, 8, 0).sum(0), VerifyBudget(mass=1.0), 1)) == 8   # softmax: all > 0
    w, ids = routed(probs, 1, True)
    _, ids2, kept = apply_budget(probs, probs, w, ids, VerifyBudget(mass=0.5), 1, Routing(norm_topk=True))
    assert kept.tolist() == [0, 1] and torch.equal(ids2, ids)                           # union {0} inside


def test_decay_by_draft_depth_changes_the_choice():
    # The pending token (depth 0) prefers expert 0; two deeper drafts prefer expert 1.
    probs = torch.tensor([[0.90, 0.05, 0.05],
                          [0.20, 0.70, 0.10],
                          [0.20, 0.70, 0.10]])
    depth = torch.tensor([0, 1, 2])
    w, ids = routed(probs, 1, True)                       # union {0, 1}
    _, _, flat = apply_budget(probs, probs, w, ids, VerifyBudget(experts=1), 1, Routing(norm_topk=True), depth)
    _, _, decayed = apply_budget(probs, probs, w, ids, VerifyBudget(experts=1, decay=0.5), 1, Routing(norm_topk=True), depth)
    assert flat.tolist() == [1]           # scores: expert 0 1.30, expert 1 1.45
    assert decayed.tolist() == [0]        # 0.9 + 0.1 + 0.05 = 1.05 vs 0.05 + 0.35 + 0.175 = 0.575
    # Padding (depth < 0) does not vote: the same two drafts as padding leave expert 0 on top.
    _, _, pad = apply_budget(probs, probs, w, ids, VerifyBudget(experts=1), 1, Routing(norm_topk=True), torch.tensor([0, -1, -1]))
    assert pad.tolist() == [0]


def test_resident_expert_wins_a_tie():
    probs = torch.tensor([[0.10, 0.40, 0.40, 0.10],
                          [0.10, 0.40, 0.40, 0.10]])
    scores = expert_scores(probs, 1.0, None)
    # Experts 1 and 2 tie; with no residency the lower id wins, a resident expert beats it.
    assert select_experts(scores, VerifyBudget(experts=1), 1).tolist() == [1]
    resident = torch.tensor([False, False, True, False])
    assert select_experts(scores, VerifyBudget(experts=1), 1, resident).tolist() == [2]
    # The bonus only breaks ties: a resident expert with a lower score still loses.
    assert select_experts(scores, VerifyBudget(experts=1), 1, torch.tensor([True, False, False, False])
                          ).tolist() == [1]
    # Through apply_budget (K = 1, union of two experts, B = 1).
    w1, ids1 = torch.full((2, 1), 1.0), torch.tensor([[1], [2]])
    _, out, kept = apply_budget(probs, probs, w1, ids1, VerifyBudget(experts=1), 1, Routing(norm_topk=True), None, resident)
    assert kept.tolist() == [2] and out.tolist() == [[2], [2]]


# -- re-routing tokens outside the set ----------------------------------------------------------------
@pytest.mark.parametrize("norm", [True, False])
def test_substitution_gives_k_distinct_experts_inside_the_set(norm):
    N, E, K, B = 12, 8, 3, 4
    probs = rand_probs(N, E, seed=3)
    w, ids = routed(probs, K, norm)
    assert torch.unique(ids).numel() > B
    w2, ids2, kept = apply_budget(probs, probs, w, ids, VerifyBudget(experts=B), K, Routing(norm_topk=norm))
    assert len(kept) == B
    inside = set(kept.tolist())
    moved = 0
    for t in range(N):
        picks = ids2[t].tolist()
        assert len(set(picks)) == K and set(picks) <= inside
        # the token's top-K among the kept experts, in order
        ranked = [e for e in torch.argsort(probs[t], descending=True).tolist() if e in inside][:K]
        if set(ids[t].tolist()) <= inside:
            assert torch.equal(ids2[t], ids[t]) and torch.equal(w2[t], w[t])     # untouched
        else:
            moved += 1
            assert picks == ranked
        p = probs[t, ids2[t]]
        torch.testing.assert_close(w2[t], p / p.sum() if norm else p, rtol=0, atol=1e-6)
        if norm:
            assert abs(float(w2[t].sum()) - 1) < 1e-6
    assert moved > 0


@pytest.mark.parametrize("norm", [True, False])
def test_truncation_keeps_at_most_k_experts_inside_the_set(norm):
    N, E, K, B = 16, 8, 3, 3
    probs = rand_probs(N, E, seed=4)
    w, ids = routed(probs, K, norm)
    w2, ids2, kept = apply_budget(probs, probs, w, ids, VerifyBudget(experts=B, mode="truncate"), K, Routing(norm_topk=norm))
    inside = set(kept.tolist())
    assert len(inside) == B and set(ids2.unique().tolist()) <= inside        # no expert outside is touched
    fell_back = partial = 0
    for t in range(N):
        nz = [(e, float(x)) for e, x in zip(ids2[t].tolist(), w2[t].tolist()) if x != 0]
        assert 1 <= len(nz) <= K and len({e for e, _ in nz}) == len(nz)
        natural = [e for e in ids[t].tolist() if e in inside]
        if not natural:         # every choice outside: its best expert inside the set, alone
            fell_back += 1
            best = max(inside, key=lambda e: float(probs[t, e]))
            assert nz == [(best, pytest.approx(1.0 if norm else float(probs[t, best]), abs=1e-6))]
            continue
        assert [e for e, _ in nz] == natural                                  # the natural picks, in order
        p = probs[t, natural]
        want = p / p.sum() if norm else p
        assert [x for _, x in nz] == pytest.approx(want.tolist(), abs=1e-6)
        if len(natural) < K:
            partial += 1
    assert partial > 0 and fell_back > 0          # the hand-picked seed exercises both cases


def test_budget_covering_the_union_returns_the_routing_untouched():
    probs = rand_probs(6, 8, seed=1)
    w, ids = routed(probs, 2, True)
    union = torch.unique(ids)
    for b in (VerifyBudget(experts=len(union)), VerifyBudget(experts=8, mode="truncate"),
              VerifyBudget(mass=1.0), VerifyBudget(experts=len(union), decay=0.1)):
        w2, ids2, kept = apply_budget(probs, probs, w, ids, b, 2, Routing(norm_topk=True), torch.arange(6))
        assert w2 is w and ids2 is ids
        assert set(union.tolist()) <= set(kept.tolist())
    w2, ids2, _ = apply_budget(probs, probs, w, ids, VerifyBudget(experts=len(union) - 1), 2, Routing(norm_topk=True))
    assert not torch.equal(ids2, ids)


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "exactly one of experts"),
    (dict(experts=2, mass=0.5), "exactly one of experts"),
    (dict(experts=0), "experts=0 must be a positive integer"),
    (dict(mass=1.5), "mass=1.5 must be in (0, 1]"),
    (dict(mass=2, mode="drop"), "mass=2 must be in (0, 1]"),
    (dict(experts=2, mode="drop"), "mode='drop' is not one of: substitute, truncate"),
    (dict(experts=2, decay=0.0), "decay=0.0 must be in (0, 1]"),
])
def test_verify_budget_validation(kwargs, message):
    with pytest.raises(MoespecError) as e:
        VerifyBudget(**kwargs).validate()
    assert message in str(e.value)


# -- end to end ---------------------------------------------------------------------------------------
PROMPTS = ["def wrap(text, width=70):\n    return wrap(text, width=70)\n\ndef wrap(",
           "import re\nimport os\nimport re\nimport"]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)


def watch(llm):
    """Record, per verification forward, the distinct experts each MoE layer computed (the ids handed to
    the expert provider) and what the router chose."""
    computed, kept, routed_union = [], [], []
    experts, forward = llm.model.experts, llm.model.forward
    chunks = experts.chunks

    def spy_chunks(layer, ids):
        computed[-1].append(int(torch.unique(ids).numel()))
        return chunks(layer, ids)

    def spy_forward(*a, plan=None, **kw):
        computed.append([])
        out = forward(*a, plan=plan, **kw)
        if plan is None or plan.budget is None:
            computed.pop()
        else:
            kept.append(out.kept)
            routed_union.append([int(torch.unique(r).numel()) for r in out.routing])
        return out
    experts.chunks, llm.model.forward = spy_chunks, spy_forward
    return computed, kept, routed_union


def test_budget_covering_every_expert_equals_plain_greedy(text_model):
    plain = LLM(text_model).generate(PROMPTS, GREEDY)
    assert all(o.stats["lossy"] is False for o in plain)
    spec = LLM(text_model, speculative={"method": "ngram", "num_speculative_tokens": 3}).generate(PROMPTS, GREEDY)
    assert spec[0].stats["lossy"] is False and "verify_budget" not in spec[0].stats
    E = LLM(text_model).config.num_experts
    llm = LLM(text_model, speculative={"method": "ngram", "num_speculative_tokens": 3, "verify_budget": E})
    computed, _, _ = watch(llm)
    out = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in out] == [o.token_ids for o in plain] == [o.token_ids for o in spec]
    assert computed and out[0].stats["lossy"] is True and out[0].stats["verify_budget"] == E
    assert "verify_budget_mass" not in out[0].stats and out[0].stats["budget_mode"] == "substitute"


@pytest.mark.parametrize("mode", ["substitute", "truncate"])
@pytest.mark.parametrize("method", ["ngram", "self"])
def test_small_budget_bounds_the_experts_of_every_verification(text_model, mode, method):
    llm = LLM(text_model, speculative={"method": method, "num_speculative_tokens": 3, "verify_budget": 3,
                                       "budget_mode": mode, "budget_decay": 0.8})
    assert llm.config.top_k == 3
    computed, kept, routed_union = watch(llm)
    out = llm.generate(PROMPTS, GREEDY)
    assert len(computed) > 0 and all(len(c) == 2 for c in computed)      # two MoE layers per forward
    assert max(max(c) for c in computed) <= 3
    assert kept == computed                                                  # ForwardOutput.kept says the same
    assert max(max(u) for u in routed_union) > 3                             # unbudgeted it would read more
    s = out[0].stats
    assert s["lossy"] is True and s["verify_budget"] == 3 and s["budget_mode"] == mode
    assert s["budget_decay"] == 0.8 and s.get("distinct_experts_per_verify", 0) <= 3
    assert all(len(o.token_ids) == GREEDY.max_new_tokens for o in out)


def test_mass_budget_and_sampling_run(text_model):
    llm = LLM(text_model, speculative={"method": "ngram", "num_speculative_tokens": 3, "verify_budget_mass": 0.5})
    computed, _, _ = watch(llm)
    p = SamplingParams(max_new_tokens=12, temperature=0.8, seed=1, ignore_eos=True)
    a = llm.generate(PROMPTS[0], p)[0]
    assert a.token_ids == llm.generate(PROMPTS[0], p)[0].token_ids         # still reproducible
    assert a.stats["lossy"] is True and a.stats["verify_budget_mass"] == 0.5 and "verify_budget" not in a.stats
    assert computed and all(3 <= n <= 8 for c in computed for n in c)


def test_mixtral_budget_bounds_experts(tmp_path):
    hf_models.build_text_model(tmp_path, family="mixtral")                 # E = 6, K = 2
    llm = LLM(tmp_path, speculative={"method": "ngram", "num_speculative_tokens": 4, "verify_budget": 2,
                                     "budget_mode": "truncate"})
    computed, _, _ = watch(llm)
    llm.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))
    assert computed and max(max(c) for c in computed) <= 2


# -- configuration and CLI errors ---------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    ({"verify_budget": 4, "verify_budget_mass": 0.5}, "verify_budget=4 and verify_budget_mass=0.5 were both given"),
    ({"verify_budget_mass": 1.5}, "verify_budget_mass=1.5 must be in (0, 1]"),
    ({"verify_budget_mass": 0}, "verify_budget_mass=0 must be in (0, 1]"),
    ({"verify_budget": 0}, "verify_budget=0 must be a positive integer"),
    ({"verify_budget": 4, "budget_mode": "drop"}, "budget_mode='drop' is not one of: substitute, truncate"),
    ({"verify_budget": 4, "budget_decay": 1.5}, "budget_decay=1.5 must be in (0, 1]"),
    ({"budget_mode": "truncate"}, "budget_mode / budget_decay need a verify budget"),
])
def test_bad_budget_configs(extra, message):
    with pytest.raises(MoespecError) as e:
        SpecConfig.from_dict({"method": "ngram", **extra})
    assert message in str(e.value)


def test_budget_below_top_k_names_top_k(text_model):
    with pytest.raises(MoespecError, match=r"verify_budget=2 is below the model's top_k=3"):
        LLM(text_model, speculative={"method": "ngram", "verify_budget": 2})
    assert SpecConfig(verify_budget=5).validate().budget() == VerifyBudget(experts=5)
    assert SpecConfig().budget() is None


def cli(capsys, *args):
    code = main(["generate", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("args, message", [
    (["--verify-budget", "4"], "error: --verify-budget needs speculative decoding"),
    (["--verify-budget-mass", "0.5"], "error: --verify-budget-mass needs speculative decoding"),
    (["--spec", "ngram", "--verify-budget", "4", "--verify-budget-mass", "0.5"],
     "error: verify_budget=4 and verify_budget_mass=0.5 were both given; choose one"),
    (["--spec", "ngram", "--verify-budget-mass", "1.5"], "error: verify_budget_mass=1.5 must be in (0, 1]"),
    (["--spec", "ngram", "--verify-budget", "2"], "error: verify_budget=2 is below the model's top_k=3"),
    (["--speculative-config", '{"method": "ngram", "verify_budget": 4, "budget_mode": "drop"}'],
     "error: budget_mode='drop' is not one of: substitute, truncate"),
])
def test_cli_budget_errors(text_model, capsys, args, message):
    code, out, err = cli(capsys, text_model, "--prompt", "x", "--max-new-tokens", "2", *args)
    assert code == 2 and message in err and "Traceback" not in err and out == ""


def test_cli_unknown_budget_mode(text_model, capsys):
    with pytest.raises(SystemExit) as e:
        cli(capsys, text_model, "--prompt", "x", "--spec", "ngram", "--verify-budget", "4", "--budget-mode", "drop")
    assert e.value.code == 2
    assert "argument --budget-mode: invalid choice: 'drop'" in capsys.readouterr().err


def test_cli_budget_json_says_lossy_and_notes_it_on_stderr(text_model, capsys):
    base = [text_model, "--prompt", PROMPTS[1], "--max-new-tokens", "8", "--temperature", "0", "--ignore-eos",
            "--json"]
    code, out, err = cli(capsys, *base, "--spec", "ngram", "--verify-budget", "8", "--budget-mode", "truncate")
    assert code == 0, err
    a = json.loads(out)
    assert a["stats"]["lossy"] is True and a["stats"]["verify_budget"] == 8 and a["stats"]["budget_mode"] == "truncate"
    assert err.count(LOSSY_NOTE) == 1 and LOSSY_NOTE not in out
    code, out, err = cli(capsys, *base, "--speculative-config", '{"method": "ngram", "verify_budget_mass": 1.0}')
    b = json.loads(out)
    assert code == 0 and b["stats"]["lossy"] is True and b["stats"]["verify_budget_mass"] == 1.0 and LOSSY_NOTE in err
    code, out, err = cli(capsys, *base, "--spec", "ngram")
    c = json.loads(out)
    assert c["stats"]["lossy"] is False and LOSSY_NOTE not in err
    assert a["token_ids"] == b["token_ids"] == c["token_ids"]                # budgets covering every expert


def test_budget_with_expert_offloading(text_model):
    from moespec.config import OffloadConfig
    plain = LLM(text_model).generate(PROMPTS, GREEDY)
    off = OffloadConfig(expert_cache=3, offload="ram")
    full = LLM(text_model, offload=off, speculative={"method": "ngram", "num_speculative_tokens": 3, "verify_budget": 8})
    assert [o.token_ids for o in full.generate(PROMPTS, GREEDY)] == [o.token_ids for o in plain]
    full.close()
    llm = LLM(text_model, offload=OffloadConfig(expert_cache=3, offload="ram"),
              speculative={"method": "ngram", "num_speculative_tokens": 3, "verify_budget": 3})
    computed, _, _ = watch(llm)
    out = llm.generate(PROMPTS, GREEDY)[0]
    assert computed and max(max(c) for c in computed) <= 3 and out.stats["lossy"] is True
    llm.close()
