"""ModelDesc from config.json: bundled configs match the published parameter counts, every family parses."""
import json

import pytest

from moespec.perf.errors import PerfError
from moespec.perf.model import CONFIG_DIR, ModelDesc, known_model, known_names

# (name, published total params, published active params or None), from the model cards.
PUBLISHED = [("mixtral-8x7b", 46.7e9, 12.9e9), ("qwen3-30b-a3b", 30.5e9, None), ("olmoe-1b-7b", 6.9e9, None),
             ("deepseek-v2-lite", 15.7e9, 2.4e9), ("qwen2-57b-a14b", 57.4e9, 14e9), ("gpt-oss-20b", 20.9e9, 3.6e9)]


@pytest.mark.parametrize("name,total,active", PUBLISHED)
def test_bundled_configs_match_published_sizes(name, total, active):
    d = known_model(name)
    assert d.params_total == pytest.approx(total, rel=0.01)
    if active:
        assert d.active_params_per_token == pytest.approx(active, rel=0.05)
    assert d.total_bytes == pytest.approx(d.nonexpert_bytes + d.moe_layers * d.experts * d.expert_bytes)


def test_known_model_lookup_by_name_and_hf_id():
    assert set(n for n, *_ in PUBLISHED) <= set(known_names())
    assert known_model("Qwen/Qwen3-30B-A3B").name == known_model("QWEN3-30B-A3B").name
    with pytest.raises(PerfError, match="unknown model 'nope'.*mixtral-8x7b"):
        known_model("nope")


def test_family_details():
    mix = known_model("mixtral-8x7b")
    assert (mix.experts, mix.top_k, mix.moe_layers) == (8, 2, 32)
    assert mix.expert_bytes == pytest.approx(352.3e6, rel=1e-3)           # 3 x 4096 x 14336 x 2 bytes
    assert mix.kv_bytes(1) == 32 * 2 * 8 * 128 * 2
    ds = known_model("deepseek-v2-lite")
    assert (ds.moe_layers, ds.dense_layers, ds.experts, ds.top_k) == (26, 1, 64, 6)
    assert ds.kv_values == 512 + 64                                         # compressed MLA cache
    oss = known_model("gpt-oss-20b")
    assert oss.expert_bits == 4.25 and any("MXFP4" in n for n in oss.notes)
    assert oss.total_bytes == pytest.approx(13.8e9, rel=0.03)               # the published checkpoint size
    assert oss.full_attn_layers == 12 and oss.sliding_window == 128
    assert oss.kv_bytes(4096) < 4096 * oss.kv_bytes(1)                      # sliding layers keep 128 positions
    q2 = known_model("qwen2-57b-a14b")
    assert q2.moe_dense_params == 64 * 3584 + 3 * 3584 * 20480 + 3584       # router + shared expert + its gate
    bf = mix.with_precision(4.0)
    assert bf.total_bytes == pytest.approx(2 * mix.total_bytes)
    assert mix.with_precision(expert_bits=4.5).expert_bytes == pytest.approx(mix.expert_bytes * 4.5 / 16)


def test_other_families_parse_to_published_sizes():
    v3 = {"model_type": "deepseek_v3", "hidden_size": 7168, "vocab_size": 129280, "num_hidden_layers": 61,
          "num_attention_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
          "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 256, "n_shared_experts": 1,
          "num_experts_per_tok": 8, "moe_intermediate_size": 2048, "intermediate_size": 18432,
          "first_k_dense_replace": 3, "moe_layer_freq": 1, "num_nextn_predict_layers": 1}
    d = ModelDesc.from_config(v3)
    assert d.params_total == pytest.approx(671e9, rel=0.01)
    assert d.active_params_per_token == pytest.approx(37e9, rel=0.05)
    phi = {"model_type": "phimoe", "hidden_size": 4096, "intermediate_size": 6400, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 16, "num_experts_per_tok": 2,
           "vocab_size": 32064, "attention_bias": True, "lm_head_bias": True}
    assert ModelDesc.from_config(phi).params_total == pytest.approx(41.9e9, rel=0.01)
    gr = {"model_type": "granitemoe", "hidden_size": 1536, "intermediate_size": 512, "num_hidden_layers": 32,
          "num_attention_heads": 24, "num_key_value_heads": 8, "num_local_experts": 40, "num_experts_per_tok": 8,
          "vocab_size": 49155, "tie_word_embeddings": True}
    assert ModelDesc.from_config(gr).params_total == pytest.approx(3.3e9, rel=0.03)
    air = {"model_type": "glm4_moe", "hidden_size": 4096, "num_hidden_layers": 46, "num_attention_heads": 96,
           "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 10944, "moe_intermediate_size": 1408,
           "n_routed_experts": 128, "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 1,
           "vocab_size": 151552, "attention_bias": True, "num_nextn_predict_layers": 1}      # GLM-4.5-Air
    d = ModelDesc.from_config(air)
    assert d.params_total == pytest.approx(106e9, rel=0.01)
    assert d.active_params_per_token == pytest.approx(12e9, rel=0.08)
    ernie = {"model_type": "ernie4_5_moe", "hidden_size": 2560, "intermediate_size": 12288, "num_hidden_layers": 28,
             "num_attention_heads": 20, "num_key_value_heads": 4, "head_dim": 128, "moe_intermediate_size": 1536,
             "moe_k": 6, "moe_num_experts": 64, "moe_num_shared_experts": 2, "moe_layer_start_index": 1,
             "vocab_size": 103424, "tie_word_embeddings": True}                            # ERNIE-4.5-21B-A3B
    d = ModelDesc.from_config(ernie)
    assert d.params_total == pytest.approx(21e9, rel=0.05)
    assert d.active_params_per_token == pytest.approx(3e9, rel=0.15)
    scout = {"model_type": "llama4_text", "hidden_size": 5120, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
             "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
             "num_local_experts": 16, "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "vocab_size": 202048,
             "attention_chunk_size": 8192}                                      # Llama-4-Scout-17B-16E (text)
    d = ModelDesc.from_config({"model_type": "llama4", "text_config": scout})  # the multimodal config nests it
    assert d.params_total == pytest.approx(109e9, rel=0.02)                    # (published with its vision encoder)
    assert d.active_params_per_token == pytest.approx(17e9, rel=0.08)
    assert d.full_attn_layers == 12 and d.sliding_window == 8192               # chunked on 3 of 4 layers
    maverick = {**scout, "num_local_experts": 128, "interleave_moe_layer_step": 2}   # Llama-4-Maverick-17B-128E
    d = ModelDesc.from_config(maverick)
    assert d.params_total == pytest.approx(400e9, rel=0.02) and d.moe_layers == 24
    assert d.active_params_per_token == pytest.approx(17e9, rel=0.08)
    # transformers 5 writes Qwen3-MoE's expert count as num_local_experts
    q3 = json.loads((CONFIG_DIR / "qwen3-30b-a3b.json").read_text())
    q3["num_local_experts"] = q3.pop("num_experts")
    assert ModelDesc.from_config(q3).experts == 128


def test_bad_configs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unsupported model_type 'mamba'.*mixtral"):
        ModelDesc.from_config({"model_type": "mamba"})
    with pytest.raises(PerfError, match="missing the field 'num_local_experts'"):
        ModelDesc.from_config({"model_type": "mixtral", "hidden_size": 8, "vocab_size": 8, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "intermediate_size": 16, "num_experts_per_tok": 2})
    with pytest.raises(PerfError, match="no config.json"):
        ModelDesc.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(PerfError, match="not valid JSON"):
        ModelDesc.from_file(tmp_path)
