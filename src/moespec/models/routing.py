"""Routers: how a family turns a MoE layer's router logits into K experts per token and their weights.

Shapes: N tokens, D hidden, E experts, K top-k.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Routing:
    """How a family turns router logits into K experts and their weights.

    softmax (Mixtral, Qwen, OLMoE, DeepSeek-V2): softmax over E, top-K, renormalised with norm_topk. sigmoid (GLM-4.5,
    DeepSeek-V3): sigmoid scores. With a correction bias (V3, GLM-4.5, ERNIE 4.5's softmax) the choice ranks score +
    bias, the weights stay the scores. With n_group > 1 the
    choice stays inside the topk_group groups whose score is highest: the sum of a group's two best choices
    (group_score "top2", V3) or its best one ("max", V2's group-limited greedy). The weights are the chosen scores,
    renormalised with norm_topk, times scale (routed_scaling_factor)."""
    scoring: str = "softmax"
    norm_topk: bool = False
    n_group: int = 1
    topk_group: int = 1
    scale: float = 1.0
    group_score: str = "top2"
    jitter: float = 0.0            # sparsemixer (PhiMoE): how near the best an expert must be to share its softmax


def route_probs(x: torch.Tensor, router: torch.Tensor, bias: torch.Tensor | None, top_k: int, routing: Routing,
                router_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routing with what it chose from: x [N, D], router [E, D] float32, bias [E] float32 | None (sigmoid routing's
    correction), router_bias [E] float32 | None (added to the logits: gpt-oss)
    -> (w [N, K] x.dtype, ids [N, K], choice [N, E], probs [N, E]).

    choice ranks the experts (-inf outside the allowed groups), probs gives their weights (float32; the same tensor
    for softmax routing). The one implementation behind moe.route(), so the budget path routes bit-identically.
    """
    # The router is kept in float32 (load_weights): a [1, D] x [D, E] bf16 product through oneDNN costs several
    # times the float32 one, and float32 logits pick experts at least as exactly as the model's dtype would.
    logits = F.linear(x.float(), router, router_bias)
    if routing.scoring == "sparsemixer":
        w, ids = sparsemixer(logits, routing.jitter, top_k)
        return w.to(x.dtype), ids, logits, F.softmax(logits, dim=-1)
    if routing.scoring == "softmax":
        probs = F.softmax(logits, dim=-1)
        if routing.n_group == 1 and bias is None:
            w, ids = torch.topk(probs, top_k, dim=-1)
            if routing.norm_topk:
                w = w / w.sum(dim=-1, keepdim=True)
            return (w * routing.scale if routing.scale != 1.0 else w).to(x.dtype), ids, probs, probs
        choice = probs + bias if bias is not None else probs      # ERNIE 4.5: a correction of the softmax
    else:
        probs = logits.sigmoid()
        choice = probs + bias if bias is not None else probs
    if routing.n_group > 1:
        choice = _inside_groups(choice, routing)
    ids = torch.topk(choice, top_k, dim=-1)[1]
    return weigh(probs, ids, routing).to(x.dtype), ids, choice, probs


def sparsemixer(logits: torch.Tensor, jitter: float, top_k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's routing at inference (transformers' `sparsemixer` without training's sampling): the best expert, then
    the best of the rest; each weighted by a softmax over the experts whose logit lies within a relative 2 * jitter of
    it (the first among all experts, the second among the others). logits [N, E] -> (w [N, k], ids [N, k]), k =
    top_k <= 2 (a self draft may ask for one)."""
    ws, ids, rest = [], [], logits
    for _ in range(top_k):
        top, i = rest.max(dim=-1, keepdim=True)
        far = ((top - logits) / logits.abs().clamp(min=top)) > 2 * jitter
        ws.append(F.softmax(rest.masked_fill(far, float("-inf")), dim=-1).gather(1, i))
        ids.append(i)
        rest = rest.scatter(-1, i, float("-inf"))
    return torch.cat(ws, dim=-1), torch.cat(ids, dim=-1)


def _inside_groups(choice: torch.Tensor, routing: Routing) -> torch.Tensor:
    """choice [N, E] with -inf outside each token's topk_group best groups."""
    groups = choice.view(-1, routing.n_group, choice.shape[-1] // routing.n_group)           # [N, n_group, E/n]
    score = groups.topk(2, dim=-1)[0].sum(-1) if routing.group_score == "top2" else groups.max(-1).values
    best = torch.topk(score, routing.topk_group, dim=-1)[1]                                    # [N, topk_group]
    keep = torch.zeros_like(score, dtype=torch.bool).scatter_(1, best, True)
    return choice.masked_fill(~keep[..., None].expand_as(groups).reshape(choice.shape), float("-inf"))


def weigh(probs: torch.Tensor, ids: torch.Tensor, routing: Routing) -> torch.Tensor:
    """The weights [N, K] float32 of chosen experts ids [N, K] from probs [N, E], as the family weighs them."""
    w = probs.gather(1, ids)
    if routing.norm_topk:
        w = w / (w.sum(dim=-1, keepdim=True) + (1e-20 if routing.scoring == "sigmoid" else 0.0))
    return w * routing.scale if routing.scale != 1.0 else w
