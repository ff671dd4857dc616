"""`plan()`: will it fit, how fast will it run, and which settings to use, from a config and a hardware profile.

Memory: non-expert weights and the KV cache must sit in fast memory, plus a runtime reserve (activations,
allocator slack: 5% of the budget, at least 256 MiB). What is left holds experts; if not all fit, the rest is
offloaded and the cache keeps C experts per MoE layer (an average; the pool is shared across layers).

Default acceptance (ours, used when none is measured or given; `acceptance=` overrides all of them):
  self-draft   0.7 x coverage^0.25, coverage = share of routing choices landing in the N draft experts
               (N/E for uniform routing): 0.70 with every expert, 0.59 with half, 0.35 with 8 of 128
  ngram        0.3 (prompt lookup: high on edits / summaries, low on open chat)
  draft_model  0.6 (a small model of the same family)
  shadow       0.95 (int4 copies of every expert drafting with the router's own picks; measured 0.94-1.0 here)
Draft-guided prefetch recall (the share of verification's experts the draft predicted), measured by the engine
(`predictor_recall` in a run's stats; bundled model, 25% SSD cache, HumanEval, k = 4), unless `prefetch_recall=`
gives one: self-drafting with cached experts 0.60, with shadow int4 experts 0.95, a draft model through its router
projection 0.73. (SP-MoE reports about 0.88 for its own predictor; the model uses what this engine measures.)
A verification budget of b experts out of an expected union U keeps a fraction b/U of the routing choices and
is modelled as multiplying acceptance by sqrt(b/U) (ours; MoE-Spec is lossy, measure it).
"""
from __future__ import annotations

import math
from dataclasses import replace

from .errors import PerfError
from .hardware import Hardware
from .model import ModelDesc
from .spec import Drafter, best_spec
from .step import Offload, forward_cost, prefill_time
from .union import profile_coverage

MiB = 1024 ** 2
RESERVE_FRACTION, RESERVE_MIN = 0.05, 256 * MiB
ACCEPT_NGRAM, ACCEPT_DRAFT_MODEL, ACCEPT_SELF_FULL = 0.3, 0.6, 0.7
ACCEPT_SHADOW, SHADOW_BITS = 0.95, 4.5   # int4 g64 shadow copies (4 bits + a bf16 scale and zero per 64): measured
                                         # acceptance 0.94-1.0 on the bundled model (docs/benchmarks.md)
PREFETCH_RECALL = {"self": 0.60, "shadow": 0.95, "draft_model": 0.73}    # measured here (module docstring)
MIN_GAIN = 1.03     # (ours) gains below 3% are inside the model's error: recommend the simpler setting


def self_draft_acceptance(coverage: float) -> float:
    """Default per-token acceptance of the self-drafter whose draft experts cover `coverage` of the routing."""
    return ACCEPT_SELF_FULL * max(0.0, min(1.0, coverage)) ** 0.25


def memory_plan(model: ModelDesc, memory_bytes: float, batch: int, context: int, extra_bytes: float = 0.0) -> dict:
    """What fits: all weights, or how many experts per MoE layer fit after dense weights, KV and the reserve."""
    reserve = max(RESERVE_FRACTION * memory_bytes, min(RESERVE_MIN, 0.25 * memory_bytes))
    kv = model.kv_bytes(context, batch)
    fixed = model.nonexpert_bytes + kv + reserve + extra_bytes
    need_all = fixed + model.expert_total_bytes
    free = memory_bytes - fixed
    per_layer_bytes = model.moe_layers * model.expert_bytes
    cached = float(model.experts) if need_all <= memory_bytes else \
        max(0.0, min(float(model.experts), free / per_layer_bytes if per_layer_bytes else 0.0))
    return {"budget_bytes": memory_bytes, "reserve_bytes": reserve, "nonexpert_bytes": model.nonexpert_bytes,
            "kv_bytes": kv, "extra_bytes": extra_bytes, "experts_bytes": model.expert_total_bytes,
            "needed_all_bytes": need_all, "fits": need_all <= memory_bytes, "runnable": free >= 0,
            "cached_experts_per_layer": cached, "cache_bytes": cached * per_layer_bytes,
            "cache_slots": int(math.floor(cached * model.moe_layers + 1e-9))}


