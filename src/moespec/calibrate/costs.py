"""Engine costs beyond the forwards, measured on the bundled reference model: the predicted verification
forward of a run's mean width, the per-layer and per-step overheads of plain decoding, the host cost of a
speculative step, and the wait per layer that misses."""
from __future__ import annotations

import math
import statistics
from dataclasses import replace
from pathlib import Path

from ..errors import MoespecError
from ..perf.hardware import Hardware
from .measure import Knobs, time_forwards


def verify_time(desc, hw: Hardware, rows: float, width: float, context: int, offload=None) -> float:
    """Predicted seconds of one verification forward of `rows` rows of mean `width` tokens (linear between
    whole widths: a run's mean width is fractional)."""
    from ..perf.step import forward_cost
    lo = max(1, math.floor(width))
    t_lo, t_hi = (forward_cost(desc, hw, rows, t, context, offload=offload).time for t in (lo, lo + 1))
    return t_lo + (width - lo) * (t_hi - t_lo)


def spec_overhead(hw: Hardware, knobs: Knobs) -> dict:
    """Host cost of a speculative step beyond its forwards: prompt-lookup speculation (k = 4, batch 1) on a
    prompt that repeats a random phrase (so drafts exist and are accepted), per step: decode time / steps
    minus the predicted verification forward of the run's mean width and the drafting (`hw` must already
    hold the layer and step overheads)."""
    from ..assets import REFERENCE_MODEL
    from ..bench.workloads import random_prompts
    from ..engine import LLM
    from ..perf.model import ModelDesc
    from ..perf.spec import Drafter
    from ..sampling import SamplingParams
    k = knobs
    llm = LLM(REFERENCE_MODEL, dtype="float32", speculative={"method": "ngram", "num_speculative_tokens": 4})
    desc = ModelDesc.from_file(REFERENCE_MODEL, name="reference-moe", dtype_bytes=4.0)
    phrase = random_prompts(1, 8, llm.config.vocab_size, seed=2)[0]
    prompt = [phrase * max(1, (k.context - k.step_tokens // 2) // 8)]
    context = len(prompt[0]) + k.step_tokens // 2
    params = SamplingParams(max_new_tokens=k.step_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompt, params)                           # warm-up
    per_step, widths = [], []
    for _ in range(k.step_runs):
        st = llm.generate(prompt, params)[0].stats
        steps = st["draft_steps"]
        width = st["verify_tokens"] / st["row_steps"]
        t_draft = st["draft_tokens"] / steps * Drafter("ngram", 0.0).draft_time(desc, hw, 1, context)
        per_step.append(st["decode_s"] / steps - verify_time(desc, hw, 1, width, context) - t_draft)
        widths.append(width)
    llm.close()
    return {"spec_step_overhead_s": max(0.0, statistics.median(per_step)), "mean_width": statistics.mean(widths),
            "runs": len(per_step)}


def fit_miss_costs(points: list[tuple[float, float]], expert_bytes: float) -> tuple[float, float | None]:
    """(misses per layer m, extra seconds per layer e) at two or more batch sizes -> (wait per layer that
    misses, engine read GB/s per missed expert) with e = wait x min(1, m) + m x expert_bytes / rate, least
    squares. A single point (or no growth with m) gives the wait alone: (e / min(1, m), None).

    >>> w, g = fit_miss_costs([(1.0, 0.0007), (5.0, 0.0023)], 1e6)
    >>> round(w * 1e6), round(g, 3)
    (300, 2.5)
    """
    pts = [(m, e) for m, e in points if m > 0]
    if not pts:
        return 0.0, None
    if len(pts) >= 2:
        import numpy as np
        m, e = np.array(pts, dtype=float).T
        (w, per), _, rank, _ = np.linalg.lstsq(np.stack([np.minimum(1.0, m), m], axis=1), e, rcond=None)
        if rank == 2 and per > 0:
            return max(0.0, float(w)), expert_bytes / float(per) / 1e9
    m, e = max(pts)
    return max(0.0, e / min(1.0, m)), None


def miss_overhead(hw: Hardware, knobs: Knobs, folder: Path, batches: tuple[int, ...] = (1, 8)) -> dict:
    """What expert misses cost the engine: greedy decoding of the reference model with a 25% expert cache over
    the SSD tier in `folder`, at batch 1 and 8; per batch, (measured time per decode step - the model's resident
    step) / MoE layers against the misses per layer per step, fitted as a wait per layer that misses plus a
    read rate per missed expert (`fit_miss_costs`). The fitted rate is the engine's, not a single random
    read's: several misses of a layer coalesce into larger reads, and a layer whose experts outnumber the
    cache's slots computes in chunks that wait in turn. Batches alternate run by run, so a drift of the SSD's
    speed (large within minutes on a shared machine) moves both points alike."""
    from ..assets import REFERENCE_MODEL
    from ..bench.workloads import random_prompts
    from ..config import OffloadConfig
    from ..engine import LLM
    from ..perf.model import ModelDesc
    from ..perf.step import decode_tpot
    from ..sampling import SamplingParams
    k = knobs
    llm = None
    desc = ModelDesc.from_file(REFERENCE_MODEL, name="reference-moe", dtype_bytes=4.0)
    params = SamplingParams(max_new_tokens=k.step_tokens, temperature=0, ignore_eos=True)
    per_batch = []
    try:
        # The packed expert file stays in `folder`, where offloading (and --validate) read it later: reads of a
        # file written moments before ran markedly slower on the development VM (its host still flushing it), so
        # a calibration that packed a fresh file each time priced misses too high.
        llm = LLM(REFERENCE_MODEL, dtype="float32",
                  offload=OffloadConfig(expert_cache="25%", offload="disk", offload_dir=str(folder)))
        prompts = {b: random_prompts(b, max(1, k.context - k.step_tokens // 2), llm.config.vocab_size, seed=3)
                   for b in batches}
        runs = {b: [] for b in batches}
        for b in batches:
            llm.generate(prompts[b], params)                # warm-up (and packs the expert file once)
        for _ in range(k.step_runs):                        # batches alternate: SSD speed drifts on shared machines
            for b in batches:
                outs = llm.generate(prompts[b], params)
                st = outs[0].stats                          # per generate call; decoding only (no prefill)
                runs[b].append((max(o.stats["decode_s"] for o in outs) / (k.step_tokens - 1),
                                st["decode_expert_hits"], st["decode_expert_misses"]))
        for b in batches:
            step = statistics.median(r[0] for r in runs[b])
            hits, misses = sum(r[1] for r in runs[b]), sum(r[2] for r in runs[b])
            m = misses / (k.step_runs * (k.step_tokens - 1) * desc.moe_layers)  # per layer per decode forward
            extra = (step - decode_tpot(desc, hw, b, k.context)) / desc.moe_layers
            per_batch.append({"batch": b, "step_s": step, "hit_rate": hits / max(1, hits + misses),
                              "misses_per_layer": m, "extra_per_layer_s": extra})
    finally:
        if llm is not None:
            llm.close()
    wait, gbs = fit_miss_costs([(p["misses_per_layer"], p["extra_per_layer_s"]) for p in per_batch], desc.expert_bytes)
    return {"miss_overhead_s": wait, "miss_read_gbs": gbs, "batches": per_batch, "expert_bytes": desc.expert_bytes}


def overheads(hw: Hardware, knobs: Knobs) -> dict:
    """Per-layer and per-step fixed costs from batch-1 runs of the reference model (see the module docstring)."""
    from ..assets import REFERENCE_MODEL
    from ..bench.workloads import random_prompts
    from ..engine import LLM
    from ..perf.model import ModelDesc
    from ..perf.step import forward_cost
    from ..sampling import SamplingParams
    if not (REFERENCE_MODEL / "config.json").is_file():
        raise MoespecError(f"the bundled reference model ({REFERENCE_MODEL}) is not installed")
    llm = LLM(REFERENCE_MODEL, dtype="float32")
    desc = ModelDesc.from_file(REFERENCE_MODEL, name="reference-moe", dtype_bytes=4.0)
    k = knobs
    # generation: the mean context while decoding (prompt + tokens / 2) equals the forwards' context
    prompt = random_prompts(1, max(1, k.context - k.step_tokens // 2), llm.config.vocab_size, seed=1)
    params = SamplingParams(max_new_tokens=k.step_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompt, params)                           # warm-up
    tpots, fwds = [], []
    for _ in range(k.step_runs):        # interleaved, so that a slow spell of the machine hits both alike
        tpots.append(llm.generate(prompt, params)[0].stats["tpot_s"])
        fwds.append(time_forwards(llm.model, 1, k.context, max(3, k.forwards // k.step_runs))[0])
    fwd, tpot = statistics.median(fwds), statistics.median(tpots)
    bound = forward_cost(desc, replace(hw, layer_overhead_s=0.0, step_overhead_s=0.0), 1, 1, k.context).time
    calls = desc.layers + 1
    return {"forward_s": fwd, "rate_bound_s": bound, "calls": calls, "overhead_s": max(0.0, (fwd - bound) / calls),
            "tpot_s": tpot, "step_overhead_s": max(0.0, statistics.median(t - f for t, f in zip(tpots, fwds)))}
