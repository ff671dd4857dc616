"""The decoder-only transformer every supported family shares.

Families differ only in config-driven details (q/k norms, biases, router renormalisation, shared
expert, dense layers), so one forward serves Mixtral, Qwen2/3-MoE, OLMoE and the dense Qwen/Llama
draft models. Shapes: B rows, T new tokens, D hidden, H/G query/kv heads, hd head dim, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..errors import MoespecError
from ..kv_cache import KVCache
from .budget import VerifyBudget
from .layers import apply_rope, attend, attend_with_sinks, linear, rms_norm, rope_tables
from .mla import MLAWeights, mla_attention
from .moe import MLPWeights, MoEWeights, mlp, moe_block
from .routing import Routing


@dataclass
class AttnWeights:
    wqkv: torch.Tensor                 # [(H + 2G) * hd, D]: q, k, v projections fused
    wo: torch.Tensor                   # [D, H * hd]
    bqkv: torch.Tensor | None = None
    bo: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # [hd] (per head) or [H*hd] (full projection)
    k_norm: torch.Tensor | None = None
    qk_norm: torch.Tensor | None = None  # [H + G, hd]: per-head norms stacked, q heads then k heads
    sinks: torch.Tensor | None = None    # [H] float32: each head's sink logit (gpt-oss)


@dataclass
class LayerWeights:
    ln1: torch.Tensor
    ln2: torch.Tensor
    attn: AttnWeights | MLAWeights
    mlp: MLPWeights | None = None      # dense layer
    moe: MoEWeights | None = None      # sparse layer (experts live in the provider)
    ln1_b: torch.Tensor | None = None  # LayerNorm biases (PhiMoE's norms are LayerNorms)
    ln2_b: torch.Tensor | None = None


@dataclass
class Weights:
    embed: torch.Tensor                # [V, D]
    norm: torch.Tensor                 # [D]
    lm_head: torch.Tensor              # [V, D] (the embedding itself when tied)
    layers: list[LayerWeights]
    norm_b: torch.Tensor | None = None     # the final LayerNorm's bias (PhiMoE)
    lm_head_b: torch.Tensor | None = None  # [V] (PhiMoE)


@dataclass
class ForwardPlan:
    """What a forward should do beyond computing logits (the engine decides; the model obeys)."""
    record_routing: bool = False
    # Per MoE layer, a map [E] from each expert to the one computed in its place (self-drafting with a
    # restricted expert set: experts outside it are substituted); None = every expert as routed.
    expert_map: dict[int, torch.Tensor] | None = None
    # Per MoE layer, the experts [E] bool a token may be routed to: outside choices give way to the token's
    # top-K inside the set (self-drafting that re-routes instead of substituting); None = no restriction.
    expert_sets: dict[int, torch.Tensor] | None = None
    # Called as after_moe(layer, routed_ids [B*T, K]) once a MoE layer has computed (its experts are no
    # longer needed by this forward): draft-guided prefetch queues the routed experts from here.
    after_moe: Callable[[int, torch.Tensor], None] | None = None
    # Cheaper forwards for self-drafting: route each token to top_k experts instead of the model's K, and
    # run only the first `layers` decoder layers (then the final norm and LM head). None = as the model.
    top_k: int | None = None
    layers: int | None = None
    # Verification expert budget (models/budget.py, LOSSY): each MoE layer computes only a kept set of
    # experts; depth [B*T] long is each flattened token's draft depth (0 = pending, < 0 = padding).
    budget: VerifyBudget | None = None
    depth: torch.Tensor | None = None
    # The expert provider for this forward's MoE layers (default the model's): a self drafter's shadow copies.
    experts: object | None = None


@dataclass
class ForwardOutput:
    logits: torch.Tensor               # [B, n, V] at the requested positions
    routing: list[torch.Tensor] = field(default_factory=list)  # per MoE layer: expert ids [B*T, K]
    hidden: torch.Tensor | None = None  # final normed hidden [B, n, D]
    kept: list[int] = field(default_factory=list)  # per MoE layer: distinct experts computed (plans with a budget)


class DecoderLM:
    def __init__(self, cfg: ModelConfig, weights: Weights, experts, dtype: torch.dtype, device="cpu",
                 kv_dtype: torch.dtype | None = None):
        self.cfg, self.w, self.experts = cfg, weights, experts
        self.dtype, self.device = dtype, torch.device(device)
        self.quant = None                   # QuantConfig when load_model quantized weights (lossy)
        self.checkpoint_dtype = None        # the dtype the checkpoint is stored in, when loaded from one
        # bf16/fp16 models keep K and V in float32 on CPU: a one-query bf16 attention costs several times the
        # float32 one there, the more so the longer the context, for 2x the KV memory.
        self.kv_dtype = kv_dtype or (torch.float32 if self.device.type == "cpu" else dtype)
        self.max_len = cfg.max_position_embeddings
        # RoPE tables grow with the positions used (up to the context limit, with slack past it: draft tokens of a
        # sequence at its limit are verified, never emitted): a config's 262144 positions cost nothing until used.
        self.cos, self.sin = rope_tables(cfg, min(self.max_len, 4096) + 256, dtype, self.device)
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.routing = Routing(cfg.scoring, cfg.norm_topk_prob, cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor,
                               cfg.group_score, cfg.router_jitter)

    def _grow_rope(self, n: int) -> None:
        limit = self.max_len + 256
        if n > limit:
            raise MoespecError(f"position {n - 1} is past the model's context ({self.max_len} positions)")
        self.cos, self.sin = rope_tables(self.cfg, min(limit, max(n, 2 * self.cos.shape[0])), self.dtype,
                                         self.device)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        c = self.cfg
        if c.attention == "mla":                # one [latent | rope key] per token and layer (models/mla.py)
            return KVCache(c.num_layers, batch, capacity, 1, c.kv_lora_rank + c.rotary_dim, self.kv_dtype,
                           self.device, v_dim=0)
        return KVCache(c.num_layers, batch, capacity, c.num_kv_heads, c.head_dim, self.kv_dtype, self.device)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, kv: KVCache, positions: torch.Tensor | None = None,
                tree: torch.Tensor | None = None, logits_at: torch.Tensor | None = None,
                plan: ForwardPlan | None = None) -> ForwardOutput:
        """tokens [B, T] are written after each row's committed KV (not committed: see KVCache.advance).

        positions [B, T]: rope positions (default: committed length + 0..T-1; trees pass depths).
        tree [T, T] bool, or [B, T, T] one per row: visibility among the new tokens (default causal).
        logits_at [B, n]: which of the T positions get logits (default all).
        """
        c = self.cfg
        B, T = tokens.shape
        kv.check_room(T)
        n_layers = plan.layers if plan is not None and plan.layers else len(self.w.layers)
        cos, sin, masks, qscale = self._positional(T, kv, positions, tree, n_layers)
        record = [] if plan is not None and plan.record_routing else None
        budget = (plan.budget, plan.depth) if plan is not None and plan.budget is not None else None
        kept = [] if budget is not None else None
        h = F.embedding(tokens, self.w.embed)                                      # [B, T, D]
        if c.embedding_multiplier != 1.0:
            h = h * c.embedding_multiplier
        r = c.residual_multiplier                  # GraniteMoE scales each block's output; 1.0 elsewhere
        top_k = plan.top_k if plan is not None and plan.top_k else c.top_k
        experts = plan.experts if plan is not None and plan.experts is not None else self.experts
        for i, lw in enumerate(self.w.layers[:n_layers]):
            a = self._attention(self._norm(h, lw.ln1, lw.ln1_b), lw.attn, i, kv, cos, sin, masks[c.span(i)], qscale)
            h = h + (a if r == 1.0 else a * r)
            x = self._norm(h, lw.ln2, lw.ln2_b)
            if lw.moe is not None:
                x2 = x.reshape(B * T, -1)
                experts.observe(i, x2)          # lets a prefetcher guess later layers' experts early
                emap = plan.expert_map.get(i) if plan is not None and plan.expert_map is not None else None
                eset = plan.expert_sets.get(i) if plan is not None and plan.expert_sets is not None else None
                rec = record if record is not None or plan is None or plan.after_moe is None else []
                y = moe_block(x2, lw.moe, i, experts, top_k, self.routing, rec, emap,
                              budget, kept, eset)
                h = h + (y.view(B, T, -1) if r == 1.0 else y.view(B, T, -1) * r)
                if plan is not None and plan.after_moe is not None:
                    plan.after_moe(i, rec[-1])
            else:
                y = mlp(x, lw.mlp)
                h = h + (y if r == 1.0 else y * r)
        if logits_at is not None:
            h = torch.gather(h, 1, logits_at[:, :, None].expand(-1, -1, h.shape[-1]))
        h = self._norm(h, self.w.norm, self.w.norm_b)
        logits = linear(h, self.w.lm_head, self.w.lm_head_b)
        if c.logits_scaling != 1.0:
            logits = logits / c.logits_scaling
        return ForwardOutput(logits, record or [], h, kept or [])

    def _positional(self, T: int, kv: KVCache, positions: torch.Tensor | None, tree: torch.Tensor | None,
                    n_layers: int) -> tuple:
        """What position decides for T new tokens: rope tables cos / sin [B, 1, T, rope_dim], one visibility mask per
        distinct attention span (gpt-oss alternates sliding and full layers, Llama 4 chunked and full ones), and Llama
        4's query temperature [B, 1, T, 1] (None for other families)."""
        c, given = self.cfg, positions
        if positions is None:
            positions = kv.lens_tensor()[:, None] + torch.arange(T, device=self.device)[None, :]
            top = max(kv.lens) + T
        else:
            top = int(positions.max()) + 1
        if top > self.cos.shape[0]:
            self._grow_rope(top)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        masks = {sp: kv.mask(T, tree, sp[0], given, sp[1]) for sp in {c.span(i) for i in range(n_layers)}}
        qscale = None
        if c.attn_temperature is not None:      # Llama 4's no-rope layers: queries scaled up with the position
            floor, scale = c.attn_temperature
            qscale = (torch.log1p(torch.floor((positions.float() + 1.0) / floor)) * scale + 1.0)[:, None, :, None]
        return cos, sin, masks, qscale

    def _norm(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.cfg.norm == "layer":            # PhiMoE: LayerNorm with a bias
            return F.layer_norm(x, (x.shape[-1],), w, b, self.cfg.rms_norm_eps)
        return rms_norm(x, w, self.cfg.rms_norm_eps)

    def _attention(self, x, aw: AttnWeights | MLAWeights, layer: int, kv: KVCache, cos, sin, mask, qscale=None
                   ) -> torch.Tensor:
        c = self.cfg
        if c.attention == "mla":
            return mla_attention(x, aw, c, layer, kv, cos, sin, mask)
        B, T, _ = x.shape
        H, G = c.num_heads, c.num_kv_heads
        qkv = linear(x, aw.wqkv, aw.bqkv)                                     # [B, T, (H + 2G) hd]
        if c.qk_norm == "full" or c.clip_qkv is not None:  # OLMoE: norm over whole projections, then clip
            q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
            if c.qk_norm == "full":
                q, k = rms_norm(q, aw.q_norm, c.rms_norm_eps), rms_norm(k, aw.k_norm, c.rms_norm_eps)
            if c.clip_qkv is not None:
                q, k, v = (t.clamp(-c.clip_qkv, c.clip_qkv) for t in (q, k, v))
            qkv = torch.cat((q, k, v), dim=-1)
        # q and k heads go through norm and rope together: half the ops of doing them apart.
        qk = qkv[..., :self.q_size + self.kv_size].view(B, T, H + G, c.head_dim)
        if c.qk_norm == "head":                 # Qwen3: per-head norm, q and k with their own weights
            qk = rms_norm(qk, None, c.rms_norm_eps) * aw.qk_norm
        qk = qk.transpose(1, 2)                                                   # [B, H + G, T, hd]
        if not c.has_rope(layer):               # Llama 4's no-rope layers: no rotation, queries scaled by position
            if qscale is not None:
                qk = torch.cat(((qk[:, :H] * qscale).to(qk.dtype), qk[:, H:]), dim=1)     # (qscale is float32)
        elif c.rotary_dim and c.rotary_dim < c.head_dim:    # partial rotary (GLM-4.5): the rest passes through
            r = c.rotary_dim
            qk = torch.cat((apply_rope(qk[..., :r], cos, sin), qk[..., r:]), dim=-1)
        else:
            qk = apply_rope(qk, cos, sin)
            if c.qk_norm == "l2":               # Llama 4: q and k L2-normalised after the rotation
                qk = rms_norm(qk, None, c.rms_norm_eps)
        v = qkv[..., self.q_size + self.kv_size:].view(B, T, G, c.head_dim).transpose(1, 2)
        keys, values = kv.write(layer, qk[:, H:], v)
        if aw.sinks is not None:
            return linear(attend_with_sinks(qk[:, :H], keys, values, mask, aw.sinks, c.softmax_scale), aw.wo, aw.bo)
        return linear(attend(qk[:, :H], keys, values, mask, c.softmax_scale), aw.wo, aw.bo)