def offload_for(mem: dict, model: ModelDesc, overlap: bool = False, **kw) -> Offload | None:
    """The Offload a memory plan implies (None when every expert is resident)."""
    if mem["fits"] or not model.experts:
        return None
    return Offload(mem["cached_experts_per_layer"], overlap=overlap, **kw)


def plan(model: ModelDesc, hw: Hardware, memory_bytes: float | None = None, batch: int = 1,
         acceptance: float | None = None, *, context: int = 1024, prompt_len: int = 512,
         draft: ModelDesc | None = None, profile=None, overlap: bool = False, k_max: int = 16,
         prefetch_recall: float | None = None) -> dict:
    """Predicted fit, TTFT / TPOT / tokens/s for plain and speculative decoding, and recommended settings.

    `memory_bytes` is the fast memory moespec may use (default: the profile's capacity); `acceptance` a measured
    per-token acceptance applied to every drafter; `draft` the ModelDesc of a draft model to consider; `profile`
    a measured routing profile ([E] or [layers, E] per-token inclusion probabilities).
    """
    if batch < 1 or context < 0 or prompt_len < 1:
        raise PerfError("batch and prompt length must be at least 1, context at least 0")
    if acceptance is not None and not 0.0 <= acceptance <= 1.0:
        raise PerfError(f"acceptance must be in [0, 1], got {acceptance}")
    if prefetch_recall is not None and not 0.0 <= prefetch_recall <= 1.0:
        raise PerfError(f"prefetch recall must be in [0, 1], got {prefetch_recall}")
    memory = float(memory_bytes if memory_bytes is not None else hw.fast_mem_bytes)
    warnings, assumptions = [], [
        "uniform routing" if profile is None else "measured routing profile (tokens independent)",
        f"runtime reserve {RESERVE_FRACTION:.0%} of the budget (min 256 MiB)",
        "expert loads stall the layer (no overlap)" if not overlap else "expert loads overlap compute",
        "acceptance " + (f"{acceptance} (given)" if acceptance is not None else
                         f"defaults: self 0.7 x coverage^0.25, ngram {ACCEPT_NGRAM}, "
                         f"draft_model {ACCEPT_DRAFT_MODEL}"),
        "draft-guided prefetch recall " + (f"{prefetch_recall} (given)" if prefetch_recall is not None else
                                           "as measured: " + ", ".join(f"{k} {v}" for k, v in PREFETCH_RECALL.items())),
    ]
    if memory > hw.fast_mem_bytes * 1.0001:
        warnings.append(f"--memory exceeds the profile's fast memory ({hw.fast_mem_bytes / 2**30:.1f} GiB)")
    mem = memory_plan(model, memory, batch, context)
    out = {"model": _model_summary(model), "hardware": {"name": hw.name, "notes": hw.notes},
           "settings": {"batch": batch, "context": context, "prompt_len": prompt_len, "acceptance": acceptance,
                        "memory_bytes": memory},
           "memory": mem, "warnings": warnings, "assumptions": assumptions}
    if not mem["runnable"]:
        out["error"] = ("the non-expert weights and KV cache alone need "
                        f"{(mem['nonexpert_bytes'] + mem['kv_bytes'] + mem['reserve_bytes']) / 2**30:.2f} GiB, "
                        f"more than the {memory / 2**30:.2f} GiB budget")
        return out
    off = offload_for(mem, model, overlap)
    plain = forward_cost(model, hw, batch, 1, context, offload=off, profile=profile)
    out["plain"] = {"ttft_s": prefill_time(model, hw, prompt_len, 1, offload=off, profile=profile),
                    "tpot_s": plain.time, "tokens_per_s": batch / plain.time,
                    "bytes_per_step": plain.bytes, "slow_bytes_per_step": plain.slow_bytes,
                    "experts_touched_per_layer": plain.union, "misses_per_layer": plain.misses}
    cands = _candidates(model, hw, mem, batch, context, acceptance, draft, profile, overlap, k_max, prefetch_recall)
    out["speculative"] = {"candidates": cands}
    best = max(cands, key=lambda c: c["speedup"]) if cands else None
    on = best is not None and best["speedup"] >= MIN_GAIN
    out["speculative"]["best"] = best if on else None
    out["recommend"] = _recommend(model, hw, mem, off, batch, context, profile, overlap, best if on else None,
                                  plain.time)
    return out


