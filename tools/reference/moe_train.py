"""A training-friendly implementation of the Qwen3-MoE / Qwen3 architecture.

transformers' fused 3-D expert parameters make every expert slice's backward materialise a
gradient the size of all experts, and bf16 autocast backward takes a slow path on this CPU, so
training through them ran at ~1k tokens/s. This module computes exactly the same function with
one Parameter pair per expert; `hf_state_dict` returns the weights under transformers' Qwen3-MoE
(or Qwen3) names, so the exported folder is a standard checkpoint (a test checks logits parity).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


class Attention(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        D, H, G, hd = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        self.H, self.G, self.hd = H, G, hd
        self.q_proj = nn.Linear(D, H * hd, bias=False)
        self.k_proj = nn.Linear(D, G * hd, bias=False)
        self.v_proj = nn.Linear(D, G * hd, bias=False)
        self.o_proj = nn.Linear(H * hd, D, bias=False)
        self.q_norm = RMSNorm(hd, c["rms_norm_eps"])
        self.k_norm = RMSNorm(hd, c["rms_norm_eps"])

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = rope(self.q_norm(self.q_proj(x).view(B, T, self.H, self.hd)).transpose(1, 2), cos, sin)
        k = rope(self.k_norm(self.k_proj(x).view(B, T, self.G, self.hd)).transpose(1, 2), cos, sin)
        v = self.v_proj(x).view(B, T, self.G, self.hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.G != self.H)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class Expert(nn.Module):
    def __init__(self, D: int, I: int):
        super().__init__()
        self.gate_proj = nn.Linear(D, I, bias=False)
        self.up_proj = nn.Linear(D, I, bias=False)
        self.down_proj = nn.Linear(I, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoe(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        D, self.E, self.K = c["hidden_size"], c["num_experts"], c["num_experts_per_tok"]
        self.norm = c.get("norm_topk_prob", False)
        self.gate = nn.Linear(D, self.E, bias=False)
        self.experts = nn.ModuleList(Expert(D, c["moe_intermediate_size"]) for _ in range(self.E))

    def forward(self, x):
        # x [N, D] -> out [N, D], router probs [N, E], one-hot choices [N, E]
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        w, ids = torch.topk(probs, self.K, dim=-1)
        if self.norm:
            w = w / w.sum(-1, keepdim=True)
        w = w.to(x.dtype)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.E).tolist()
        token = order // self.K
        xs = x[token]
        ws = w.reshape(-1)[order][:, None]
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n:
                outs.append(self.experts[e](xs[start:start + n]))
            start += n
        ys = torch.cat(outs) * ws
        out = torch.zeros_like(x).index_add(0, token, ys.to(x.dtype))
        chosen = torch.zeros_like(probs).scatter(1, ids, 1.0)
        return out, probs, chosen


class Block(nn.Module):
    def __init__(self, c: dict, moe: bool):
        super().__init__()
        self.self_attn = Attention(c)
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.mlp = SparseMoe(c) if moe else Expert(c["hidden_size"], c["intermediate_size"])

    def forward(self, h, cos, sin, stats):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        x = self.post_attention_layernorm(h)
        if isinstance(self.mlp, SparseMoe):
            y, probs, chosen = self.mlp(x.reshape(-1, x.shape[-1]))
            stats.append((probs, chosen))
            return h + y.view_as(h)
        return h + self.mlp(x)


class TrainLM(nn.Module):
    """Qwen3-MoE (num_experts > 0) or dense Qwen3 (no experts), tied embeddings."""

    def __init__(self, c: dict, vocab: int):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(vocab, c["hidden_size"])
        moe = c.get("num_experts", 0) > 0
        self.layers = nn.ModuleList(Block(c, moe) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        hd = c["head_dim"]
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        self.register_buffer("inv_freq", inv, persistent=False)
        std = c.get("initializer_range", 0.02)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, std)

    def forward(self, ids):
        """ids [B, T] -> logits [B, T, V] (float32), aux load-balancing loss (Switch / HF formula)."""
        B, T = ids.shape
        freqs = torch.arange(T, device=ids.device).float()[:, None] * self.inv_freq[None]
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        h = self.embed_tokens(ids)
        stats = []
        for layer in self.layers:
            h = layer(h, cos, sin, stats)
        logits = F.linear(self.norm(h), self.embed_tokens.weight)
        aux = None
        if stats:
            # Switch-style balance per layer, averaged: E * sum_e(share of assignments to e * mean prob of e),
            # 1 when uniform. Balancing the concatenation of all layers instead (as transformers' loss does)
            # let each layer collapse onto a few experts while the average stayed balanced (reference v0).
            E, K = stats[0][0].shape[1], self.c["num_experts_per_tok"]
            aux = torch.stack([E * torch.sum((c.mean(0) / K) * p.mean(0)) for p, c in stats]).mean()
        return logits, aux

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under transformers' names (per-expert layout, as Qwen3-MoE checkpoints store them)."""
        out = {}
        for k, v in self.state_dict().items():
            if k == "inv_freq":
                continue
            out["model." + k] = v
        return out
