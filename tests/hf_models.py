"""Tiny random Hugging Face checkpoints per family, built with transformers' own config classes."""
from __future__ import annotations

from pathlib import Path

import torch

FAMILY_CONFIGS = {
    # GQA 4:2, head_dim != hidden/heads, odd vocab
    "mixtral": dict(model_type="mixtral", vocab_size=257, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=24, num_local_experts=6,
                    num_experts_per_tok=2, max_position_embeddings=512, tie_word_embeddings=False),
    # shared expert with sigmoid gate, qkv bias, a dense layer via mlp_only_layers, norm_topk_prob false
    "qwen2_moe": dict(model_type="qwen2_moe", vocab_size=301, hidden_size=48, intermediate_size=80,
                      moe_intermediate_size=32, shared_expert_intermediate_size=40, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, num_experts=5, num_experts_per_tok=2,
                      mlp_only_layers=[1], max_position_embeddings=512, tie_word_embeddings=False),
    # q/k norm per head, decoder_sparse_step 2 (layers 0, 2 dense), GQA 4:1, norm_topk_prob true, tied
    "qwen3_moe": dict(model_type="qwen3_moe", vocab_size=263, hidden_size=64, intermediate_size=96,
                      moe_intermediate_size=40, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
                      head_dim=32, num_experts=8, num_experts_per_tok=3, decoder_sparse_step=2,
                      norm_topk_prob=True, max_position_embeddings=512, tie_word_embeddings=True),
    # q/k norm over the full projections, MHA
    "olmoe": dict(model_type="olmoe", vocab_size=211, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
                  max_position_embeddings=512, tie_word_embeddings=False),
    # sigmoid routing over 2 groups (1 chosen) with a correction bias and a scaling factor, one ungated shared
    # expert, a first dense layer, partial rotary (12 of 24 head dims), per-head q/k norm, qkv bias
    "glm4_moe": dict(model_type="glm4_moe", vocab_size=211, hidden_size=64, intermediate_size=96,
                     moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=24, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, n_group=2,
                     topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5, use_qk_norm=True,
                     attention_bias=True, max_position_embeddings=512, tie_word_embeddings=False),
    # MLA without a query LoRA (V2-Lite), uneven head dims (nope 16, rope 8, v 12), softmax routing limited to 1 of 2
    # expert groups, two shared experts, a first dense layer, tied head
    "deepseek_v2": dict(model_type="deepseek_v2", vocab_size=223, hidden_size=64, intermediate_size=96,
                        moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                        q_lora_rank=None, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2, n_group=2, topk_group=1,
                        topk_method="group_limited_greedy", routed_scaling_factor=1.5, first_k_dense_replace=1,
                        max_position_embeddings=512, tie_word_embeddings=True),
    # MLA with a query LoRA and attention biases, sigmoid routing with a correction bias over groups, YaRN with mscale
    # (the attention scale changes too), interleaved rope, untied head
    "deepseek_v3": dict(model_type="deepseek_v3", vocab_size=229, hidden_size=64, intermediate_size=96,
                        moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                        q_lora_rank=20, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                        n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, n_group=4, topk_group=2,
                        routed_scaling_factor=2.5, first_k_dense_replace=1, max_position_embeddings=512,
                        attention_bias=True, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                         "original_max_position_embeddings": 128, "mscale": 1.0,
                                         "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1},
                        tie_word_embeddings=False),
    # multipliers on the embeddings, the residual branches, the attention scale and the logits; attention bias
    "granitemoe": dict(model_type="granitemoe", vocab_size=233, hidden_size=48, intermediate_size=40,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=6,
                       num_experts_per_tok=2, embedding_multiplier=6.0, residual_multiplier=0.4,
                       attention_multiplier=0.05, logits_scaling=3.0, attention_bias=True,
                       max_position_embeddings=512, tie_word_embeddings=True),
    # softmax routing whose choice adds a correction bias, MoE layers 1 and 3 only (start 1, interval 2), two
    # ungated shared experts, rope on interleaved pairs, GQA 4:1, tied head
    "ernie4_5_moe": dict(model_type="ernie4_5_moe", vocab_size=239, hidden_size=64, intermediate_size=96,
                         moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
                         moe_num_experts=6, moe_k=2, moe_num_shared_experts=2, moe_layer_start_index=1,
                         moe_layer_interval=2, max_position_embeddings=512, tie_word_embeddings=True),
    # sinks, sliding-window layers (window 5) between full ones, biases on attention, router and experts, the clamped
    # SwiGLU, YaRN (factor 32), GQA 4:2; experts in MXFP4 with the "gpt_oss_mxfp4" variant (build_gpt_oss_mxfp4)
    "gpt_oss": dict(model_type="gpt_oss", vocab_size=241, hidden_size=64, intermediate_size=64, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=6,
                    num_experts_per_tok=2, sliding_window=5, swiglu_limit=3.0, max_position_embeddings=512,
                    rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                                     "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 16},
                    tie_word_embeddings=False),
    # sparsemixer routing (jitter 0.1 so the second expert's softmax spans several), LayerNorms with biases, attention
    # and LM head biases, LongRoPE's short factors within its original context of 128 positions, GQA 4:2
    "phimoe": dict(model_type="phimoe", vocab_size=227, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
                   router_jitter_noise=0.1, attention_bias=True, lm_head_bias=True, max_position_embeddings=512,
                   rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                    "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
                                    "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 24.0, 32.0, 40.0],
                                    "short_mscale": 1.19, "long_mscale": 1.24,
                                    "original_max_position_embeddings": 128},
                   tie_word_embeddings=False),
    # Llama 4's text decoder: layers 1 and 3 MoE (top-1 sigmoid router scaling the expert's input, a shared expert),
    # 0 and 2 dense; rope (interleaved pairs) + L2 q/k norm + chunks of 6 positions on layers 0 and 2, no rope and
    # query temperature (floor_scale 4, so it varies within the test's positions) on 1 and 3; GQA 4:2
    "llama4_text": dict(model_type="llama4_text", vocab_size=233, hidden_size=64, intermediate_size=32,
                        intermediate_size_mlp=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, num_local_experts=6, num_experts_per_tok=1, interleave_moe_layer_step=2,
                        no_rope_layer_interval=2, attention_chunk_size=6, floor_scale=4, attn_scale=0.5,
                        max_position_embeddings=512, tie_word_embeddings=False),
}
# A dense model, as the draft-model drafter uses (same family code path, no experts).
DENSE_CONFIGS = {
    "qwen3": dict(model_type="qwen3", vocab_size=263, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                  tie_word_embeddings=True),
}


