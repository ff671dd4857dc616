"""Logits and greedy generation equal transformers' on the same weights, for every family."""
import pytest
import torch

import hf_models
from moespec.loading import load_model

FAMILIES = list(hf_models.FAMILY_CONFIGS)


def ragged_batch(vocab: int, lens=(13, 5, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_on_ragged_batch(family, family_dirs):
    folder, hf = family_dirs[family]
    m = load_model(folder)
    prompts = ragged_batch(hf.config.vocab_size)
    B, T = len(prompts), max(map(len, prompts))
    toks = torch.zeros(B, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        toks[i, :len(p)] = torch.tensor(p)
    out = m.forward(toks, m.new_cache(B, 32)).logits
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0]
        assert torch.allclose(out[i, :len(p)], ref, atol=1e-4, rtol=0), (out[i, :len(p)] - ref).abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(family, family_dirs):
    from moespec import LLM, SamplingParams
    folder, hf = family_dirs[family]
    prompt = ragged_batch(hf.config.vocab_size, lens=(7,), seed=1)[0]
    with torch.no_grad():
        if family == "llama4_text":
            # transformers' generate on Llama 4 computes logits ~0.1 away from its own forward's from the first step
            # (its forward, with or without a cache or a mask, agrees with moespec within 1e-6): greedy over its
            # forward instead
            ref = []
            for _ in range(64):
                ref.append(int(hf(torch.tensor([prompt + ref])).logits[0, -1].argmax()))
        else:
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    llm = LLM(folder)
    out = llm.generate(prompt, SamplingParams(max_new_tokens=64, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == ref
    assert out.finish_reason == "length" and out.stats["new_tokens"] == 64


# gpt-oss and Llama 4 store fused experts only (gpt-oss's MXFP4 against float: test_gpt_oss.py)
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("gpt_oss", "llama4_text")])
def test_fused_and_per_expert_layouts_load_to_the_same_weights(family, tmp_path):
    hf_models.build(family, tmp_path / "per", seed=3)
    hf_models.build(family, tmp_path / "fused", seed=3, fused=True)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "fused" / "model.safetensors"), "pt") as f:
        assert any(k.endswith("experts.gate_up_proj") for k in f.keys())
    with safe_open(str(tmp_path / "per" / "model.safetensors"), "pt") as f:
        assert not any(k.endswith("experts.gate_up_proj") for k in f.keys())
    a, b = load_model(tmp_path / "per"), load_model(tmp_path / "fused")
    for layer in a.experts.pools:
        assert torch.equal(a.experts.pool(layer).w13, b.experts.pool(layer).w13)
        assert torch.equal(a.experts.pool(layer).w2, b.experts.pool(layer).w2)


def test_sharded_checkpoint_and_bfloat16(tmp_path):
    hf = hf_models.build("mixtral", tmp_path / "one", seed=4)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    # Fixed layouts: the timed layout choice may differ between two loads, and this test wants bit equality.
    a, b = load_model(tmp_path / "one", auto_layout=False), load_model(tmp_path / "sharded", auto_layout=False)
    toks = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(a.forward(toks, a.new_cache(1, 8)).logits, b.forward(toks, b.new_cache(1, 8)).logits)
    hf_models.build("mixtral", tmp_path / "bf16", seed=4, dtype=torch.bfloat16)
    c = load_model(tmp_path / "bf16", dtype="bfloat16")
    assert c.w.embed.dtype == torch.bfloat16
    ref = a.forward(toks, a.new_cache(1, 8)).logits
    got = c.forward(toks, c.new_cache(1, 8)).logits.float()
    assert (got - ref).abs().max() < 0.1  # bf16 weights and compute: close, not equal


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])      # qwen3_moe: tied head, dense layers
def test_prepacked_bf16_weights_give_bit_identical_logits(family, tmp_path):
    from moespec.models.layers import SLOW_BF16_GEMM, linear
    from moespec.models.packed import PackedExperts, packing_supported
    from moespec.prepack import pack
    hf_models.build(family, tmp_path / "m", seed=5, dtype=torch.bfloat16)
    dense = load_model(tmp_path / "m", dtype="bfloat16", auto_layout=False, pack=False)
    packed = load_model(tmp_path / "m", dtype="bfloat16", auto_layout=False, pack=True)
    layer = next(iter(packed.experts.pools))
    if packing_supported():      # native bf16 here: every weight matrix and expert is prepacked
        assert packed.w.layers[0].attn.wqkv.layout == torch._mkldnn and packed.w.lm_head.layout == torch._mkldnn
        assert isinstance(packed.experts.pool(layer), PackedExperts)
        assert packed.w.embed.layout == torch.strided      # the embedding lookup stays dense
    else:                        # no native bf16: packing is refused, weights stay dense, and rightly so
        assert packed.w.layers[0].attn.wqkv.layout == torch.strided
        assert not isinstance(packed.experts.pool(layer), PackedExperts)
        w, x = torch.ones(16, 16, dtype=torch.bfloat16), torch.ones(1, 16, dtype=torch.bfloat16)
        try:
            refused = SLOW_BF16_GEMM or not torch.equal(linear(x, pack(w)), torch.nn.functional.linear(x, w))
        except (RuntimeError, AttributeError):
            refused = True
        assert refused
        return                   # nothing packed: the logits below would compare dense with dense
    assert torch.equal(packed.experts.pool(layer).flat(), dense.experts.pool(layer).flat())
    toks = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])
    out = {}
    for name, m in (("dense", dense), ("packed", packed)):
        kv = m.new_cache(2, 16)
        prefill = m.forward(toks, kv).logits
        kv.advance(6)
        out[name] = (prefill, m.forward(torch.tensor([[13], [14]]), kv).logits)     # then one decode step
    assert torch.equal(out["dense"][0], out["packed"][0]) and torch.equal(out["dense"][1], out["packed"][1])


def test_bf16_products_run_at_a_bounded_set_of_row_counts():
    """oneDNN keeps what it builds per bf16 product shape for good: rows past 16 are padded to a bucket, so a server
    that sees every row count keeps a bounded set of shapes; the padded rows are dropped."""
    from moespec.models.layers import linear, row_bucket
    assert [row_bucket(m) for m in (1, 16, 17, 32, 33, 256, 257, 321)] == [1, 16, 32, 32, 48, 256, 320, 384]
    assert len({row_bucket(m) for m in range(1, 2049)}) == 16 + 15 + 28
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g).to(torch.bfloat16)
    x = torch.randn(3, 7, 32, generator=g).to(torch.bfloat16)          # 21 rows: run as 32
    got = linear(x, w)
    assert got.shape == (3, 7, 64) and got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), x.float() @ w.float().T, atol=0.1, rtol=0.02)
