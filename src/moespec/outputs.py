"""What a generate call returns per sequence: the Output record and the statistics it carries.

Functions of the LLM's settings (`llm`: an engine.LLM, read only) and a batch's timing (StepEngine.timing() with
the expert counters Batch adds), so the engine and the batch share one definition of every figure.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .sequence import Sequence
from .spec_decode.stats import SpecStats


@dataclass
class Output:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str                  # "stop" (EOS, stop token or stop string), "length", "abort" or "error"
                                        # (this sequence failed alone: stats["error"] says why)
    stats: dict = field(default_factory=dict)


def lossy(llm) -> dict:
    """lossy: outputs may differ from plain decoding of the checkpoint, and why: a verify budget (outputs differ
    from plain decoding) or quantized weights (plain decoding itself differs from the checkpoint's; speculation
    still equals plain decoding of the quantized model)."""
    why = (["verify_budget"] if llm.budget is not None else []) + ([llm.quant.tag] if llm.quant else [])
    return {"lossy": bool(why), "lossy_reasons": why, "dtype": llm.dtype,
            "quantize": llm.quant.tag if llm.quant else "none"}


def early_output(llm, s: Sequence, stats: dict | None = None) -> Output:
    """The sequence's output; stats default to what is known before the batch ends."""
    if stats is None:
        stats = {"prompt_tokens": len(s.prompt_ids), "new_tokens": len(s.token_ids), **lossy(llm)}
    if s.error is not None:
        stats = {**stats, "error": s.error}
    return Output(s.text if s.detok is not None else "", list(s.token_ids), list(s.prompt_ids),
                  s.finish_reason or "length", stats)


def final_output(llm, s: Sequence, timing: dict, batch: int) -> Output:
    """The sequence's output once its batch has ended: its own timings and the batch's counters."""
    n_prompt, n = s.released or (len(s.prompt_ids), len(s.token_ids))
    ttft = s.t_first - timing["t0"]
    decode = s.t_last - s.t_first
    stats = {"prompt_tokens": n_prompt, "new_tokens": n, "ttft_s": ttft, "decode_s": decode,
             "tokens_per_s": (n - 1) / decode if n > 1 and decode > 0 else 0.0,
             "tpot_s": decode / (n - 1) if n > 1 else 0.0, "batch_size": batch}
    stats.update(timing.get("experts", {}))     # per generate call (the whole batch), when offloading
    stats.update(lossy(llm))
    if llm.memory_plan is not None:
        stats["memory_plan"] = llm.memory_plan.describe()
    spec = llm.spec
    if llm.budget is not None:
        stats.update({k: v for k, v in (("verify_budget", spec.verify_budget),
                                        ("verify_budget_mass", spec.verify_budget_mass)) if v is not None})
        stats.update({"budget_mode": spec.budget_mode, "budget_decay": spec.budget_decay})
    if timing.get("spec") is not None:           # per generate call (the whole batch)
        stats.update(spec_stats(llm, timing["spec"]))
    return early_output(llm, s, stats)


def spec_stats(llm, spec: SpecStats) -> dict:
    """Speculation figures of a batch from StepEngine's counters."""
    cfg = llm.spec
    out = {"draft_steps": spec.steps, "draft_tokens": spec.drafted, "draft_s": spec.draft_s,
           "verify_s": spec.verify_s, "verify_tokens": spec.verify_tokens, "row_steps": spec.row_steps,
           "accepted_tokens": spec.accepted,
           "acceptance_rate": spec.accepted / spec.drafted if spec.drafted else 0.0,
           "mean_accepted_len": (spec.accepted + spec.row_steps) / spec.row_steps if spec.row_steps else 0.0,
           "accepted_per_position": [spec.accepted_per_pos.get(i, 0) for i in range(cfg.k_max)],
           "draft_len": cfg.num_speculative_tokens,
           "draft_kv": ("shared" if llm.drafter.batched else "own") if cfg.method == "self" else None,
           "draft_experts": llm.drafter.kind if cfg.method == "self" else None,
           "distinct_experts_per_verify": spec.verify_experts / spec.verify_layers if spec.verify_layers else 0.0,
           "verify_experts": spec.verify_experts, "verify_layers": spec.verify_layers}
    if cfg.tree is not None:                     # tree drafts: draft_tokens counts depths, draft_nodes nodes
        out.update({"tree": list(cfg.tree), "draft_nodes": spec.draft_nodes})
    if spec.controller is not None:              # draft length "auto": what the controller saw and chose
        out.update({"plain_steps": spec.plain_steps, "controller": spec.controller})
    return out