def _model_summary(m: ModelDesc) -> dict:
    return {"name": m.name, "family": m.family, "layers": m.layers, "moe_layers": m.moe_layers,
            "experts": m.experts, "top_k": m.top_k, "params_total": m.params_total,
            "params_active_per_token": m.active_params_per_token, "dtype_bytes": m.dtype_bytes,
            "expert_bits": m.expert_bits, "bytes_total": m.total_bytes, "bytes_nonexpert": m.nonexpert_bytes,
            "bytes_per_expert": m.expert_bytes, "kv_bytes_per_token": m.kv_bytes(1), "notes": list(m.notes)}


def drafters_for(model: ModelDesc, mem: dict, batch: int, context: int, acceptance: float | None,
                 draft: ModelDesc | None = None, profile=None) -> list[tuple[Drafter, dict, dict]]:
    """The drafters worth considering, each with the memory plan it runs under and descriptive extras.
    self: draft experts = the cached experts when offloaded (SpecMoE), half of them when all are resident."""
    out = []
    if model.experts:
        n = mem["cached_experts_per_layer"] if not mem["fits"] else model.experts / 2
        cov = profile_coverage(model.experts, model.top_k, n, profile)
        a = acceptance if acceptance is not None else self_draft_acceptance(cov)
        out.append((Drafter("self", a, draft_experts=n), mem, {"draft_experts_per_layer": n, "coverage": cov}))
        # Shadow experts: int4 copies of every expert for drafting, resident; their bytes leave the cache.
        native = model.expert_bits if model.expert_bits is not None else 8 * model.dtype_bytes
        if native > SHADOW_BITS:
            extra = model.expert_total_bytes * SHADOW_BITS / native
            smem = memory_plan(model, mem["budget_bytes"], batch, context, extra_bytes=extra)
            if smem["runnable"] and (smem["fits"] or smem["cached_experts_per_layer"] >= model.top_k):
                a = acceptance if acceptance is not None else ACCEPT_SHADOW
                out.append((Drafter("shadow", a, bits=SHADOW_BITS), smem,
                            {"shadow_bits": SHADOW_BITS, "shadow_bytes": extra}))
    out.append((Drafter("ngram", acceptance if acceptance is not None else ACCEPT_NGRAM), mem, {}))
    if draft is not None:
        dmem = memory_plan(model, mem["budget_bytes"], batch, context,
                           extra_bytes=draft.total_bytes + draft.kv_bytes(context, batch))
        if dmem["runnable"]:
            a = acceptance if acceptance is not None else ACCEPT_DRAFT_MODEL
            out.append((Drafter("draft_model", a, model=draft), dmem, {"draft_model": draft.name}))
    return out


def _candidates(model, hw, mem, batch, context, acceptance, draft, profile, overlap, k_max,
                recall: float | None = None) -> list[dict]:
    """Each drafter at its best draft length, with the best prefetch cutoff when experts are offloaded."""
    out = []
    for d, m, extra in drafters_for(model, mem, batch, context, acceptance, draft, profile):
        off = offload_for(m, model, overlap)
        r = best_spec(model, hw, d, batch, context, k_max=k_max, offload=off, profile=profile)
        r.update(drafter=d.kind, prefetch_cutoff=0, cached_experts_per_layer=off.cached_experts if off else None,
                 **extra)
        if off is not None and r["k"] > 0:
            r = _with_prefetch(model, hw, d, m, r, batch, context, profile, overlap, k_max,
                               recall if recall is not None else PREFETCH_RECALL.get(d.kind, 0.0))
        out.append(r)
    return out