def build(family: str, folder: Path, seed: int = 0, fused: bool = False, dtype=torch.float32, **overrides):
    """Save a random model of `family` into folder; returns the transformers model (eval, float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    spec = dict({**FAMILY_CONFIGS, **DENSE_CONFIGS}[family], **overrides)
    mt = spec.pop("model_type")
    cfg = AutoConfig.for_model(mt, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    # Random init gives near-uniform routers; sharpen them so routing is decisive and realistic.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("gate.weight", "router.weight")) and p.shape[0] > 1:
                p.normal_(0, 1.0)
        for n, b in [*model.named_buffers(), *model.named_parameters()]:
            if n.endswith(("e_score_correction_bias", "router.bias", "proj_bias", "sinks", "layernorm.bias",
                           "norm.bias", "lm_head.bias")):                        # zero at init: make it matter
                b.normal_(0, 0.3)
    model.to(dtype).save_pretrained(folder, save_original_format=not fused)
    return model.float()


CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tokenizer(folder: Path, vocab_size: int = 300) -> int:
    """A byte-level BPE trained on a little stdlib source, with ChatML specials; returns its size."""
    import inspect
    import json
    import textwrap

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    text = inspect.getsource(textwrap)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "chat_template": CHATML}))
    return tok.get_vocab_size()


def build_text_model(folder: Path, family: str = "qwen3_moe", seed: int = 0, eos=(0, 2), **overrides):
    """A tiny model with a real tokenizer and generation_config.json (eos as a list)."""
    import json
    n = build_tokenizer(folder)
    hf = build(family, folder, seed=seed, vocab_size=n, **overrides)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": list(eos), "do_sample": False}))
    return hf


def build_gpt_oss_mxfp4(folder: Path, seed: int = 0, **overrides):
    """A tiny gpt-oss whose experts are stored as the hub stores them: MXFP4 blocks and scales, gate and up rows
    interleaved, with `quantization_config` in config.json. Returns the transformers model holding the same (exactly
    dequantized) expert weights, in float32."""
    from moespec.loading.gpt_oss import write_mxfp4_experts
    hf = build("gpt_oss", folder, seed=seed, **overrides)
    experts = write_mxfp4_experts(folder)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name in experts:
                p.copy_(experts[name])
    return hf


HARMONY_SPECIALS = ["<|endoftext|>", "<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>"]
HARMONY_TEMPLATE = ("{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>{% endfor %}"
                    "{% if add_generation_prompt %}<|start|>assistant{% endif %}")


def build_scripted_gpt_oss(folder: Path, reply: list[str]) -> list[int]:
    """A tiny gpt-oss with a harmony-style tokenizer whose greedy continuation of any chat prompt is `reply` (token
    strings, each a single token, none repeated): attention and experts write nothing to the residual stream, so each
    next token depends on the current one alone, and the head maps each token of the chain to the next. Returns the
    reply's token ids."""
    import json

    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer
    n = build_tokenizer(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens(HARMONY_SPECIALS[1:])
    tok.add_tokens([t for t in reply if tok.token_to_id(t) is None])
    tok.save(str(folder / "tokenizer.json"))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": HARMONY_TEMPLATE,
                                                               "eos_token": "<|return|>"}))
    build("gpt_oss", folder, vocab_size=tok.get_vocab_size())
    f = folder / "model.safetensors"
    w = load_file(str(f))
    for k in list(w):
        if k.endswith(("o_proj.weight", "o_proj.bias", "experts.down_proj", "experts.down_proj_bias")):
            w[k].zero_()
    emb = w["model.embed_tokens.weight"]
    chain = [tok.encode("<|start|>assistant").ids[-1]] + [tok.token_to_id(t) for t in reply]
    for a, b in zip(chain, chain[1:]):
        w["lm_head.weight"][b] = emb[a] / emb[a].pow(2).mean().sqrt()       # the token after a is b
    save_file(w, str(f), metadata={"format": "pt"})
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.token_to_id("<|return|>")]}))
    assert n <= tok.get_vocab_size()
    return chain[1:]
