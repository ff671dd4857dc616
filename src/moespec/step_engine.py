"""The batch being decoded and its step: admission, prefill, emission, finished rows leaving, one decode step.

A StepEngine owns the rows of one batch: the sequences (index i names one for good), their random generators,
which of them are live (row r of the KV cache belongs to seqs[live[r]]), the KV cache, and each live row's pending
token (emitted, not yet in the KV). `step()` runs one iteration:
  1. join: sequences added since the last step are prefilled on their own and their KV rows appended (the first
     join is the batch's prefill);
  2. emit: each row's new tokens go to its sequence (text, stop strings, finish reason; on_text);
  3. leave: finished rows leave the batch and the engine (on_finish; their KV room is given back);
  4. decode: one plain step (a token per live row) or one speculative step (spec_decode/step.py); a controller
     (perf/controller.py) picks the draft length, and the drafter with --spec auto.
It returns False once no row is live and none waits. Its caller may `add` sequences between steps, which join at
the next one (continuous batching: batch.py; the server's engine thread). `generate()` (generate.py) is the loop.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

import torch

from .kv_cache import KVCache
from .models.decoder import DecoderLM
from .sampling import make_generator, sample
from .sequence import Sequence, draft_slack, kv_capacity, room_left
from .spec_decode.stats import SpecStats
from .spec_decode.step import speculative_step


class StepEngine:
    """drafter / draft_len: speculation (draft_len tokens per step, or what `controller` picks); budget: a
    VerifyBudget (lossy). Hooks, all optional: on_text(i, delta), aborted(i) (asked before each step: True ends
    sequence i with finish_reason "abort"), on_finish(i, seq) (as soon as sequence i has ended). Sequences are
    numbered as they are added; a finished one leaves the engine once on_finish has seen it (a server whose batch
    never drains holds nothing per finished request): callers that want them keep their own references."""

    def __init__(self, model: DecoderLM, drafter=None, draft_len: int = 0, budget=None, controller=None,
                 on_text: Callable[[int, str], None] | None = None, aborted: Callable[[int], bool] | None = None,
                 on_finish: Callable[[int, Sequence], None] | None = None):
        self.model, self.drafter, self.draft_len, self.budget, self.controller = \
            model, drafter, draft_len, budget, controller
        self.on_text, self.aborted, self.on_finish = on_text, aborted, on_finish
        self.slack = draft_slack(drafter, draft_len)
        self.seqs: dict[int, Sequence] = {}            # the sequences not finished yet, by number
        self.gens: dict[int, object] = {}              # their random generators
        self.added = 0                                 # sequences numbered so far
        self.waiting: list[Sequence] = []
        self.live: list[int] = []
        self.kv: KVCache | None = None
        self.nxt: torch.Tensor | None = None           # [live] pending tokens: emitted, not yet in the KV
        self.new: list[list[int]] = []                 # per live row, the tokens the last step made
        self.steps = 0
        self.t0: float | None = None
        self.t_prefill = 0.0
        self.prefill_experts: dict | None = None       # expert counters at the end of the first prefill
        self.spec = SpecStats()

    def add(self, seqs: list[Sequence]) -> range:
        """Sequences that join the batch at the next step, numbered after those added before, in this order; returns
        their numbers (the i of the hooks)."""
        first = self.added + len(self.waiting)
        self.waiting.extend(seqs)
        return range(first, first + len(seqs))

    def has_unfinished(self) -> bool:
        return bool(self.live or self.waiting)

    def step(self) -> bool:
        """One iteration (module docstring); False once nothing is left to decode."""
        if self.waiting:
            self._join()
        self._emit()
        self._leave()
        if not self.live:                      # the batch ran dry: sequences added now start it over
            return False
        self._decode()
        self.steps += 1
        return True

    def timing(self) -> dict:
        """Batch timings (prefill_s, decode_s, steps) and, with a drafter, speculation counters."""
        return {"prefill_s": self.t_prefill, "decode_s": time.perf_counter() - self.t0 - self.t_prefill,
                "steps": self.steps, "t0": self.t0, "spec": self.spec if self.drafter is not None else None,
                "prefill_experts": self.prefill_experts}

    # -- the phases of a step ---------------------------------------------------------------------------------
    def _join(self) -> None:
        first, added, self.waiting = self.added, self.waiting, []
        start = time.perf_counter()
        self.t0 = self.t0 or start
        ids = range(first, first + len(added))
        self.added += len(added)
        for i, s in zip(ids, added):
            self.seqs[i], self.gens[i] = s, make_generator(s.params.seed)
        kv, nxt = _prefill(self.model, added, [self.gens[i] for i in ids], self.slack)
        if self.live:
            self.kv, self.nxt = self.kv.append_rows(kv), torch.cat([self.nxt, nxt])
        else:
            self.kv, self.nxt, self.new = kv, nxt, []
        if self.prefill_experts is None:       # the batch's own prefill: decode-only counts start here
            self.t_prefill = time.perf_counter() - start
            self.prefill_experts = self.model.experts.stats()
        self.live += ids
        self.new += [[t] for t in nxt.tolist()]

    def _emit(self) -> None:
        now = time.perf_counter()
        for i, toks in zip(self.live, self.new):
            s = self.seqs[i]
            for tok in toks:
                if s.finish_reason is None:
                    try:
                        delta = s.append(tok, now)
                        if delta and self.on_text is not None:
                            self.on_text(i, delta)
                    except Exception as e:          # this sequence fails alone (detokenizer, stop matcher, callback)
                        s.fail(f"{type(e).__name__}: {e}")
            if self.aborted is not None and s.finish_reason is None and self.aborted(i):
                s.finish_reason = "abort"

    def _leave(self) -> None:
        """Finished rows leave the batch: they cost nothing more, and the rows left keep only the KV room they may
        still need."""
        keep = [r for r, i in enumerate(self.live) if self.seqs[i].finish_reason is None]
        if len(keep) == len(self.live):
            return
        for i in self.live:
            if self.seqs[i].finish_reason is not None:
                if self.drafter is not None:
                    self.drafter.forget(i)
                if self.on_finish is not None:
                    self.on_finish(i, self.seqs[i])
                del self.seqs[i], self.gens[i]
        self.live = [self.live[r] for r in keep]
        if keep:
            self.kv.select_rows(keep, max(self.kv.lens[r] + room_left(self.seqs[i], self.slack)
                                          for r, i in zip(keep, self.live)))
            self.nxt = self.nxt[keep]

    def _decode(self) -> None:
        seqs, live, ctl, spec = self.seqs, self.live, self.controller, self.spec
        d, k = self.drafter, 0 if self.drafter is None else self.draft_len
        if self.drafter is not None and ctl is not None:      # the controller picks k (and the drafter: auto)
            name, k = ctl.next_step()
            d = self.drafter.members[name] if name is not None else self.drafter
        t_step = time.perf_counter()
        before = replace(spec)
        params, gens = [seqs[i].params for i in live], [self.gens[i] for i in live]
        if k > 0:
            self.new, self.nxt = speculative_step(
                self.model, self.kv, live, [seqs[i].prompt_ids + seqs[i].token_ids for i in live], self.nxt, params,
                gens, d, k, spec, budget=self.budget, prompt_lens=[len(seqs[i].prompt_ids) for i in live])
            if ctl is not None:
                ctl.record_spec(k, spec.draft_s - before.draft_s, spec.verify_s - before.verify_s,
                                spec.accepted - before.accepted, rows=len(live), lens=[len(x) - 1 for x in self.new],
                                width=(spec.verify_tokens - before.verify_tokens) // len(live))
            return
        logits = self.model.forward(self.nxt[:, None], self.kv).logits[:, 0]
        self.kv.advance(1)
        failed: list[tuple[int, str]] = []
        self.nxt = sample(logits, params, gens, [(seqs[i].prompt_ids, seqs[i].token_ids) for i in live], failed=failed)
        for r, why in failed:
            seqs[live[r]].fail(why)
        self.new = [[t] for t in self.nxt.tolist()]
        if ctl is not None:
            ctl.record_plain(time.perf_counter() - t_step, rows=len(live))
            spec.plain_steps += 1


def _prefill(model: DecoderLM, seqs: list[Sequence], gens: list, slack: int) -> tuple[KVCache, torch.Tensor]:
    """A KV cache holding the prompts (room for each sequence's new tokens and a draft), and each row's
    first sampled token [B]. Ragged: right-padded; each row's logits come from its own last prompt token."""
    lens = [len(s.prompt_ids) for s in seqs]
    kv = model.new_cache(len(seqs), max(kv_capacity(n, s.params.max_new_tokens, slack) for n, s in zip(lens, seqs)))
    tokens = torch.zeros(len(seqs), max(lens), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, :lens[i]] = torch.tensor(s.prompt_ids)
    logits = model.forward(tokens, kv, logits_at=torch.tensor(lens)[:, None] - 1).logits[:, 0]
    kv.advance(lens)
    return kv, sample(logits, [s.params for s in seqs], gens, [(s.prompt_ids, []) for s in seqs])
