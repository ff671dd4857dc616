"""Routers and the MoE feed-forward block.

Shapes: N tokens (B*T flattened), D hidden, E experts, K top-k, S pool slots, I expert width.
"""
from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..experts.pool import ExpertPool
from .budget import apply_budget, reroute_inside
from .routing import Routing, route_probs
from .layers import linear


def silu_glu(gu: torch.Tensor) -> torch.Tensor:
    """SwiGLU: gate+up [N, 2I] -> [N, I]."""
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


@dataclass(frozen=True)
class ClampedGLU:
    """gpt-oss's SwiGLU: the gate clamped above and the up projection both sides at `limit`, the gate's sigmoid
    sharpened by `alpha`, and the up projection shifted by one (HF's order of operations)."""
    limit: float = 7.0
    alpha: float = 1.702

    def __call__(self, gu: torch.Tensor) -> torch.Tensor:
        g, u = gu.chunk(2, dim=-1)
        g, u = g.clamp(max=self.limit), u.clamp(min=-self.limit, max=self.limit)
        return (u + 1) * (g * torch.sigmoid(g * self.alpha))


@dataclass
class MLPWeights:
    w13: torch.Tensor          # [2I, D]: gate rows then up rows
    w2: torch.Tensor           # [D, I]


def mlp(x: torch.Tensor, w: MLPWeights) -> torch.Tensor:
    return linear(silu_glu(linear(x, w.w13)), w.w2)


@dataclass
class MoEWeights:
    router: torch.Tensor                  # [E, D] float32, whatever the model's dtype
    shared: MLPWeights | None = None      # shared expert(s), run on every token (Qwen2-MoE, GLM-4.5, DeepSeek)
    shared_gate: torch.Tensor | None = None  # [1, D], sigmoid gate of the shared expert (Qwen2-MoE); None = ungated
    bias: torch.Tensor | None = None      # [E] float32: sigmoid routing's score correction (choice only)
    router_bias: torch.Tensor | None = None  # [E] float32: added to the router logits (gpt-oss)
    act: Callable[[torch.Tensor], torch.Tensor] = silu_glu   # the experts' gate+up [N, 2I] -> [N, I]
    weight_input: bool = False            # the router's weight scales an expert's input, not its output (Llama 4)


def route(x: torch.Tensor, mw: MoEWeights, top_k: int, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D] -> weights [N, K] (x.dtype), ids [N, K] long."""
    w, ids, _, _ = route_probs(x, mw.router, mw.bias, top_k, routing, mw.router_bias)
    return w, ids


def expert(x: torch.Tensor, pool: ExpertPool, s: int, act=silu_glu) -> torch.Tensor:
    """Slot s's expert on x [M, D] -> [M, D] (with its biases when the pool keeps them)."""
    if pool.b13 is None:
        return linear(act(linear(x, pool.w13[s])), pool.w2[s])
    return linear(act(linear(x, pool.w13[s], pool.b13[s])), pool.w2[s], pool.b2[s])


def experts_forward(x: torch.Tensor, slots: torch.Tensor, w: torch.Tensor, pool: ExpertPool,
                    act=silu_glu, weight_input: bool = False) -> torch.Tensor:
    """Weighted sum over each token's K experts. x [N, D], slots/w [N, K] -> [N, D].

    Loops only over the distinct slots this forward hit: one token (decode) costs K small matmul
    pairs; many tokens are grouped so each expert's weights are read once.
    """
    n, k = slots.shape
    if n == 1:
        # One token (decode): a few ops per expert. Python floats for the weights (no tensor indexing per
        # expert); y * float rounds exactly as y * a 0-d tensor of the same value, so this equals sum_k's path.
        out = None
        for s, wj in zip(slots[0].tolist(), w[0].tolist()):
            y = expert(x * wj, pool, s, act) if weight_input else expert(x, pool, s, act) * wj
            out = y if out is None else out + y
        return out
    return sum_k(expert_outputs(x, slots, w, pool, act=act, weight_input=weight_input))


