"""Timed runs of moespec and of transformers' `generate` on the same checkpoint and prompts.

Every run decodes greedily with EOS ignored, so both engines produce exactly `new` tokens per sequence.
TTFT is the prefill (first token) time of the batch; TPOT the mean time per further token; decode
tokens/s counts all sequences of the batch (aggregate).
"""
from __future__ import annotations

import statistics
import time

import torch

from ..sampling import SamplingParams


class MoespecRunner:
    """moespec's LLM.generate, greedy with EOS ignored."""
    engine = "moespec"

    def __init__(self, llm):
        self.llm = llm

    def generate(self, batch: list[list[int]], new: int) -> tuple[list[list[int]], float, float, dict]:
        """(tokens per sequence, TTFT s, decode s after the first token, speculation stats or {})."""
        outs = self.llm.generate(batch, SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True))
        acc = {k: outs[0].stats[k] for k in ("acceptance_rate", "mean_accepted_len", "draft_steps")} \
            if "acceptance_rate" in outs[0].stats else {}
        return [o.token_ids for o in outs], outs[0].stats["ttft_s"], max(o.stats["decode_s"] for o in outs), acc


class TransformersRunner:
    """transformers' own `generate` with its default (fastest on CPU) expert kernels."""
    engine = "transformers"

    def __init__(self, path, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

    def _generate(self, batch: list[list[int]], new: int) -> torch.Tensor:
        width = max(map(len, batch))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(batch):            # left padding, as transformers expects for decoder-only models
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                      do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[:, width:]

    def generate(self, batch: list[list[int]], new: int) -> tuple[list[list[int]], float, float, dict]:
        # TTFT from a one-token generate; decode time = the full run minus it
        t0 = time.perf_counter()
        self._generate(batch, 1)
        t1 = time.perf_counter()
        out = self._generate(batch, new)
        t2 = time.perf_counter()
        return out.tolist(), t1 - t0, (t2 - t1) - (t1 - t0), {}


def forward_curve(model, ctx: int = 256, ns=(1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 32, 64), reps: int = 5,
                  seed: int = 0) -> list[dict]:
    """Cost of one forward over n new tokens after a ctx-token context, with the experts they touch.

    Random tokens stand in for draft tokens; each rep re-forwards the same n slots (nothing is
    committed), so the context stays at ctx.
    """
    from ..models.decoder import ForwardPlan
    g = torch.Generator().manual_seed(seed)
    V = model.cfg.vocab_size
    kv = model.new_cache(1, ctx + max(ns))
    model.forward(torch.randint(0, V, (1, ctx), generator=g), kv)
    kv.advance(ctx)
    rows = []
    for n in ns:
        times, distinct = [], []
        for r in range(reps + 1):
            toks = torch.randint(0, V, (1, n), generator=g)
            t0 = time.perf_counter()
            out = model.forward(toks, kv, logits_at=torch.tensor([[n - 1]]), plan=ForwardPlan(record_routing=True))
            dt = time.perf_counter() - t0
            if r:                                # the first run of each n is a warm-up
                times.append(dt)
                if out.routing:
                    distinct.append(statistics.fmean(len(torch.unique(ids)) for ids in out.routing))
        rows.append({"n": n, "ms": 1000 * statistics.median(times),
                     "distinct_experts_per_layer": statistics.fmean(distinct) if distinct else None})
    base = rows[0]["ms"]
    for row in rows:
        row["x_one_token"] = row["ms"] / base
    return rows
