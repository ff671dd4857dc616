"""Engine costs beyond the forwards, measured on the bundled reference model: the predicted verification
forward of a run's mean width, the per-layer and per-step overheads of plain decoding, the host cost of a
speculative step, and the wait per layer that misses."""
from __future__ import annotations

import math
import os
import shutil
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


def miss_overhead(hw: Hardware, knobs: Knobs, folder: Path) -> dict:
    """Fixed cost per layer that waits for expert loads: batch-1 greedy decoding of the reference model with a
    25% expert cache over the SSD tier in `folder`; (measured TPOT - the model's TPOT at the run's measured
    hit rate, reads priced by `hw`) / (MoE layers x min(1, misses per layer per token))."""
    from ..assets import REFERENCE_MODEL
    from ..bench.workloads import random_prompts
    from ..config import OffloadConfig
    from ..engine import LLM
    from ..perf.model import ModelDesc
    from ..perf.step import Offload, decode_tpot
    from ..sampling import SamplingParams
    k = knobs
    tmp = folder / f".moespec-calibrate-{os.getpid()}"       # its packed expert file goes away afterwards
    llm = None
    try:
        llm = LLM(REFERENCE_MODEL, dtype="float32",
                  offload=OffloadConfig(expert_cache="25%", offload="disk", offload_dir=str(tmp)))
        desc = ModelDesc.from_file(REFERENCE_MODEL, name="reference-moe", dtype_bytes=4.0)
        prompt = random_prompts(1, max(1, k.context - k.step_tokens // 2), llm.config.vocab_size, seed=3)
        params = SamplingParams(max_new_tokens=k.step_tokens, temperature=0, ignore_eos=True)
        llm.generate(prompt, params)                       # warm-up (and packs the expert file once)
        runs = [llm.generate(prompt, params)[0].stats for _ in range(k.step_runs)]
    finally:
        if llm is not None:
            llm.close()
        shutil.rmtree(tmp, ignore_errors=True)
    hits, misses = sum(r["expert_hits"] for r in runs), sum(r["expert_misses"] for r in runs)
    hit = hits / max(1, hits + misses)
    per_layer = misses / (sum(r["new_tokens"] for r in runs) * desc.moe_layers)
    tpot = statistics.median(r["tpot_s"] for r in runs)
    pred = decode_tpot(desc, hw, 1, k.context, offload=Offload(float(runs[0]["cache_capacity"]), hit_rate=hit))
    waits = desc.moe_layers * min(1.0, per_layer)
    return {"miss_overhead_s": max(0.0, (tpot - pred) / waits) if waits > 0 else 0.0, "tpot_s": tpot,
            "predicted_s": pred, "hit_rate": hit, "misses_per_layer": per_layer, "runs": len(runs)}


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
