"""Draft trees: tree helpers, tree acceptance (exact distributions), tree verification KV, lossless engine."""
import json

import hf_models
import pytest
import torch

from moespec import LLM, MoespecError, SamplingParams
from moespec.config import OffloadConfig
from moespec.spec_config import SpecConfig
from moespec.loading import load_model
from moespec.spec_decode.drafters import Draft, Drafter, NgramDrafter
from moespec.spec_decode.stats import SpecStats
from moespec.spec_decode.step import speculative_step
from moespec.spec_decode.tree import (
    ancestor_mask,
    chain_parents,
    depths,
    pack,
    parse_shape,
    path_to,
    shape_nodes,
    shape_parents,
)
from moespec.spec_decode.verify import chain_accept, tree_accept, tree_greedy_accept

# A hand-built tree: 0 and 1 under the root, 2 and 3 under 0, 4 under 2.
PARENTS = [-1, -1, 0, 0, 2]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is faster, and two oversubscribe a busy machine badly."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_ancestor_mask_depths_and_paths():
    m = ancestor_mask(PARENTS)
    expect = torch.tensor([[1, 0, 0, 0, 0],
                           [0, 1, 0, 0, 0],
                           [1, 0, 1, 0, 0],
                           [1, 0, 0, 1, 0],
                           [1, 0, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(m, expect)
    assert depths(PARENTS) == [1, 1, 2, 2, 3]
    assert path_to(PARENTS, 4) == [0, 2, 4] and path_to(PARENTS, 1) == [1] and path_to(PARENTS, -1) == []
    assert chain_parents(3) == [-1, 0, 1]
    assert torch.equal(ancestor_mask(chain_parents(4)), torch.tril(torch.ones(4, 4, dtype=torch.bool)))


def test_pack_pads_rows_and_puts_the_root_first():
    vis, depth = pack([PARENTS, [-1]], 6)
    assert depth.tolist() == [[0, 1, 1, 2, 2, 3], [0, 1, -1, -1, -1, -1]]
    assert torch.equal(vis[0, 1:, 1:], ancestor_mask(PARENTS))
    assert vis[:, :, 0].all()                                    # everything sees the pending token
    assert vis[1, 3].tolist() == [True, False, False, True, False, False]   # padding: root and itself


def test_static_shapes():
    assert shape_nodes([2, 2, 1, 1]) == 14 and len(shape_parents([2, 2, 1, 1])) == 14
    assert shape_parents([2, 2]) == [-1, -1, 0, 0, 1, 1]
    assert depths(shape_parents([2, 2, 1, 1])) == [1] * 2 + [2] * 4 + [3] * 4 + [4] * 4
    assert parse_shape("2,2,1,1") == [2, 2, 1, 1] == parse_shape([2, 2, 1, 1]) == parse_shape(" 2, 2,1 ,1")
    for bad in ("2,x", "2,0", "", "2,,1", "-1", "1.5", [2, True], [], "4,4,4"):
        with pytest.raises(ValueError, match="--tree"):
            parse_shape(bad, "--tree")
    with pytest.raises(ValueError, match="84 nodes; at most 64"):
        parse_shape("4,4,4", "--tree")


def test_spec_config_tree():
    c = SpecConfig.from_dict({"method": "ngram", "tree": "2,2,1,1"})
    assert c.tree == [2, 2, 1, 1] and c.num_speculative_tokens == 4 and c.k_max == 4
    assert SpecConfig.from_dict({"method": "ngram", "tree": [3, 1], "num_speculative_tokens": 7}).k_max == 2
    with pytest.raises(MoespecError, match="tree '2,x'"):
        SpecConfig.from_dict({"method": "ngram", "tree": "2,x"})
    with pytest.raises(MoespecError, match="'auto' cannot be combined"):
        SpecConfig.from_dict({"method": "ngram", "tree": [2], "num_speculative_tokens": "auto"})


def test_tree_greedy_accept():
    tokens = [5, 6, 7, 8, 9]                          # PARENTS: 0=5, 1=6 at depth 1; 2=7, 3=8 under 0; 4=9 under 2
    # Branch 1 (token 6) is the target's pick at the root; node 1 has no children: bonus target[2].
    assert tree_greedy_accept(PARENTS, tokens, [6, 0, 3, 0, 0, 0]) == ([1], 3)
    # Branch 0, then its second child 3 (token 8); node 3 is a leaf: bonus target[4].
    assert tree_greedy_accept(PARENTS, tokens, [5, 8, 0, 0, 4, 0]) == ([0, 3], 4)
    # The full depth-3 path 0 -> 2 -> 4 and the bonus after node 4.
    assert tree_greedy_accept(PARENTS, tokens, [5, 7, 0, 9, 0, 2]) == ([0, 2, 4], 2)
    # Nothing matches at the root: the target's own token.
    assert tree_greedy_accept(PARENTS, tokens, [1, 7, 0, 9, 0, 2]) == ([], 1)
    assert tree_greedy_accept([], [], [3]) == ([], 3)


def test_tree_accept_on_a_chain_is_chain_accept():
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    p = torch.softmax(torch.randn(4, 6, generator=g1), -1)
    q = torch.softmax(torch.randn(3, 6, generator=g1), -1)
    g2.set_state(g1.get_state())
    for _ in range(200):
        d = [int(torch.multinomial(q[i], 1, generator=g1)) for i in range(3)]
        [int(torch.multinomial(q[i], 1, generator=g2)) for i in range(3)]
        n, tok = chain_accept(d, q, p, g1)
        assert tree_accept(chain_parents(3), d, q, p, g2) == (list(range(n)), tok)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.slow
@pytest.mark.parametrize("iid", [True, False])
def test_tree_accept_emits_the_target_distribution(iid):
    # V = 5; two candidates at the root, each with one child. The target's distribution after a token a is
    # P[a] (it depends on the token, as a real model's does), at the root p0. The first two tokens of the
    # sequence (the second from the next step, P[a], when the step emitted only one) must be distributed
    # as p0(a) P[a](b): chi-square over 25 cells; the first token alone as p0 over 5.
    V, n = 5, 100_000
    g = torch.Generator().manual_seed(7)
    p0 = torch.softmax(torch.randn(V, generator=g), -1)
    P = torch.softmax(torch.randn(V, V, generator=g), -1)
    q0 = torch.softmax(torch.randn(V, generator=g), -1)
    q1 = torch.softmax(torch.randn(V, V, generator=g), -1)   # draft distribution after a token
    parents = [-1, -1, 0, 1]
    # The drafts of all n steps, drawn up front: children of the root i.i.d. from q0, below each one
    # child from q1[its token] (iid); or a deterministic drafter's distinct candidates (one-hot q).
    a = torch.multinomial(q0, 2 * n, replacement=True, generator=g).view(n, 2)
    b = torch.multinomial(q1[a.reshape(-1)], 1, generator=g).view(n, 2)
    drafts = torch.cat([a, b], 1) if iid else torch.tensor([1, 3, 2, 2]).repeat(n, 1)
    first, second = torch.zeros(n, dtype=torch.long), torch.full((n,), -1)
    for s, tokens in enumerate(drafts.tolist()):
        q = torch.cat([q0.expand(2, V), q1[tokens[:2]]]) if iid else None
        p = torch.cat([p0[None], P[tokens]])
        path, tok = tree_accept(parents, tokens, q, p, g)
        out = [tokens[i] for i in path] + [tok]
        first[s] = out[0]
        if len(out) > 1:
            second[s] = out[1]
    alone = second < 0              # the step emitted one token: the next one comes from P[first]
    second[alone] = torch.multinomial(P[first[alone]], 1, generator=g)[:, 0]
    pairs = torch.bincount(first * V + second, minlength=V * V).view(V, V).float()
    # 0.999 quantiles of chi-square: df 4 -> 18.47, df 24 -> 51.18.
    assert chi_square(pairs.sum(1), p0) < 18.47
    assert chi_square(pairs.reshape(-1), (p0[:, None] * P).reshape(-1)) < 51.18


def test_ngram_tree_branches_at_the_root_from_distinct_matches():
    d = NgramDrafter(2, 1, tree=[2, 2, 1])
    ctx = [1, 2, 3, 1, 2, 4, 5, 1, 2]
    assert d.lookup_many(ctx, 3, 2) == [[4, 5, 1], [3, 1, 2]]
    draft = d.propose("s", ctx, 3, None, None)
    assert draft.tokens == [4, 5, 1, 3, 1, 2] and draft.parents == [-1, 0, 1, -1, 3, 4] and draft.q is None
    one = d.propose("s", [7, 1, 2, 8, 1, 2], 3, None, None)     # one distinct continuation: a chain
    assert one.tokens == [8, 1, 2] and one.parents is None
    assert d.propose("s", [1, 2, 3], 3, None, None).tokens == []


# -- verification forward and KV commit ---------------------------------------------------------------

@pytest.fixture(scope="module")
def window_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixtral_window")
    hf_models.build("mixtral", d, sliding_window=4)
    return d


def _greedy(m, ids: list[int], n: int) -> list[int]:
    kv = m.new_cache(1, 64)
    logits = m.forward(torch.tensor([ids]), kv).logits[0, -1]
    kv.advance(len(ids))
    out = []
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = m.forward(torch.tensor([[out[-1]]]), kv).logits[0, -1]
        kv.advance(1)
    return out


@pytest.mark.parametrize("which", ["text_model", "window_model"])
def test_tree_forward_gives_every_node_its_paths_logits(which, request):
    # Each node's logits from one tree-masked forward equal a fresh prefill of prompt + its root path
    # (the sliding-window model checks that tree positions reach the window mask too).
    m = load_model(request.getfixturevalue(which))
    prompt = [3, 1, 4, 1, 5, 9, 2]
    kv = m.new_cache(1, 32)
    m.forward(torch.tensor([prompt[:-1]]), kv)
    kv.advance(len(prompt) - 1)
    tokens = [11, 12, 13, 14, 15]                     # PARENTS; the root is the pending prompt[-1]
    vis, depth = pack([PARENTS], 6)
    got = m.forward(torch.tensor([[prompt[-1]] + tokens]), kv, positions=kv.lens_tensor()[:, None] + depth,
                    tree=vis).logits[0]
    for i in range(-1, len(tokens)):
        seq = prompt + [tokens[j] for j in path_to(PARENTS, i)]
        ref = m.forward(torch.tensor([seq]), m.new_cache(1, 32)).logits[0, -1]
        assert torch.allclose(got[i + 1], ref, atol=1e-5), i


class FixedDrafts(Drafter):
    def __init__(self, drafts):
        self.drafts = drafts

    def propose(self, key, context, k, params, generator):
        return self.drafts[key]


@pytest.mark.parametrize("which", ["text_model", "window_model"])
def test_tree_step_commits_the_accepted_path_exactly(which, request):
    # Three rows of different lengths: two trees of different sizes and a chain. Greedy drafts are built
    # from the target's own greedy continuation so that known paths are accepted; afterwards each row's
    # KV must equal a fresh prefill of what it committed (compared through the next forward's logits).
    m = load_model(request.getfixturevalue(which))
    V = m.cfg.vocab_size
    prompts = [[3, 1, 4, 1, 5, 9, 2], [2, 7, 1, 8, 2], [6, 6, 6, 1, 2, 3]]
    B = len(prompts)
    kv = m.new_cache(B, 64)
    lens = [len(p) for p in prompts]
    toks = torch.zeros(B, max(lens), dtype=torch.long)
    for r, p in enumerate(prompts):
        toks[r, :len(p)] = torch.tensor(p)
    m.forward(toks, kv)
    kv.advance(lens)
    g = [_greedy(m, p, 5) for p in prompts]           # g[r][0] is the pending token
    w = lambda t: (t + 1) % V                          # a token the target does not pick
    drafts = {
        0: Draft([w(g[0][1]), g[0][1], w(g[0][2]), g[0][2], g[0][3]], None, [-1, -1, 0, 1, 3]),  # path 1, 3, 4
        1: Draft([g[1][1], w(g[1][2]), g[1][2]], None, [-1, 0, 0]),                             # path 0, 2
        2: Draft([g[2][1], w(g[2][2])]),                                                        # chain: 1 accepted
    }
    params = [SamplingParams(temperature=0).with_defaults({})] * B
    stats = SpecStats()
    emitted, nxt = speculative_step(m, kv, [0, 1, 2], [p + [gr[0]] for p, gr in zip(prompts, g)],
                                    torch.tensor([gr[0] for gr in g]), params, [None] * B, FixedDrafts(drafts),
                                    3, stats)
    assert emitted == [g[0][1:5], g[1][1:4], g[2][1:3]]
    assert kv.lens == [lens[0] + 4, lens[1] + 3, lens[2] + 2]
    assert stats.accepted == 3 + 2 + 1 and stats.drafted == 3 + 2 + 2 and stats.draft_nodes == 10
    assert stats.accepted_per_pos == {0: 3, 1: 2, 2: 1}
    got = m.forward(nxt[:, None], kv).logits[:, 0]
    for r in range(B):
        seq = prompts[r] + [g[r][0]] + emitted[r]
        ref = m.forward(torch.tensor([seq]), m.new_cache(1, 64)).logits[0, -1]
        assert torch.allclose(got[r], ref, atol=1e-5), r


# -- the engine: lossless greedy output for every drafter and tree shape -------------------------------

PROMPTS = ["def wrap(text, width=70):\n    return wrap(text, width=70)\n\ndef wrap(",
           "import re\nimport os\nimport re\nimport", "class A:\n    pass\nclass A:\n"]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def draft_model(text_model, tmp_path_factory):
    vocab = json.loads((text_model / "config.json").read_text())["vocab_size"]
    d = tmp_path_factory.mktemp("tree_draft")
    hf_models.build("qwen3", d, seed=5, vocab_size=vocab)
    return d


@pytest.fixture(scope="module")
def plain(text_model):
    return [o.token_ids for o in LLM(text_model).generate(PROMPTS, GREEDY)]


def _spec(method, text_model, draft_model, tree):
    return {"ngram": {"method": "ngram"},
            "self": {"method": "self", "draft_experts": 2},
            "draft_model": {"method": "draft_model", "model": str(draft_model)},
            "draft_model_self": {"method": "draft_model", "model": str(text_model)}}[method] | {"tree": tree}


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("tree", ["2,1,1", "2,2,1"])
@pytest.mark.parametrize("method", ["ngram", "self", "draft_model", "draft_model_self"])
def test_greedy_tree_speculation_equals_plain_greedy(text_model, draft_model, plain, method, tree, batch):
    out = LLM(text_model, speculative=_spec(method, text_model, draft_model, tree)).generate(PROMPTS[:batch], GREEDY)
    assert [o.token_ids for o in out] == plain[:batch]
    s = out[0].stats
    assert s["tree"] == parse_shape(tree) and s["draft_len"] == 3 and len(s["accepted_per_position"]) == 3
    assert s["draft_steps"] > 0 and 0 <= s["acceptance_rate"] <= 1
    row_steps = s["draft_steps"] * batch              # at most: rows that finish leave the batch
    # draft_tokens counts along depth (at most 3 per row and step), draft_nodes every node drafted.
    assert s["draft_tokens"] <= 3 * row_steps and s["draft_nodes"] <= shape_nodes(parse_shape(tree)) * row_steps
    if method != "ngram" and batch == 1:     # model drafters always grow the full static tree
        assert s["draft_tokens"] == 3 * row_steps
        assert s["draft_nodes"] == shape_nodes(parse_shape(tree)) * row_steps


@pytest.mark.parametrize("method", ["draft_model_self", "self_all"])
def test_the_target_as_its_own_draft_accepts_the_whole_top_branch(text_model, draft_model, method):
    E = LLM(text_model).config.num_experts
    spec = _spec(method, text_model, draft_model, "2,2,1,1") if method != "self_all" else \
        {"method": "self", "draft_experts": E, "tree": [2, 2, 1, 1]}
    out = LLM(text_model, speculative=spec).generate(PROMPTS[0], GREEDY)[0]
    s = out.stats
    assert s["acceptance_rate"] == 1.0 and s["mean_accepted_len"] == 5.0
    assert s["accepted_per_position"] == [s["draft_steps"]] * 4 and s["draft_nodes"] == 14 * s["draft_steps"]


def test_sampled_tree_speculation(text_model, draft_model):
    p = SamplingParams(max_new_tokens=20, temperature=0.9, seed=2, ignore_eos=True)
    same = LLM(text_model, speculative=_spec("draft_model_self", text_model, draft_model, "2,2,1"))
    a = same.generate(PROMPTS, p)
    assert [o.token_ids for o in a] == [o.token_ids for o in same.generate(PROMPTS, p)]   # seeded: reproducible
    assert a[0].stats["acceptance_rate"] > 0.95            # q == p: (almost) always accepted
    other = LLM(text_model, speculative=_spec("draft_model", text_model, draft_model, "3,2"))
    assert [o.token_ids for o in other.generate(PROMPTS, p)] == [o.token_ids for o in other.generate(PROMPTS, p)]


@pytest.mark.parametrize("prefetch", ["none", "draft"])
def test_tree_speculation_with_expert_offloading_is_lossless(text_model, plain, tmp_path, prefetch):
    off = OffloadConfig(expert_cache=2, offload="disk", offload_dir=str(tmp_path), prefetch=prefetch)
    llm = LLM(text_model, offload=off, speculative={"method": "self", "tree": "2,2,1"})
    out = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in out] == plain
    assert out[0].stats["expert_misses"] > 0 and out[0].stats["tree"] == [2, 2, 1]
    llm.close()


# -- command line ------------------------------------------------------------------------------------

def test_cli_tree_flag(capsys):
    from moespec.cli import build_parser, main, spec_config
    assert main(["generate", "m", "--prompt", "x", "--spec", "ngram", "--tree", "2,x"]) == 2
    assert "--tree '2,x'" in capsys.readouterr().err
    assert main(["generate", "m", "--prompt", "x", "--tree", "2,2"]) == 2
    assert "--tree needs a drafter" in capsys.readouterr().err
    assert main(["generate", "m", "--prompt", "x", "--spec", "ngram", "--tree", "2", "--draft-len", "3"]) == 2
    assert "--draft-len and --tree" in capsys.readouterr().err
    parse = build_parser().parse_args
    c = spec_config(parse(["generate", "m", "--prompt", "x", "--spec", "self", "--tree", "2,2,1,1"]))
    assert c.tree == [2, 2, 1, 1] and c.num_speculative_tokens == 4
    c = spec_config(parse(["generate", "m", "--prompt", "x", "--speculative-config",
                           '{"method": "ngram", "tree": [3, 1]}']))
    assert c.tree == [3, 1] and c.k_max == 2
    c = spec_config(parse(["generate", "m", "--prompt", "x", "--speculative-config",
                           '{"method": "ngram", "tree": "2,1"}', "--tree", "4"]))
    assert c.tree == [4]
