"""Routers and the MoE feed-forward block.

Shapes: N tokens (B*T flattened), D hidden, E experts, K top-k, S pool slots, I expert width.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..experts.pool import ExpertPool


@dataclass
class MLPWeights:
    w13: torch.Tensor          # [2I, D]: gate rows then up rows
    w2: torch.Tensor           # [D, I]


def mlp(x: torch.Tensor, w: MLPWeights) -> torch.Tensor:
    g, u = F.linear(x, w.w13).chunk(2, dim=-1)
    return F.linear(F.silu(g) * u, w.w2)


@dataclass
class MoEWeights:
    router: torch.Tensor                  # [E, D]
    shared: MLPWeights | None = None      # Qwen2-MoE shared expert
    shared_gate: torch.Tensor | None = None  # [1, D], sigmoid gate of the shared expert


def route(x: torch.Tensor, router: torch.Tensor, top_k: int, norm_topk: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over E -> top-K -> optional renormalisation (Mixtral always, Qwen/OLMoE by norm_topk_prob).

    x [N, D] -> weights [N, K] (x.dtype), ids [N, K] long.
    """
    probs = F.softmax(F.linear(x, router), dim=-1, dtype=torch.float32)
    w, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk:
        w = w / w.sum(dim=-1, keepdim=True)
    return w.to(x.dtype), ids


def experts_forward(x: torch.Tensor, slots: torch.Tensor, w: torch.Tensor, pool: ExpertPool) -> torch.Tensor:
    """Weighted sum over each token's K experts. x [N, D], slots/w [N, K] -> [N, D].

    Loops only over the distinct slots this forward hit: one token (decode) costs K small matmul
    pairs; many tokens are grouped so each expert's weights are read once.
    """
    n, k = slots.shape
    if n == 1:
        out = None
        for j, s in enumerate(slots[0].tolist()):
            g, u = F.linear(x, pool.w13[s]).chunk(2, dim=-1)
            y = F.linear(F.silu(g) * u, pool.w2[s]) * w[0, j]
            out = y if out is None else out + y
        return out
    flat = slots.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=pool.w13.shape[0]).tolist()
    token = order // k
    xs = x.index_select(0, token)
    ws = w.reshape(-1).index_select(0, order)[:, None]
    ys = torch.empty_like(xs)
    start = 0
    for s, c in enumerate(counts):
        if c == 0:
            continue
        seg = slice(start, start + c)
        g, u = F.linear(xs[seg], pool.w13[s]).chunk(2, dim=-1)
        ys[seg] = F.linear(F.silu(g) * u, pool.w2[s]) * ws[seg]
        start += c
    return torch.zeros_like(x).index_add_(0, token, ys)


def moe_block(x: torch.Tensor, mw: MoEWeights, layer: int, experts, top_k: int, norm_topk: bool,
              record: list | None) -> torch.Tensor:
    """x [N, D] -> [N, D]; appends this layer's expert ids [N, K] to `record` when asked."""
    w, ids = route(x, mw.router, top_k, norm_topk)
    if record is not None:
        record.append(ids)
    slots = experts.ensure(layer, ids)
    out = experts_forward(x, slots, w, experts.pool(layer))
    if mw.shared is not None:
        out = out + torch.sigmoid(F.linear(x, mw.shared_gate)) * mlp(x, mw.shared)
    return out