def _with_prefetch(model, hw, d, mem, r, batch, context, profile, overlap, k_max, recall: float) -> dict:
    """SP-MoE cutoff: the largest L with L x m x t_load <= k x T_draft (m = predicted misses per layer), its
    staging slots taken from the cache; keep it if it beats no prefetch (else cutoff 0)."""
    m, k = r["verify_misses"], r["k"]
    t_load = model.expert_bytes / hw.slow_bw
    if m <= 0 or d.kind == "ngram":
        return r
    L = min(model.moe_layers, int((k * r["draft_s"]) // (m * t_load + 1e-30)))
    staging = L * m / model.moe_layers                   # cache experts per layer given up for staging
    if L <= 0 or staging >= mem["cached_experts_per_layer"]:
        return r
    off = Offload(mem["cached_experts_per_layer"] - staging, overlap=overlap, prefetched_layers=L,
                  prefetch_accuracy=recall)
    d2 = replace(d, draft_experts=min(d.draft_experts, off.cached_experts) if d.draft_experts else None)
    r2 = best_spec(model, hw, d2, batch, context, k_max=k_max, offload=off, profile=profile)
    if r2["tokens_per_s"] <= r["tokens_per_s"]:
        return r
    r2.update({kk: v for kk, v in r.items() if kk not in r2})
    r2.update(prefetch_cutoff=L, prefetch_gain=r2["tokens_per_s"] / r["tokens_per_s"], prefetch_recall=recall,
              prefetch_staging_experts_per_layer=staging, cached_experts_per_layer=off.cached_experts,
              draft_experts_per_layer=d2.draft_experts)
    return r2


def _recommend(model, hw, mem, off, batch, context, profile, overlap, best, plain_tpot) -> dict:
    rec = {}
    if best is None:
        rec["drafter"] = {"value": "off", "gain": 1.0, "why": f"no drafter gains {MIN_GAIN - 1:.0%} or more"}
        rec["draft_length"] = {"value": 0, "gain": 1.0}
    else:
        rec["drafter"] = {"value": best["drafter"], "gain": best["speedup"],
                          "acceptance": best["acceptance"]}
        rec["draft_length"] = {"value": best["k"], "gain": best["speedup"]}
    if off is None:
        rec["expert_cache"] = {"value": "all" if model.experts else "n/a", "gain": 1.0,
                               "why": "every expert fits in fast memory" if model.experts else "dense model"}
    else:
        t0 = forward_cost(model, hw, batch, 1, context, offload=Offload(0.0, overlap=overlap), profile=profile).time
        rec["expert_cache"] = {"value": round(mem["cached_experts_per_layer"], 2), "slots": mem["cache_slots"],
                               "bytes": mem["cache_bytes"], "gain": t0 / plain_tpot,
                               "why": "experts per MoE layer that fit after dense weights, KV and reserve; gain "
                                      "over loading every expert on demand"}
    if best is not None and best.get("prefetch_cutoff"):
        rec["prefetch_cutoff"] = {"value": best["prefetch_cutoff"], "gain": best["prefetch_gain"]}
    else:
        rec["prefetch_cutoff"] = {"value": None, "gain": 1.0,
                                  "why": "nothing offloaded" if off is None else "no drafting time to hide loads"
                                  if best is not None else "speculation off"}
    rec["budget"] = _budget(model, hw, off, batch, context, profile, best)
    return rec


def _budget(model, hw, off, batch, context, profile, best) -> dict:
    """MoE-Spec verification budget: the candidate b (a fraction of the expected verification union) with the
    best predicted throughput, if it beats no budget by MIN_GAIN. Lossy: acceptance x sqrt(b / U)."""
    if best is None or not model.experts:
        return {"value": None, "gain": 1.0, "why": "speculation off" if best is None else "dense model"}
    k, a, U = best["k"], best["acceptance"], best["verify_union"]
    drafter = Drafter(best["drafter"], a, best.get("draft_experts_per_layer"), None, best.get("shadow_bits"))
    if best["drafter"] == "draft_model":
        return {"value": None, "gain": 1.0, "why": "not modelled for a draft model"}
    pre = Offload(best["cached_experts_per_layer"], overlap=off.overlap,
                  prefetched_layers=best.get("prefetch_cutoff", 0),
                  prefetch_accuracy=best.get("prefetch_recall", 0.0)) if off is not None else None
    from .spec import spec_decode
    base = best["tokens_per_s"]
    top = {"value": None, "gain": 1.0, "why": f"no budget gains {MIN_GAIN - 1:.0%} or more"}
    for frac in (0.9, 0.75, 0.5):
        b = max(float(model.top_k), frac * U)
        r = spec_decode(model, hw, drafter, batch, context, k, offload=pre, profile=profile, budget=b,
                        acceptance=a * math.sqrt(b / U))
        gain = r["tokens_per_s"] / base
        if gain >= MIN_GAIN and gain > top["gain"]:
            top = {"value": round(b, 1), "gain": gain, "lossy": True, "acceptance": r["acceptance"],
                   "why": "caps distinct experts per verification layer (MoE-Spec); changes outputs"}
    return top
