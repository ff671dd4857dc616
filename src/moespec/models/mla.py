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
    wkv_a: torch.Tensor                  # [C + R, D]: the latent and the rope key (kv_a_proj_with_mqa)
    kv_a_norm: torch.Tensor              # [C]
    w_kb: torch.Tensor                   # [H, N, C]: the key half of kv_b_proj, absorbed into the query
    w_vb: torch.Tensor                   # [H, Vd, C]: the value half, applied to each head's latent output
    wo: torch.Tensor                     # [D, H * Vd]
    wq: torch.Tensor | None = None       # [H * (N + R), D] without a query LoRA (V2-Lite)
    wq_a: torch.Tensor | None = None     # [q_lora_rank, D]
    q_a_norm: torch.Tensor | None = None
    wq_b: torch.Tensor | None = None     # [H * (N + R), q_lora_rank]
    bq_a: torch.Tensor | None = None     # biases with attention_bias
    bkv_a: torch.Tensor | None = None
    bo: torch.Tensor | None = None


def rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rope on interleaved pairs (x0, x1), (x2, x3), ... (DeepSeek's layout), written out de-interleaved: evens'
    then odds' rotations (queries and keys alike, so their products are unchanged). cos/sin: rope_tables' [.., R]."""
    half = cos.shape[-1] // 2
    c, s = cos[..., :half], sin[..., half:]              # the signed table's second half is +sin
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def mla_attention(x: torch.Tensor, w: MLAWeights, cfg: ModelConfig, layer: int, kv: KVCache, cos: torch.Tensor,
                  sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x [B, T, D] -> [B, T, D]; writes this layer's [latent | rope key] [B, 1, T, C + R] into kv."""
    B, T, _ = x.shape
    H, N, R, C = cfg.num_heads, cfg.qk_nope_head_dim, cfg.rotary_dim, cfg.kv_lora_rank
    if w.wq is not None:
        q = linear(x, w.wq)
    else:
        q = linear(rms_norm(linear(x, w.wq_a, w.bq_a), w.q_a_norm, cfg.rms_norm_eps), w.wq_b)
    q = q.view(B, T, H, N + R).transpose(1, 2)                                  # [B, H, T, N + R]
    ckv = linear(x, w.wkv_a, w.bkv_a)                                          # [B, T, C + R]
    latent = rms_norm(ckv[..., :C], w.kv_a_norm, cfg.rms_norm_eps)[:, None]    # [B, 1, T, C]
    rope = apply_rope if not cfg.rope_interleave else rope_pairs
    q_rot, k_rot = rope(q[..., N:], cos, sin), rope(ckv[..., C:][:, None], cos, sin)
    keys, _ = kv.write(layer, torch.cat((latent, k_rot), dim=-1), x.new_zeros(B, 1, T, 0))    # [B, 1, L, C + R]
    q_lat = torch.einsum("bhtn,hnc->bhtc", q[..., :N], w.w_kb)                 # [B, H, T, C]
    qq = torch.cat((q_lat, q_rot), dim=-1).to(keys.dtype)
    out = F.scaled_dot_product_attention(qq, keys, keys[..., :C], attn_mask=mask, scale=cfg.softmax_scale,
                                         enable_gqa=True)                       # [B, H, T, C]
    o = torch.einsum("bhtc,hvc->bthv", out.to(x.dtype), w.w_vb).reshape(B, T, -1)   # [B, T, H * Vd]
    return linear(o, w.wo, w.bo)
