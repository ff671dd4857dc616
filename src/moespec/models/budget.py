"""The verification expert budget (MoE-Spec, METHODS.md section 2): LOSSY by design.

During a verification forward each MoE layer may compute only a kept set S of experts, chosen from the
aggregate router probability of every token of the forward; tokens whose top-K choices fall outside S are
re-routed inside it. Bytes read per layer are then bounded by |S| however many tokens are verified.

Shapes: N tokens of the forward (B*T flattened), E experts, K top-k.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MoespecError
from .routing import Routing, weigh

MODES = ("substitute", "truncate")


@dataclass
class VerifyBudget:
    """experts: keep the top-B experts per layer (clamped to [K, E]); mass: keep the smallest set whose
    normalised score reaches tau (0 < tau <= 1, at least K experts). Exactly one of the two.

    mode: "substitute" re-picks a token's top-K inside the set; "truncate" drops its choices outside it.
    decay: a token at draft depth d (0 = the pending token) weighs decay**d in the expert scores.
    """
    experts: int | None = None
    mass: float | None = None
    mode: str = "substitute"
    decay: float = 1.0

    def validate(self) -> "VerifyBudget":
        if (self.experts is None) == (self.mass is None):
            raise MoespecError("a verify budget needs exactly one of experts (top-B) or mass (tau), got "
                               f"experts={self.experts!r}, mass={self.mass!r}")
        if self.experts is not None and (not isinstance(self.experts, int) or isinstance(self.experts, bool)
                                         or self.experts < 1):
            raise MoespecError(f"verify budget experts={self.experts!r} must be a positive integer")
        if self.mass is not None and (isinstance(self.mass, bool) or not isinstance(self.mass, (int, float))
                                      or not 0 < self.mass <= 1):
            raise MoespecError(f"verify budget mass={self.mass!r} must be in (0, 1]")
        if self.mode not in MODES:
            raise MoespecError(f"verify budget mode={self.mode!r} is not one of: {', '.join(MODES)}")
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not 0 < self.decay <= 1:
            raise MoespecError(f"verify budget decay={self.decay!r} must be in (0, 1]")
        return self


def expert_scores(probs: torch.Tensor, decay: float, depth: torch.Tensor | None) -> torch.Tensor:
    """probs [N, E] float32, depth [N] long | None -> scores [E] float32.

    s_e = sum_t decay**depth_t * p_t[e]. A negative depth marks a padding token (a row with fewer drafts
    than the widest row): it is routed like the others but does not vote, so padding wastes no budget.
    """
    if depth is None:
        return probs.sum(0)
    tw = torch.pow(torch.tensor(float(decay)), depth.clamp(min=0).to(torch.float32))    # [N]
    tw = tw.masked_fill(depth < 0, 0.0)
    if not bool((tw > 0).any()):          # only padding (cannot happen in a step): every token votes
        return probs.sum(0)
    return (tw[:, None] * probs).sum(0)


def select_experts(scores: torch.Tensor, budget: VerifyBudget, top_k: int,
                   resident: torch.Tensor | None = None) -> torch.Tensor:
    """scores [E], resident [E] bool | None -> kept expert ids [n_kept] long, best first.

    Experts are ranked by score; a resident expert gets a bonus of 1e-6 x the total score, so among equal
    (or float-rounding-equal) scores the one already in fast memory wins and no bytes move; remaining
    exact ties go to the lower expert id (stable sort), so the choice is deterministic.
    """
    E = scores.shape[0]
    total = float(scores.sum())
    key = scores if resident is None else scores + 1e-6 * total * resident.to(scores.dtype)
    order = torch.argsort(key, descending=True, stable=True)                             # [E]
    if budget.experts is not None:
        n = min(max(budget.experts, top_k), E)
    else:
        # Smallest prefix whose normalised mass reaches tau; float rounding can leave the full sum a hair
        # under 1, so n is clamped to E (tau = 1 keeps every expert).
        cum = torch.cumsum(scores[order], 0) / max(total, 1e-30)
        n = min(max(int((cum < budget.mass).sum()) + 1, top_k), E)
    return order[:n]


def reroute_inside(choice: torch.Tensor, probs: torch.Tensor, w: torch.Tensor, ids: torch.Tensor,
                   inside: torch.Tensor, top_k: int, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens with a choice outside `inside` [E] bool (at least K experts) take their top-K inside it instead
    (ranked by choice [N, E]), weighted as the family weights top-K (moe.weigh from probs [N, E] float32).
    w/ids [N, K] -> (w, ids); tokens whose choices all lie inside keep them untouched."""
    ok = inside[ids]                                                                     # [N, K]
    if bool(ok.all()):
        return w, ids
    rows = ~ok.all(1)
    w, ids = w.clone(), ids.clone()
    nid = torch.topk(choice[rows].masked_fill(~inside, float("-inf")), top_k, dim=-1)[1]   # [R, K]
    w[rows], ids[rows] = weigh(probs[rows], nid, routing).to(w.dtype), nid
    return w, ids


