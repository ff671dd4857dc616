"""The explicit KV cache: rollback, keep (tree paths), row selection, masks."""
import torch

from moespec.models import load_model


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


def test_per_row_rollback_in_a_batch(family_dirs):
    m = _model(family_dirs, "mixtral")
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
