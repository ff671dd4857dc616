"""Random Mixtral-shaped checkpoints for benchmarks that need a given size, written without transformers.

They carry the bundled reference model's tokenizer (vocabulary 8192), so real prompt sets work on them and
llama.cpp's converter can make a GGUF of the same weights (tools/make_gguf.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

VOCAB = 8192            # the bundled tokenizer's
PRESETS = {
    # ~115M params: the "small" model of docs/baselines (hidden 512, 8 layers, 8 experts top-2)
    "small": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=VOCAB),
    # 1.15B params, bandwidth-bound: experts of 17.3 MB in bf16 (hidden 1024, expert intermediate 2816, 16 experts)
    "large": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=8, num_local_experts=16, num_experts_per_tok=2, vocab_size=VOCAB),
}


def make_synthetic(folder: str | Path, preset: str = "small", seed: int = 0, dtype=torch.bfloat16,
                   router_std: float = 0.02, **shape) -> Path:
    """Write config.json + model.safetensors (per-expert Mixtral names) + the bundled tokenizer of a random
    model in `dtype` (bf16 by default, as checkpoints ship); reuse the folder if it holds the same config.
    shape: config fields overriding the preset's (num_local_experts=32, ...)."""
    from ..assets import REFERENCE_MODEL
    folder = Path(folder)
    cfg = dict(PRESETS[preset], **shape, model_type="mixtral", architectures=["MixtralForCausalLM"], rms_norm_eps=1e-5,
               max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=False, eos_token_id=0,
               bos_token_id=None, torch_dtype=str(dtype).removeprefix("torch."), hidden_act="silu")
    if (folder / "config.json").is_file() and json.loads((folder / "config.json").read_text()) == cfg \
            and (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    D, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, G = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = D // H

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    sd = {"model.embed_tokens.weight": rnd(V, D), "model.norm.weight": torch.ones(D, dtype=dtype),
          "lm_head.weight": rnd(V, D)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd |= {p + "input_layernorm.weight": torch.ones(D, dtype=dtype),
               p + "post_attention_layernorm.weight": torch.ones(D, dtype=dtype),
               p + "self_attn.q_proj.weight": rnd(H * hd, D), p + "self_attn.k_proj.weight": rnd(G * hd, D),
               p + "self_attn.v_proj.weight": rnd(G * hd, D), p + "self_attn.o_proj.weight": rnd(D, H * hd),
               p + "block_sparse_moe.gate.weight": rnd(cfg["num_local_experts"], D, std=router_std)}
        for e in range(cfg["num_local_experts"]):
            q = f"{p}block_sparse_moe.experts.{e}."
            sd |= {q + "w1.weight": rnd(I, D), q + "w3.weight": rnd(I, D), q + "w2.weight": rnd(D, I)}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (REFERENCE_MODEL / name).is_file():
            shutil.copyfile(REFERENCE_MODEL / name, folder / name)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return folder
