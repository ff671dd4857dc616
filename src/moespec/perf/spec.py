"""Speculative decoding on top of the step model (MoESD, METHODS.md section 4).

One speculative step drafts k tokens (k draft forwards of one token per row) and verifies them with one
target forward of k + 1 tokens per row. With i.i.d. per-token acceptance a, a step emits on average

    sigma(a, k) = (1 - a^(k+1)) / (1 - a)      (k + 1 when a = 1; 1 when k = 0)

tokens per row, so   speedup(B, k, a) = sigma * T_target(B, 1) / (k * T_draft(B) + T_target(B, k + 1)).
Example: a = 0.8, k = 4 gives sigma = 3.36; with T(1) = 10 ms, T(5) = 25 ms and a 1 ms draft the step takes
29 ms for 3.36 tokens: 3.36 x 10 / 29 = 1.16x. Target efficiency T(1) / T(k+1) = 0.4 lies in [1/(k+1), 1].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .hardware import Hardware
from .model import ModelDesc
from .step import Offload, forward_cost

NGRAM_DRAFT_S = 20e-6   # (ours) prompt-lookup cost per drafted token: a host-side dictionary probe


def expected_accepted(a: float, k: int) -> float:
    """sigma(a, k): expected tokens emitted per step (accepted drafts + the bonus/recovered token)."""
    if k <= 0:
        return 1.0
    a = min(max(float(a), 0.0), 1.0)
    if a >= 1.0 - 1e-12:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


def speedup(a: float, k: int, t1: float, tk1: float, t_draft: float) -> float:
    """sigma(a, k) x T(1) / (k x T_draft + T(k+1)); t_draft is one draft forward (one token per row)."""
    if k <= 0:
        return 1.0
    return expected_accepted(a, k) * t1 / (k * t_draft + tk1)


def target_efficiency(t1: float, tk1: float) -> float:
    """T(1) / T(k+1): how much of one verification is 'free'. In [1/(k+1), 1] when T is non-decreasing and
    subadditive in tokens; the step model is, except for causal attention (the k+1 verified tokens also attend
    to each other), which can lower it by a relative ~k / (2 x context) of the attention share when
    compute-bound."""
    return t1 / tk1


def best_k(a: float, t_of: Callable[[int], float], t_draft: float, k_max: int = 16) -> tuple[int, float]:
    """(k, speedup) maximising the speedup over k in 0..k_max; k = 0 (plain decoding, speedup 1) when no k wins.
    `t_of(t)` is T_target(B, t)."""
    t1 = t_of(1)
    best = (0, 1.0)
    for k in range(1, k_max + 1):
        s = speedup(a, k, t1, t_of(k + 1), t_draft)
        if s > best[1] + 1e-12:
            best = (k, s)
    return best


@dataclass(frozen=True)
class Drafter:
    """How drafts are made: `self` (the target with `draft_experts` resident experts per layer: zero slow-link
    bytes), `shadow` (the target through low-bit copies of every expert, `bits` per parameter, all resident:
    zero slow-link bytes), `ngram` (prompt lookup, almost free), `draft_model` (a separate model with its own
    ModelDesc) or `oracle` (free drafts of a given acceptance: a measuring instrument, calibrate/oracle.py)."""
    kind: str
    acceptance: float
    draft_experts: float | None = None
    model: ModelDesc | None = None
    bits: float | None = None            # shadow: bits per expert parameter (int4 g64: 4.5, int8: 8 + scales)

    def draft_time(self, target: ModelDesc, hw: Hardware, batch: int, context: int) -> float:
        """Seconds for one draft forward of one token per row."""
        if self.kind in ("ngram", "oracle"):
            return NGRAM_DRAFT_S * batch
        if self.kind == "shadow":
            return forward_cost(target.with_precision(expert_bits=self.bits), hw, batch, 1, context).time
        if self.kind == "self":
            n = self.draft_experts if self.draft_experts is not None else target.experts
            return forward_cost(target, hw, batch, 1, context, experts=n).time
        if self.kind == "draft_model":
            if self.model is None:
                raise ValueError("a draft_model drafter needs its ModelDesc")
            return forward_cost(self.model, hw, batch, 1, context).time
        raise ValueError(f"unknown drafter kind {self.kind!r} (self | shadow | ngram | draft_model | oracle)")


def spec_decode(target: ModelDesc, hw: Hardware, drafter: Drafter, batch: int, context: int, k: int, *,
                offload: Offload | None = None, profile=None, budget: float | None = None,
                acceptance: float | None = None) -> dict:
    """Predicted speculative decoding at batch B with draft length k: TPOT, tokens/s, speedup, efficiency."""
    a = drafter.acceptance if acceptance is None else acceptance
    t1 = forward_cost(target, hw, batch, 1, context, offload=offload, profile=profile).time
    if k <= 0:
        return {"k": 0, "acceptance": a, "tokens_per_step": 1.0, "step_s": t1, "tpot_s": t1,
                "tokens_per_s": batch / t1, "speedup": 1.0, "target_efficiency": 1.0, "draft_s": 0.0}
    verify = forward_cost(target, hw, batch, k + 1, context, offload=offload, profile=profile, budget=budget)
    td = drafter.draft_time(target, hw, batch, context)
    sigma = expected_accepted(a, k)
    step = k * td + verify.time + hw.spec_step_overhead_s     # host cost of a speculative step (calibrated)
    return {"k": k, "acceptance": a, "tokens_per_step": sigma, "step_s": step, "tpot_s": step / sigma,
            "tokens_per_s": batch * sigma / step, "speedup": sigma * t1 / step,
            "target_efficiency": t1 / verify.time, "draft_s": td, "verify_s": verify.time,
            "verify_union": verify.union, "verify_misses": verify.misses}


def best_spec(target: ModelDesc, hw: Hardware, drafter: Drafter, batch: int, context: int, *, k_max: int = 16,
              offload: Offload | None = None, profile=None, budget: float | None = None) -> dict:
    """`spec_decode` at the best draft length (k = 0, plain decoding, when speculation does not pay)."""
    td = drafter.draft_time(target, hw, batch, context)

    def t_of(t):
        if t == 1:
            return forward_cost(target, hw, batch, 1, context, offload=offload, profile=profile).time
        return forward_cost(target, hw, batch, t, context, offload=offload, profile=profile,
                            budget=budget).time + hw.spec_step_overhead_s
    k, _ = best_k(drafter.acceptance, t_of, td, k_max)
    return spec_decode(target, hw, drafter, batch, context, k, offload=offload, profile=profile, budget=budget)