def expert_outputs(x: torch.Tensor, slots: torch.Tensor, w: torch.Tensor, pool: ExpertPool,
                   mask: torch.Tensor | None = None, acc: torch.Tensor | None = None, act=silu_glu,
                   weight_input: bool = False) -> torch.Tensor:
    """Each (token, k)'s weighted expert output. x [N, D], slots/w/mask [N, K] -> acc [N, K, D].

    Only entries where mask is true are written (all when None), so chunks over disjoint expert
    sets fill one acc. Every expert sees the same rows in the same order however experts are split
    into chunks or numbered into slots, and sum_k adds in k order: results are bit-identical.
    """
    n, k = slots.shape
    if acc is None:
        acc = x.new_zeros(n, k, x.shape[-1])
    flat = slots.reshape(-1)
    if mask is None:
        order = torch.argsort(flat, stable=True)
    else:
        sel = mask.reshape(-1).nonzero().squeeze(1)
        order = sel.index_select(0, torch.argsort(flat.index_select(0, sel), stable=True))
    counts = torch.bincount(flat.index_select(0, order), minlength=pool.slots).tolist()
    xs = x.index_select(0, order // k)
    ws = w.reshape(-1).index_select(0, order)[:, None]
    ys = torch.empty_like(xs)
    start = 0
    for s, c in enumerate(counts):
        if c == 0:
            continue
        seg = slice(start, start + c)
        ys[seg] = expert(xs[seg] * ws[seg], pool, s, act) if weight_input else expert(xs[seg], pool, s, act) * ws[seg]
        start += c
    acc.view(n * k, -1).index_copy_(0, order, ys)
    return acc


def sum_k(acc: torch.Tensor) -> torch.Tensor:
    """acc [N, K, D] -> [N, D], adding in k order (the order the one-token path uses)."""
    out = acc[:, 0]
    for j in range(1, acc.shape[1]):
        out = out + acc[:, j]
    return out


def routed(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, act, weight_input: bool, layer: int, experts
           ) -> torch.Tensor:
    """The routed experts' weighted sum [N, D] from this process's expert memory, in as many chunks as it yields."""
    pool = experts.pool(layer)
    out, acc = None, None
    with closing(experts.chunks(layer, ids)) as chunks:   # closing: unlock even if compute raises
        for slots, mask in chunks:
            if mask is None:
                out = experts_forward(x, slots, w, pool, act, weight_input)
            else:
                acc = expert_outputs(x, slots, w, pool, mask, acc, act, weight_input)
    return sum_k(acc) if acc is not None else out


def moe_block(x: torch.Tensor, mw: MoEWeights, layer: int, experts, top_k: int, routing: Routing,
              record: list | None, expert_map: torch.Tensor | None = None,
              budget: tuple | None = None, kept: list | None = None,
              allowed: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, D] -> [N, D]; appends this layer's routed expert ids [N, K] to `record` when asked.

    expert_map [E]: compute expert_map[e] wherever the router chose e (substitution), keeping the weights.
    allowed [E] bool: route only inside this set (a token's top-K among the allowed experts, re-weighted).
    budget (VerifyBudget, depth [N] long | None): hold the layer to a verification expert budget
    (models/budget.py, lossy); `record` still gets the routing as the router chose it.
    kept: appends the number of distinct experts this layer computes.

    The provider yields one chunk when every expert this forward needs fits in its pool (always for
    resident experts); a cache smaller than the union yields several chunks of at most S experts,
    each locked in its slots until we ask for the next one, and the chunks fill one [N, K, D] acc.
    """
    w, ids, choice, probs = route_probs(x, mw.router, mw.bias, top_k, routing, mw.router_bias)
    if record is not None:
        record.append(ids)
    if budget is not None:
        vb, depth = budget
        res = experts.cached(layer)        # cached, not resident: choices must not depend on I/O timing
        # Every expert resident (no offloading): the tie-break bonus would be uniform, so skip it.
        resident = None
        if res.numel() < probs.shape[1]:
            resident = torch.zeros(probs.shape[1], dtype=torch.bool)
            resident[res] = True
        w, ids, _ = apply_budget(choice, probs, w, ids, vb, top_k, routing, depth, resident)
    if expert_map is not None:
        ids = expert_map[ids]
    if allowed is not None:
        w, ids = reroute_inside(choice, probs, w, ids, allowed, top_k, routing)
    if kept is not None:
        kept.append(int(torch.unique(ids).numel()))
    if hasattr(experts, "dispatch"):      # expert parallelism (parallel/): each rank computes its experts' entries
        out = sum_k(experts.dispatch(layer, x, ids, w))
    else:
        out = routed(x, ids, w, mw.act, mw.weight_input, layer, experts)
    if mw.shared is not None:
        shared = mlp(x, mw.shared)
        out = out + (shared if mw.shared_gate is None else torch.sigmoid(F.linear(x, mw.shared_gate)) * shared)
    return out
