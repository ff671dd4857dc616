"""Predicted vs measured decode TPOT: the performance model against moespec's own plain decoding.

For each batch size B: moespec generates `new_tokens` tokens per row (float32, every expert resident, greedy,
EOS ignored) from B random-token prompts of `prompt_len` tokens; measured TPOT = median over repetitions of
the rows' mean `tpot_s`. Predicted TPOT = `perf.step.decode_tpot` of the checkpoint's config at float32, batch
B, context prompt_len + new_tokens / 2 (the mean context while decoding), uniform routing. The error of a point
is (predicted - measured) / measured; MAPE is the mean of their absolute values.

To show where an error comes from, each point also carries `forward_s`: the median bare one-token forward at
batch B over the same context (random tokens; `measure.time_forwards`), so `host_s` = measured TPOT - forward
is the per-step cost of the generation loop (sampling, detokenising, bookkeeping), which the step model
prices as the profile's `step_overhead_s` (measured by calibration at batch 1), and `forward_error` compares
the prediction without that overhead with the forward alone; and the distinct experts per MoE layer those
forwards touched (`measured_experts_per_layer`) next to the uniform-routing prediction.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from ..perf.hardware import Hardware


def validate(profile: Hardware, model_path: str | Path | None = None, batches=(1, 4), new_tokens: int = 32,
             prompt_len: int = 16, repetitions: int = 3, warmup: int = 1, forwards: int = 20,
             log=None) -> dict:
    """Points {batch, predicted_s, measured_s, rel_error, ...} and their mean absolute percentage error."""
    from ..bench.workloads import random_prompts
    from ..engine import LLM
    from ..errors import MoespecError
    from ..perf.model import ModelDesc
    from ..perf.step import decode_tpot, forward_cost
    from ..sampling import SamplingParams
    from .measure import time_forwards
    if not batches or min(batches) < 1 or new_tokens < 2 or prompt_len < 1 or repetitions < 1:
        raise MoespecError("validation needs batch sizes >= 1, at least 2 new tokens, a prompt and 1 repetition")
    say = log or (lambda msg: None)
    llm = LLM(model_path, dtype="float32")
    desc = ModelDesc.from_file(llm.path, name=llm.path.name, dtype_bytes=4.0)
    prompts = random_prompts(max(batches), prompt_len, llm.config.vocab_size, seed=0)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    for _ in range(warmup):
        llm.generate(prompts[:1], params)
    context = prompt_len + new_tokens // 2
    points = []
    for b in batches:
        say(f"batch {b}")
        runs = [statistics.mean(o.stats["tpot_s"] for o in llm.generate(prompts[:b], params))
                for _ in range(repetitions)]
        measured = statistics.median(runs)
        fwd, union = time_forwards(llm.model, b, context, forwards)
        cost = forward_cost(desc, profile, b, 1, context)
        predicted = decode_tpot(desc, profile, b, context)
        points.append({"batch": b, "predicted_s": predicted, "measured_s": measured,
                       "rel_error": (predicted - measured) / measured,
                       "measured_spread": (max(runs) - min(runs)) / measured,
                       "forward_s": fwd, "host_s": measured - fwd,
                       "forward_error": (predicted - profile.step_overhead_s - fwd) / fwd,
                       "measured_experts_per_layer": union,
                       "predicted_overhead_s": (desc.layers + 1) * profile.layer_overhead_s,
                       "predicted_step_overhead_s": profile.step_overhead_s,
                       "predicted_experts_per_layer": cost.union})
    mape = sum(abs(p["rel_error"]) for p in points) / len(points)
    fwd_mape = sum(abs(p["forward_error"]) for p in points) / len(points)
    return {"model": str(llm.path), "dtype": "float32", "new_tokens": new_tokens, "prompt_len": prompt_len,
            "context": context, "repetitions": repetitions, "hardware": profile.name, "points": points,
            "mape": mape if math.isfinite(mape) else None, "forward_mape": fwd_mape}
