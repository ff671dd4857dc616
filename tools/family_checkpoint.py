"""A random checkpoint of about 100M parameters for a family, written by transformers itself (its config class and
its save format), with the bundled tokenizer: what the per-family decode benchmark runs on.

    python tools/family_checkpoint.py glm4_moe /tmp/fam/glm4_moe
    moespec bench /tmp/fam/glm4_moe --peer transformers --batch-size 1 --dtype float32
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

COMMON = dict(vocab_size=8192, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_experts_per_tok=2,
              max_position_embeddings=4096, tie_word_embeddings=False)
SHAPES = {
    "mixtral": dict(num_key_value_heads=4, intermediate_size=1024, num_local_experts=8),
    "qwen3_moe": dict(num_key_value_heads=4, head_dim=64, moe_intermediate_size=1024, intermediate_size=2048,
                      num_experts=8, norm_topk_prob=True),
    "glm4_moe": dict(num_key_value_heads=4, head_dim=64, moe_intermediate_size=1024, intermediate_size=2048,
                     n_routed_experts=8, n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1,
                     use_qk_norm=True),
    "deepseek_v2": dict(num_key_value_heads=8, q_lora_rank=None, kv_lora_rank=128, qk_nope_head_dim=64,
                        qk_rope_head_dim=32, v_head_dim=64, moe_intermediate_size=1024, intermediate_size=2048,
                        n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1),
    "deepseek_v3": dict(num_key_value_heads=8, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64,
                        qk_rope_head_dim=32, v_head_dim=64, moe_intermediate_size=1024, intermediate_size=2048,
                        n_routed_experts=8, n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1),
    "ernie4_5_moe": dict(num_key_value_heads=4, head_dim=64, moe_intermediate_size=1024, intermediate_size=2048,
                         moe_num_experts=8, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1),
    "gpt_oss": dict(num_key_value_heads=4, head_dim=64, intermediate_size=1024, num_local_experts=8, sliding_window=128),
    "phimoe": dict(num_key_value_heads=4, intermediate_size=1024, num_local_experts=8, attention_bias=True,
                   lm_head_bias=True),
    "llama4_text": dict(num_key_value_heads=4, head_dim=64, intermediate_size=1024, intermediate_size_mlp=2048,
                        num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=1),
    "granitemoe": dict(num_key_value_heads=4, intermediate_size=1024, num_local_experts=8, embedding_multiplier=12.0,
                       residual_multiplier=0.22, attention_multiplier=0.0078125, logits_scaling=6.0),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("family", choices=sorted(SHAPES))
    p.add_argument("out")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--mxfp4", action="store_true", help="gpt_oss: store the experts in MXFP4, as the hub's files do")
    a = p.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    from moespec.assets import REFERENCE_MODEL
    cfg = AutoConfig.for_model(a.family, **{**COMMON, **SHAPES[a.family]}, eos_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():           # decisive routers, as trained ones are
        for n, w in model.named_parameters():
            if n.endswith(("gate.weight", "router.weight")) and w.shape[0] > 1 and w.dim() == 2:
                w.normal_(0, 0.5)
    out = Path(a.out)
    model.to(getattr(torch, a.dtype)).save_pretrained(out)
    if a.mxfp4:
        from moespec.loading.gpt_oss import write_mxfp4_experts
        write_mxfp4_experts(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REFERENCE_MODEL / name, out / name)
    print(f"{a.family}: {sum(w.numel() for w in model.parameters()) / 1e6:.0f}M parameters in {out}")


if __name__ == "__main__":
    main()
