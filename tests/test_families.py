"""Every feature on the families added beyond the first four (logits and greedy parity with transformers are in
test_models.py, which runs every family): offloading, speculation, the budget, quantization, inspect,
plan from config.json alone, profile and the server. Rollback per row is tested for every family in
test_kv_cache.py."""
import json
import subprocess
import sys

import pytest
import torch

import hf_models
from moespec import LLM, SamplingParams
from moespec.config import ModelConfig, OffloadConfig
from moespec.loading import load_model

FAMILIES = ["glm4_moe", "deepseek_v2", "deepseek_v3", "granitemoe", "ernie4_5_moe", "gpt_oss", "phimoe", "llama4_text"]
PROMPTS = [[5, 17, 33, 9, 60, 2, 41], [7, 7, 120, 14], [90, 3, 3, 3, 45, 61, 8, 12, 30]]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def plain(family_dirs):
    """Each family's greedy tokens, resident, float32."""
    return {f: [o.token_ids for o in LLM(family_dirs[f][0]).generate(PROMPTS, GREEDY)] for f in FAMILIES}


@pytest.mark.parametrize("family", list(hf_models.FAMILY_CONFIGS))
def test_inspect_counts_the_parameters_transformers_holds(family, family_dirs):
    """Sizes from config.json alone (what inspect and plan show) against the model transformers builds; routers'
    correction biases, which transformers holds as a buffer or a parameter depending on the family, may differ."""
    from moespec.model_info import describe
    folder, hf = family_dirs[family]
    cfg = ModelConfig.from_folder(folder)
    assert abs(describe(cfg)["params_total"] - sum(p.numel() for p in hf.parameters())) <= \
        cfg.num_experts * sum(cfg.moe_layers)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_offloaded_output_equals_resident(family, tier, family_dirs, plain, tmp_path):
    llm = LLM(family_dirs[family][0], offload=OffloadConfig(expert_cache=2, offload=tier, offload_dir=str(tmp_path)))
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == plain[family]
    assert outs[0].stats["expert_misses"] > 0
    llm.close()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec, offload", [
    ({"method": "ngram", "num_speculative_tokens": 3}, None),
    ({"method": "self", "draft_experts": 4, "num_speculative_tokens": 3}, None),
    ({"method": "self", "draft_experts": "shadow-int8", "num_speculative_tokens": 4}, "disk"),
    ({"method": "self", "draft_experts": 3, "num_speculative_tokens": 2, "draft_kv": "own"}, "disk"),
])
def test_speculative_output_equals_plain(family, spec, offload, family_dirs, plain, tmp_path):
    off = OffloadConfig(expert_cache=3, offload=offload, offload_dir=str(tmp_path), prefetch="auto") if offload else None
    llm = LLM(family_dirs[family][0], speculative=spec, offload=off)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == plain[family]
    assert outs[0].stats["draft_tokens"] > 0
    llm.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_decodes(family, family_dirs):
    """bf16 weights (prepacked where that is faster) with float32 K/V: decoding runs and stays near float32's logits."""
    folder = family_dirs[family][0]
    a, b = load_model(folder), load_model(folder, dtype="bfloat16")
    toks = torch.tensor([PROMPTS[2]])
    ref, got = a.forward(toks, a.new_cache(1, 16)).logits, b.forward(toks, b.new_cache(1, 16)).logits.float()
    assert float((got - ref).norm() / ref.norm()) < 0.05
    assert len(LLM(folder, dtype="bfloat16").generate(PROMPTS[:2], GREEDY)[1].token_ids) == 24


@pytest.mark.parametrize("family", FAMILIES)
def test_budget_and_quantization_run_and_say_they_are_lossy(family, family_dirs):
    folder = family_dirs[family][0]
    llm = LLM(folder, speculative={"method": "ngram", "num_speculative_tokens": 3,
                                   "verify_budget": ModelConfig.from_folder(folder).top_k})
    out = llm.generate(PROMPTS, GREEDY)[0]
    assert out.stats["lossy"] and out.stats["lossy_reasons"] == ["verify_budget"] and len(out.token_ids) == 24
    m, q = load_model(folder), load_model(folder, quant="int8")
    toks = torch.tensor([PROMPTS[0]])
    ref, got = m.forward(toks, m.new_cache(1, 16)).logits, q.forward(toks, q.new_cache(1, 16)).logits
    assert 0 < float((got - ref).norm() / ref.norm()) < 0.02


