"""Predicted vs measured decode TPOT: the performance model against moespec's own decoding.

A grid of points: every batch size B x draft length k (0 = plain decoding, k > 0 = prompt-lookup speculation
with k draft tokens) x expert cache (None = every expert resident, or a cache size such as "25%" over the
SSD tier). For each point moespec generates `new_tokens` tokens per row (float32, greedy, EOS ignored) from
B prompts (`prompt_set`: by default random tokens, or the HumanEval prompts cut to `prompt_len` tokens when
speculating, so prompt lookup finds matches); measured TPOT = median over repetitions of the batch's decode
time per token (the slowest row's `decode_s` / (new_tokens - 1): B / TPOT is the batch's tokens/s; with
speculation rows finish at different steps, so the rows' own mean `tpot_s`, kept as `row_tpot_s`, is lower).
The error of a point is (predicted - measured) / measured; MAPE is the mean of their absolute values.

Predicted TPOT comes from `perf.step.forward_cost` of the checkpoint's config at float32, context
prompt_len + new_tokens / 2 (the mean context while decoding), uniform routing:
- plain: one one-token forward of B rows per token (`decode_tpot`);
- speculative: the run's own counts are inputs, as in MoESD's validation (acceptance is measured, the model
  prices steps): S verification forwards of mean width W = verify_tokens / (S x rows) tokens, over the mean
  live rows R = row_steps / S, each after its drafts (`Drafter.draft_time`); TPOT = S x (T(R, W) + drafted
  per step x t_draft + the profile's spec_step_overhead_s) / (new_tokens - 1), with T interpolated linearly
  between whole widths;
- offloaded: the decode forwards' measured cache hit rate and distinct experts per MoE layer
  (`Offload(hit_rate=..., union=...)`: workload statistics, like acceptance; prefill is left out, and rows
  decoding together share experts more than independent tokens would), misses priced at the profile's
  engine miss costs (`miss_read_gbs`, `miss_overhead_s`) or else its SSD reads, not overlapped.

Plain resident points also carry `forward_s`: the median bare one-token forward at batch B over the same
context (random tokens; `measure.time_forwards`), so `host_s` = measured TPOT - forward is the per-step cost
of the generation loop, which the step model prices as the profile's `step_overhead_s`; `forward_error`
compares the prediction without that overhead with the forward alone; and the distinct experts per MoE layer
those forwards touched (`measured_experts_per_layer`) next to the uniform-routing prediction.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from ..perf.hardware import Hardware


def validate(profile: Hardware, model_path: str | Path | None = None, batches=(1, 4), new_tokens: int = 32,
             prompt_len: int = 16, repetitions: int = 3, warmup: int = 1, forwards: int = 20,
             log=None, draft_lens=(0,), caches=(None,), offload_dir: str | None = None,
             prompt_set: str | None = None, quantize: str | None = None, drafter: str = "ngram") -> dict:
    """Points {batch, k, cache, predicted_s, measured_s, rel_error, ...} and their mean absolute percentage
    error (overall, and per cache / plain / speculative in `mape_by`); with plain and speculative points, the
    predicted and measured speedups (`speedups`). drafter: what drafts when k > 0: "ngram", "self" (the cached
    set), "shadow-int4" / "shadow-int8", "draft_model" (the bundled model's draft) or "oracle:A" (free drafts
    of acceptance A, calibrate/oracle.py)."""
    from ..bench.workloads import load_prompts
    from ..config import OffloadConfig
    from ..engine import LLM
    from ..errors import MoespecError
    from ..perf.model import ModelDesc
    if not batches or min(batches) < 1 or new_tokens < 2 or prompt_len < 1 or repetitions < 1 \
            or min(draft_lens) < 0:
        raise MoespecError("validation needs batch sizes >= 1, at least 2 new tokens, a prompt, 1 repetition "
                           "and draft lengths >= 0")
    say = log or (lambda msg: None)
    context = prompt_len + new_tokens // 2
    kind = prompt_set or ("humaneval" if max(draft_lens) > 0 else "random")
    points, model = [], None
    for cache in caches:
        for k in draft_lens:
            offload = None if cache is None else OffloadConfig(expert_cache=cache, offload="disk",
                                                               offload_dir=offload_dir)
            spec = _spec(drafter, k) if k else None
            llm = LLM(model_path, dtype="float32", offload=offload, speculative=spec, quantize=quantize)
            try:
                # quantized experts are priced by their bytes (blob bits per weight); their kernels' own rates
                # are not in the profile, which measures float products
                bits = None if llm.quant is None else 8 * llm.model.experts.expert_bytes() / \
                    (3 * llm.config.hidden_size * llm.config.moe_intermediate_size) \
                    if cache is None else 8 * llm.expert_stats()["expert_bytes"] / \
                    (3 * llm.config.hidden_size * llm.config.moe_intermediate_size)
                desc = ModelDesc.from_file(llm.path, name=llm.path.name, dtype_bytes=4.0, expert_bits=bits)
                prompts = load_prompts(kind, max(batches), prompt_len, llm.config.vocab_size, llm.tokenizer)
                if k and drafter.startswith("oracle:"):
                    llm.drafter = _oracle(llm, prompts, new_tokens, float(drafter.split(":", 1)[1]))
                for b in batches:
                    say(f"batch {b}, draft length {k}, {'all experts resident' if cache is None else cache + ' cache'}")
                    points.append(_point(llm, desc, profile, prompts[:b], k, cache, new_tokens, context,
                                         repetitions, warmup, forwards))
                model = str(llm.path)
            finally:
                llm.close()
    for p in points:
        p["drafter"] = drafter if p["k"] else None
    mape = _mape(points)
    groups = {f"{c or 'resident'} {'plain' if k == 0 else 'spec'}": _mape([p for p in points if p["cache"] == c
                                                                        and (p["k"] > 0) == (k > 0)])
              for c in caches for k in {min(k, 1) for k in draft_lens}}
    fwd = [p for p in points if "forward_error" in p]
    return {"model": model, "dtype": "float32", "quantize": quantize or "none", "new_tokens": new_tokens,
            "prompt_len": prompt_len,
            "prompts": kind,
            "context": context, "repetitions": repetitions, "hardware": profile.name, "points": points,
            "mape": mape, "mape_by": groups,
            "forward_mape": sum(abs(p["forward_error"]) for p in fwd) / len(fwd) if fwd else None,
            "drafter": drafter, "speedups": speedups(points)}


def speedups(points: list[dict]) -> list[dict]:
    """Each speculative point against the plain point of the same batch and cache: measured and predicted
    speedup (plain TPOT / speculative TPOT)."""
    plain = {(p["batch"], p["cache"]): p for p in points if p["k"] == 0}
    out = []
    for p in points:
        base = plain.get((p["batch"], p["cache"]))
        if p["k"] and base is not None:
            m, q = base["measured_s"] / p["measured_s"], base["predicted_s"] / p["predicted_s"]
            out.append({"batch": p["batch"], "cache": p["cache"], "k": p["k"], "drafter": p["drafter"],
                        "acceptance": p.get("acceptance"), "measured_speedup": m, "predicted_speedup": q,
                        "rel_error": (q - m) / m})
    return out


def _spec(drafter: str, k: int) -> dict:
    if drafter == "ngram" or drafter.startswith("oracle:"):     # the oracle replaces prompt lookup once loaded
        return {"method": "ngram", "num_speculative_tokens": k}
    if drafter == "self" or drafter.startswith("shadow-"):
        return {"method": "self", "num_speculative_tokens": k,
                **({"draft_experts": drafter} if drafter != "self" else {})}
    if drafter == "draft_model":
        return {"method": "draft_model", "num_speculative_tokens": k}
    from ..errors import MoespecError
    raise MoespecError(f"validation drafter {drafter!r} is not one of: ngram, self, shadow-int4, shadow-int8, "
                       "draft_model, oracle:A")


def _oracle(llm, prompts, new_tokens: int, acceptance: float):
    from ..sampling import SamplingParams
    from .oracle import OracleDrafter
    params = SamplingParams(max_new_tokens=new_tokens + 16, temperature=0, ignore_eos=True)
    ref = {tuple(p): o.token_ids for p, o in zip(prompts, llm.generate(prompts, params))}
    return OracleDrafter(ref, acceptance, llm.config.vocab_size)


def _draft_cost(llm, desc, profile, rows: float, per_row_drafts: float, context: int) -> float:
    """Seconds of one step's drafting: batched drafters (on the target's KV) run one forward per draft position
    for every row; the others draft row by row, one forward per token."""
    from ..perf.model import ModelDesc
    from ..perf.spec import Drafter
    from ..spec_decode.drafters import DraftModelDrafter
    d = llm.drafter
    if d.batched:
        if d.shadow is not None:
            bits = 8 * d.shadow.expert_bytes() / (3 * llm.config.hidden_size * llm.config.moe_intermediate_size)
            drafter = Drafter("shadow", 0.0, bits=bits)
        else:
            drafter = Drafter("self", 0.0, draft_experts=float(d.n))
        return per_row_drafts * drafter.draft_time(desc, profile, max(1, round(rows)), context)
    if isinstance(d, DraftModelDrafter):                           # a draft model
        draft = ModelDesc.from_file(llm.spec.model, name="draft", dtype_bytes=4.0)
        return rows * per_row_drafts * Drafter("draft_model", 0.0, model=draft).draft_time(desc, profile, 1, context)
    return rows * per_row_drafts * Drafter("ngram", 0.0).draft_time(desc, profile, 1, context)


def _mape(points) -> float | None:
    m = sum(abs(p["rel_error"]) for p in points) / len(points) if points else float("nan")
    return m if math.isfinite(m) else None


def _point(llm, desc, profile, prompts, k, cache, new_tokens, context, repetitions, warmup, forwards) -> dict:
    """Generate, measure, and predict one point of the grid (see the module docstring)."""
    from ..perf.step import Offload, decode_tpot, forward_cost
    from ..sampling import SamplingParams
    from .costs import verify_time
    from .measure import time_forwards
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    b = len(prompts)
    for _ in range(warmup):
        llm.generate(prompts, params)
    runs, rows_tpot, stats = [], [], []
    for _ in range(repetitions):
        outs = llm.generate(prompts, params)
        runs.append(max(o.stats["decode_s"] for o in outs) / (new_tokens - 1))
        rows_tpot.append(statistics.mean(o.stats["tpot_s"] for o in outs))
        stats.append(outs[0].stats)                   # spec and expert counters are per generate call
    measured = statistics.median(runs)
    offload, hit = None, None
    if cache is not None:
        # Workload statistics, as acceptance is for speculation: the decode forwards' hit rate and distinct
        # experts per layer (rows decoding together share experts more than independent tokens would).
        hits = sum(s.get("decode_expert_hits", 0) for s in stats)         # decoding only: the model prices steps
        total = hits + sum(s.get("decode_expert_misses", 0) for s in stats)
        hit = hits / total if total else 1.0
        forwards = sum(s["draft_steps"] if k else new_tokens - 1 for s in stats) * desc.moe_layers
        union = total / forwards if forwards and total else None
        offload = Offload(cached_experts=float(stats[0]["cache_capacity"]), hit_rate=hit, union=union)
    pt = {"batch": b, "k": k, "cache": cache, "hit_rate": hit, "measured_s": measured,
          "measured_union": offload.union if offload is not None else None,
          "row_tpot_s": statistics.median(rows_tpot),
          "measured_spread": (max(runs) - min(runs)) / measured}
    if k == 0:
        pt["predicted_s"] = predicted = decode_tpot(desc, profile, b, context, offload=offload)
        pt["predicted_experts_per_layer"] = forward_cost(desc, profile, b, 1, context).union
        pt["predicted_step_overhead_s"] = profile.step_overhead_s
        if cache is None:
            fwd, union = time_forwards(llm.model, b, context, forwards)
            pt.update(forward_s=fwd, host_s=measured - fwd, measured_experts_per_layer=union,
                      forward_error=(predicted - profile.step_overhead_s - fwd) / fwd)
    else:
        steps = statistics.mean(s["draft_steps"] for s in stats)
        rows = statistics.mean(s["row_steps"] for s in stats) / steps
        width = statistics.mean(s["verify_tokens"] for s in stats) / (steps * rows)
        drafted = statistics.mean(s["draft_tokens"] for s in stats) / steps       # per step, over the rows
        t_verify = verify_time(desc, profile, rows, width, context, offload)
        t_draft = _draft_cost(llm, desc, profile, rows, drafted / rows, context)
        pt["predicted_s"] = steps * (t_verify + t_draft + profile.spec_step_overhead_s) / (new_tokens - 1)
        pt.update(steps=steps, mean_rows=rows, mean_width=width,
                  tokens_per_step=(new_tokens - 1) / steps,
                  acceptance=statistics.mean(s["acceptance_rate"] for s in stats))
    pt["rel_error"] = (pt["predicted_s"] - measured) / measured
    return pt