def apply_budget(choice: torch.Tensor, probs: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, budget: VerifyBudget,
                 top_k: int, routing: Routing, depth: torch.Tensor | None = None, resident: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hold one MoE layer of a verification forward to the budget.

    choice [N, E] and probs [N, E] float32: what the router ranked experts by and their weights (moe.route_probs;
    the same softmax for softmax routing); w [N, K] (model dtype) and ids [N, K] long: the routing as the model
    computed it (route()); routing: the family's moe.Routing; depth [N] long | None: draft depth per token (< 0: padding);
    resident [E] bool | None: experts in fast memory (tie-break only).
    Returns (w [N, K], ids [N, K], kept [n_kept] long). Every id returned lies in kept.

    When kept holds every expert the forward routed to (always when B >= the union), (w, ids) are
    returned untouched, so the result is bit-identical to no budget. In "experts" mode, B >= |union|
    keeps exactly the union: a top-B by aggregate score could otherwise drop a routed expert for one no
    token chose.
    """
    N, E = probs.shape
    union = torch.unique(ids)                                                            # sorted
    if budget.experts is not None and budget.experts >= union.numel():
        return w, ids, union
    kept = select_experts(expert_scores(probs, budget.decay, depth), budget, top_k, resident)
    inside = torch.zeros(E, dtype=torch.bool)
    inside[kept] = True
    ok = inside[ids]                                                                     # [N, K]
    if bool(ok.all()):
        return w, ids, kept
    if budget.mode == "substitute":
        w, ids = reroute_inside(choice, probs, w, ids, inside, top_k, routing)
        return w, ids, kept
    rows = ~ok.all(1)                                                                    # tokens to re-route
    w, ids = w.clone(), ids.clone()
    restricted = choice.masked_fill(~inside, float("-inf"))
    # truncate: keep the natural choices inside the set, zero the others.
    rw, rid, rok = w[rows], ids[rows], ok[rows]                                          # [R, K]
    if routing.norm_topk:
        # Renormalise over the remaining choices (from the float32 probabilities, as route() does).
        p = probs[rows].gather(1, rid) * rok
        s = p.sum(-1, keepdim=True)
        rw = (torch.where(s > 0, p / s.clamp(min=1e-30), p) * routing.scale).to(w.dtype)
    else:
        rw = rw * rok
    # A token with every choice outside falls back to its best expert inside the set, weighted 1 when the
    # family renormalises (it is the only expert), else by its original softmax probability.
    none = ~rok.any(1)                                                                   # [R]
    if bool(none.any()):
        best = restricted[rows][none].argmax(-1)                                         # [R0]
        bp = probs[rows][none].gather(1, best[:, None])[:, 0]
        rid[none, 0] = best
        rok[none, 0] = True
        rw[none] = 0
        rw[none, 0] = ((torch.ones_like(bp) if routing.norm_topk else bp) * routing.scale).to(w.dtype)
    # Dropped entries point at the token's first kept expert with weight exactly 0: no expert outside the
    # set is ever touched, and each token keeps at most K nonzero-weight experts.
    first = rid.gather(1, rok.to(torch.int8).argmax(1, keepdim=True))                    # [R, 1]
    rid = torch.where(rok, rid, first)
    rw = rw.masked_fill(~rok, 0)
    w[rows], ids[rows] = rw, rid
    return w, ids, kept