@pytest.mark.parametrize("family", FAMILIES)
def test_inspect_plan_profile_and_serve(family, tmp_path):
    folder = tmp_path / "m"
    hf_models.build_text_model(folder, family=family)
    run = lambda *a: subprocess.run([sys.executable, "-m", "moespec.cli", *a], capture_output=True,  # noqa: E731
                                    text=True, timeout=300)
    r = run("inspect", str(folder), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    cfg = ModelConfig.from_folder(folder)
    assert info["family"] == family and info["experts"] == cfg.num_experts
    r = run("plan", str(folder), "--memory", "1GB", "--json")
    assert r.returncode == 0 and json.loads(r.stdout), r.stderr
    (tmp_path / "p.txt").write_text("def wrap(text):\nimport os\n")
    r = run("profile", str(folder), "--prompts", str(tmp_path / "p.txt"), "--output", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    assert set(json.loads((tmp_path / "r.json").read_text())["layers"]) == {str(i) for i in cfg.moe_layer_ids}
    from fastapi.testclient import TestClient

    from moespec.serve.app import create_app
    llm = LLM(folder)
    with TestClient(create_app(llm, "m")) as c:
        reply = c.post("/v1/completions", json={"prompt": "def wrap(", "max_tokens": 8, "temperature": 0,
                                                "ignore_eos": True})
    assert reply.status_code == 200, reply.text
    want = llm.generate("def wrap(", SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))[0].text
    assert reply.json()["choices"][0]["text"] == want


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_mla_caches_the_latent_only(family, family_dirs):
    """KV bytes per token: the latent and the rope key per layer (kv_lora_rank + qk_rope_head_dim values), not H keys
    and values; equal to what transformers' own cache holds for the same tokens."""
    folder, hf = family_dirs[family]
    cfg = json.loads((folder / "config.json").read_text())
    llm = LLM(folder)
    latent = (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * cfg["num_hidden_layers"] * 4      # float32
    assert llm.kv_bytes_per_token == latent
    kv = llm.model.new_cache(1, 100)
    assert (kv.k.numel() + kv.v.numel()) * kv.k.element_size() == latent * 100
    expanded = cfg["num_attention_heads"] * (2 * cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"] + cfg["v_head_dim"])
    assert latent < expanded * cfg["num_hidden_layers"] * 4 / 2                  # less than half of expanded K and V
    out = hf(torch.tensor([PROMPTS[0]]), use_cache=True)
    theirs = sum(t.numel() * t.element_size() for layer in out.past_key_values.layers
                 for t in (layer.keys, layer.values)) / len(PROMPTS[0])
    assert llm.kv_bytes_per_token == theirs


def test_sparsemixer_equals_transformers():
    """PhiMoE's routing against transformers' own function, on logits with near ties (where the jitter matters)."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer as theirs

    from moespec.models.routing import sparsemixer
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 8, generator=g)
    logits[::4, 1] = logits[::4, 0] * 0.97                    # close seconds
    for jitter in (0.01, 0.1, 0.5):
        w, ids = sparsemixer(logits, jitter)
        tw, tids = theirs(logits, jitter, training=False)
        assert torch.equal(ids, tids) and torch.equal(w, tw)


def test_routing_takes_the_family_group_score(family_dirs):
    """DeepSeek-V2 ranks expert groups by their best expert, V3 by the sum of their two best (models/routing.py)."""
    assert load_model(family_dirs["deepseek_v2"][0]).routing.group_score == "max"
    assert load_model(family_dirs["deepseek_v3"][0]).routing.group_score == "top2"


def test_longrope_context_is_the_original_one(family_dirs):
    """PhiMoE runs LongRoPE's short factors, valid within original_max_position_embeddings (128 in the tiny config):
    generation stops there (finish_reason "length"), and a longer prompt is refused by name."""
    from moespec.errors import MoespecError
    llm = LLM(family_dirs["phimoe"][0])
    assert llm.model.max_len == 128
    out = llm.generate([[3] * 120], SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"
    with pytest.raises(MoespecError, match="context is 128"):
        llm.generate([[3] * 130], SamplingParams(max_new_tokens=2, temperature=0))


def test_llama4_multimodal_checkpoint_runs_its_text_decoder(family_dirs, tmp_path):
    """A Llama 4 checkpoint as the hub ships it: config.json nests the decoder under text_config, tensors sit under
    language_model. beside the vision encoder's; moespec runs the text decoder from it as from the text-only one."""
    from safetensors.torch import load_file, save_file
    folder = family_dirs["llama4_text"][0]
    text = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama4", "text_config": text,
                                                      "vision_config": {"hidden_size": 8}}))
    w = {"language_model." + k: v for k, v in load_file(str(folder / "model.safetensors")).items()}
    save_file({**w, "vision_model.patch_embedding.weight": torch.zeros(8, 3)}, str(tmp_path / "model.safetensors"))
    a, b = load_model(folder, auto_layout=False), load_model(tmp_path, auto_layout=False)    # (the same layouts)
    toks = torch.tensor([PROMPTS[2]])
    assert torch.equal(a.forward(toks, a.new_cache(1, 16)).logits, b.forward(toks, b.new_cache(1, 16)).logits)
