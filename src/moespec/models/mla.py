"""Multi-head latent attention (DeepSeek-V2/V3): the KV cache keeps, per token and layer, one kv_lora_rank latent
and one rope key shared by every head, instead of H keys and values.

Run in the weight-absorbed form (as vLLM and SGLang run it): each head's query is taken into the latent space
through its slice of kv_b_proj, attends over [latent | rope key] directly, and its output leaves the latent space
through the value slice; keys and values are never expanded. Shapes: B rows, T new tokens, L cached, H heads,
C kv_lora_rank, R qk_rope_head_dim, N qk_nope_head_dim, Vd v_head_dim, D hidden.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..kv_cache import KVCache
from .layers import apply_rope, linear, rms_norm


@dataclass
class MLAWeights:
    wx: torch.Tensor                     # [Q + C + R, D]: everything computed from x in one product: the query (Q =
                                         # H * (N + R)) or its LoRA down-projection (Q = q_lora_rank), the latent, the
                                         # rope key (q_proj / q_a_proj and kv_a_proj_with_mqa fused)
    kv_a_norm: torch.Tensor              # [C]
    w_kb: torch.Tensor                   # [H, N, C] float32: the key half of kv_b_proj, absorbed into the query
    w_vb: torch.Tensor                   # [H, C, Vd] float32: the value half (transposed), applied to the latent output
    wo: torch.Tensor                     # [D, H * Vd]
    q_a_norm: torch.Tensor | None = None  # with a query LoRA: its norm and up-projection [H * (N + R), Q]
    wq_b: torch.Tensor | None = None
    bx: torch.Tensor | None = None       # biases with attention_bias
    bo: torch.Tensor | None = None


def mla_attention(x: torch.Tensor, w: MLAWeights, cfg: ModelConfig, layer: int, kv: KVCache, cos: torch.Tensor,
                  sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x [B, T, D] -> [B, T, D]; writes this layer's [latent | rope key] [B, 1, T, C + R] into kv."""
    B, T, _ = x.shape
    H, N, R, C = cfg.num_heads, cfg.qk_nope_head_dim, cfg.rotary_dim, cfg.kv_lora_rank
    xs = linear(x, w.wx, w.bx)                                                  # [B, T, Q + C + R]
    q, latent, k_rot = xs.split((xs.shape[-1] - C - R, C, R), dim=-1)
    if w.wq_b is not None:
        q = linear(rms_norm(q, w.q_a_norm, cfg.rms_norm_eps), w.wq_b)
    q = q.view(B, T, H, N + R).transpose(1, 2)                                  # [B, H, T, N + R]
    latent = rms_norm(latent, w.kv_a_norm, cfg.rms_norm_eps)[:, None]          # [B, 1, T, C]
    # Queries' and the key's rope together (DeepSeek's interleaved pairs were de-interleaved in the weights at load,
    # loading/build.py: plain rope here).
    rot = apply_rope(torch.cat((q[..., N:], k_rot[:, None]), dim=1), cos, sin)  # [B, H + 1, T, R]
    keys, _ = kv.write(layer, torch.cat((latent, rot[:, H:]), dim=-1), x.new_zeros(B, 1, T, 0))   # [B, 1, L, C + R]
    # The absorbed products in float32 (small per-head matrices: faster than bf16 ones on a CPU, and the cache's width).
    f = w.w_kb.dtype
    q_lat = torch.matmul(q[..., :N].to(f), w.w_kb)                              # [B, H, T, C]
    qq = torch.cat((q_lat, rot[:, :H].to(f)), dim=-1).to(keys.dtype)
    out = F.scaled_dot_product_attention(qq, keys, keys[..., :C], attn_mask=mask, scale=cfg.softmax_scale,
                                         enable_gqa=True)                       # [B, H, T, C]
    o = torch.matmul(out.to(f), w.w_vb).transpose(1, 2).reshape(B, T, -1)      # [B, T, H * Vd]
    return linear(o.to(x.dtype), w.wo, w.bo)
