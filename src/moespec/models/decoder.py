"""The decoder-only transformer every supported family shares.

Families differ only in config-driven details (q/k norms, biases, router renormalisation, shared
expert, dense layers), so one forward serves Mixtral, Qwen2/3-MoE, OLMoE and the dense Qwen/Llama
draft models. Shapes: B rows, T new tokens, D hidden, H/G query/kv heads, hd head dim, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..kv_cache import KVCache
from .layers import apply_rope, attend, rms_norm, rope_tables
from .moe import MLPWeights, MoEWeights, mlp, moe_block


@dataclass
class AttnWeights:
    wqkv: torch.Tensor                 # [(H + 2G) * hd, D]: q, k, v projections fused
    wo: torch.Tensor                   # [D, H * hd]
    bqkv: torch.Tensor | None = None
    bo: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # [hd] (per head) or [H*hd] (full projection)
    k_norm: torch.Tensor | None = None


@dataclass
class LayerWeights:
    ln1: torch.Tensor
    ln2: torch.Tensor
    attn: AttnWeights
    mlp: MLPWeights | None = None      # dense layer
    moe: MoEWeights | None = None      # sparse layer (experts live in the provider)


@dataclass
class Weights:
    embed: torch.Tensor                # [V, D]
    norm: torch.Tensor                 # [D]
    lm_head: torch.Tensor              # [V, D] (the embedding itself when tied)
    layers: list[LayerWeights]


@dataclass
class ForwardPlan:
    """What a forward should do beyond computing logits (the engine decides; the model obeys)."""
    record_routing: bool = False


@dataclass
class ForwardOutput:
    logits: torch.Tensor               # [B, n, V] at the requested positions
    routing: list[torch.Tensor] = field(default_factory=list)  # per MoE layer: expert ids [B*T, K]
    hidden: torch.Tensor | None = None  # final normed hidden [B, n, D]


class DecoderLM:
    def __init__(self, cfg: ModelConfig, weights: Weights, experts, dtype: torch.dtype, device="cpu"):
        self.cfg, self.w, self.experts = cfg, weights, experts
        self.dtype, self.device = dtype, torch.device(device)
        self.max_len = cfg.max_position_embeddings
        self.cos, self.sin = rope_tables(cfg, self.max_len, dtype, self.device)
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        c = self.cfg
        return KVCache(c.num_layers, batch, capacity, c.num_kv_heads, c.head_dim, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, kv: KVCache, positions: torch.Tensor | None = None,
                tree: torch.Tensor | None = None, logits_at: torch.Tensor | None = None,
                plan: ForwardPlan | None = None) -> ForwardOutput:
        """tokens [B, T] are written after each row's committed KV (not committed: see KVCache.advance).

        positions [B, T]: rope positions (default: committed length + 0..T-1; trees pass depths).
        tree [T, T] bool: visibility among the new tokens (default causal).
        logits_at [B, n]: which of the T positions get logits (default all).
        """
        c = self.cfg
        B, T = tokens.shape
        kv.check_room(T)
        if positions is None:
            positions = kv.lens_tensor()[:, None] + torch.arange(T, device=self.device)[None, :]
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]     # [B, 1, T, hd]
        mask = kv.mask(T, tree, c.sliding_window)
        record = [] if plan is not None and plan.record_routing else None
        h = F.embedding(tokens, self.w.embed)                                      # [B, T, D]
        for i, lw in enumerate(self.w.layers):
            h = h + self._attention(rms_norm(h, lw.ln1, c.rms_norm_eps), lw.attn, i, kv, cos, sin, mask)
            x = rms_norm(h, lw.ln2, c.rms_norm_eps)
            if lw.moe is not None:
                y = moe_block(x.reshape(B * T, -1), lw.moe, i, self.experts, c.top_k, c.norm_topk_prob, record)
                h = h + y.view(B, T, -1)
            else:
                h = h + mlp(x, lw.mlp)
        if logits_at is not None:
            h = torch.gather(h, 1, logits_at[:, :, None].expand(-1, -1, h.shape[-1]))
        h = rms_norm(h, self.w.norm, c.rms_norm_eps)
        return ForwardOutput(F.linear(h, self.w.lm_head), record or [], h)

    def _attention(self, x, aw: AttnWeights, layer: int, kv: KVCache, cos, sin, mask) -> torch.Tensor:
        c = self.cfg
        B, T, _ = x.shape
        qkv = F.linear(x, aw.wqkv, aw.bqkv)
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        if c.qk_norm == "full":                 # OLMoE: norm over the whole projection
            q, k = rms_norm(q, aw.q_norm, c.rms_norm_eps), rms_norm(k, aw.k_norm, c.rms_norm_eps)
        if c.clip_qkv is not None:
            q, k, v = (t.clamp(-c.clip_qkv, c.clip_qkv) for t in (q, k, v))
        q = q.view(B, T, c.num_heads, c.head_dim)
        k = k.view(B, T, c.num_kv_heads, c.head_dim)
        if c.qk_norm == "head":                 # Qwen3: norm per head
            q, k = rms_norm(q, aw.q_norm, c.rms_norm_eps), rms_norm(k, aw.k_norm, c.rms_norm_eps)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        v = v.view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        keys, values = kv.write(layer, k, v)
        return F.linear(attend(q, keys, values, mask), aw.wo, aw.bo)
