"""The explicit KV cache: rollback, keep (tree paths), row selection, masks."""
import hf_models
import pytest
import torch

from moespec.loading import load_model


def _model(family_dirs, fam="qwen3_moe"):
    return load_model(family_dirs[fam][0])


def test_decode_after_rollback_equals_fresh_prefill(family_dirs):
    m = _model(family_dirs)
    toks = torch.randint(0, m.cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    kv = m.new_cache(1, 32)
    m.forward(toks, kv)
    kv.advance(12)
    kv.rollback(4)                               # forget the last 4 tokens
    other = torch.tensor([[5, 6, 7]])
    got = m.forward(other, kv).logits
    fresh = m.forward(torch.cat([toks[:, :8], other], 1), m.new_cache(1, 32)).logits[:, 8:]
    assert torch.allclose(got, fresh, atol=1e-5)


@pytest.mark.parametrize("family", list(hf_models.FAMILY_CONFIGS))
def test_per_row_rollback_in_a_batch(family, family_dirs):
    """Every family, latent attention (a cache of one latent per token) included."""
    m = _model(family_dirs, family)
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(0, m.cfg.vocab_size, (2, 10), generator=g)
    kv = m.new_cache(2, 32)
    m.forward(toks, kv)
    kv.advance(10)
    kv.rollback([3, 6])                          # rows now hold 7 and 4 tokens
    nxt = torch.tensor([[11], [12]])
    got = m.forward(nxt, kv).logits[:, 0]
    for row, keep in ((0, 7), (1, 4)):
        seq = torch.cat([toks[row, :keep], nxt[row]])[None]
        ref = m.forward(seq, m.new_cache(1, 32)).logits[0, -1]
        assert torch.allclose(got[row], ref, atol=1e-5)


def test_keep_compacts_a_tree_path(family_dirs):
    m = _model(family_dirs, "olmoe")
    prefix = torch.tensor([[3, 1, 4, 1, 5]])
    kv = m.new_cache(1, 32)
    m.forward(prefix, kv)
    kv.advance(5)
    # A tree of 4 nodes after the prefix: 0 -> {1, 2}, 1 -> 3. Path 0, 1, 3 is kept.
    nodes = torch.tensor([[9, 2, 6, 5]])
    parents = [-1, 0, 0, 1]
    vis = torch.eye(4, dtype=torch.bool)
    for i, p in enumerate(parents):
        while p >= 0:
            vis[i, p] = True
            p = parents[p]
    depth = torch.tensor([[5, 6, 6, 7]])
    m.forward(nodes, kv, positions=depth, tree=vis)
    kv.keep(0, [5 + 0, 5 + 1, 5 + 3])
    assert kv.lens == [8]
    nxt = torch.tensor([[7]])
    got = m.forward(nxt, kv).logits[0, -1]
    ref = m.forward(torch.tensor([[3, 1, 4, 1, 5, 9, 2, 5, 7]]), m.new_cache(1, 32)).logits[0, -1]
    assert torch.allclose(got, ref, atol=1e-5)


def test_select_rows_keeps_the_remaining_sequences_exact(family_dirs):
    m = _model(family_dirs, "qwen2_moe")
    g = torch.Generator().manual_seed(2)
    toks = torch.randint(0, m.cfg.vocab_size, (3, 6), generator=g)
    kv = m.new_cache(3, 16)
    m.forward(toks, kv)
    kv.advance(6)
    kv.select_rows([2, 0])
    nxt = torch.tensor([[1], [2]])
    got = m.forward(nxt, kv).logits[:, 0]
    for r, row in enumerate((2, 0)):
        ref = m.forward(torch.cat([toks[row], nxt[r]])[None], m.new_cache(1, 16)).logits[0, -1]
        assert torch.allclose(got[r], ref, atol=1e-5)


def test_capacity_is_enforced(family_dirs):
    import pytest
    from moespec.errors import MoespecError
    m = _model(family_dirs)
    kv = m.new_cache(1, 4)
    with pytest.raises(MoespecError, match="capacity of 4"):
        m.forward(torch.tensor([[1, 2, 3, 4, 5]]), kv)


def test_select_rows_can_shrink_the_capacity_to_what_the_kept_rows_need(family_dirs):
    import pytest

    from moespec.errors import MoespecError
    m = _model(family_dirs, "qwen2_moe")
    kv = m.new_cache(2, 40)
    m.forward(torch.tensor([[3, 1, 4, 1], [5, 9, 2, 6]]), kv)
    kv.advance([4, 2])
    kv.select_rows([1], capacity=10)
    assert kv.capacity == 10 and tuple(kv.k.shape) == (m.cfg.num_layers, 1, m.cfg.num_kv_heads, 10, m.cfg.head_dim)
    got = m.forward(torch.tensor([[7]]), kv).logits[0, 0]
    ref = m.forward(torch.tensor([[5, 9, 7]]), m.new_cache(1, 8)).logits[0, -1]
    assert torch.allclose(got, ref, atol=1e-5)
    with pytest.raises(MoespecError, match="a KV capacity of 1 tokens cannot hold a kept row of 2"):
        kv.select_rows([0], capacity=1)


def test_the_batch_gives_back_the_kv_room_of_a_finished_long_row(text_model, monkeypatch):
    """A row with a long prompt and few new tokens sizes the batch; once it has finished, the short row left keeps
    only its own room, and every row's tokens are those it makes alone."""
    from moespec import LLM, SamplingParams
    from moespec.kv_cache import KVCache
    llm = LLM(text_model)
    caps = []
    real = KVCache.select_rows
    monkeypatch.setattr(KVCache, "select_rows", lambda self, rows, capacity=None: (
        caps.append((self.capacity, capacity)), real(self, rows, capacity))[1])
    long_prompt, short = [5, 17, 3] * 30, [7, 11]
    ps = [SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True),
          SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)]
    out = llm.generate([long_prompt, short], ps)
    assert caps == [(len(long_prompt) + 3 + 1, len(short) + 20)]          # 94 slots, then 22
    alone = [llm.generate([p], [sp])[0].token_ids for p, sp in zip([long_prompt, short], ps)]
    assert [o.token_ids for o in out] == alone
