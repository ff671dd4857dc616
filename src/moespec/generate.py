"""The generation loop: prefill, then one token per step per live sequence, until each one stops.

Kept on one screen on purpose; speculative decoding replaces the body of the step, not the loop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .kv_cache import KVCache
from .models.decoder import DecoderLM
from .sampling import SamplingParams, make_generator, sample
from .spec_decode.step import speculative_step
from .spec_decode.tree import shape_nodes
from .tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    eos_ids: set[int]
    detok: IncrementalDetokenizer | None = None
    stops: StopStringMatcher | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    t_first: float = 0.0
    t_last: float = 0.0
    error: str | None = None            # why the sequence failed (finish_reason "error"); the others decode on
    released: tuple[int, int] | None = None    # (prompt, new) token counts once `release` dropped the tokens

    def fail(self, why: str) -> None:
        self.finish_reason, self.error = "error", why

    def release(self) -> None:
        """Forget what a finished sequence holds (its caller has its output already); keep counts and timings."""
        self.released = (len(self.prompt_ids), len(self.token_ids))
        self.prompt_ids, self.token_ids, self.text, self.detok, self.stops = [], [], "", None, None

    def append(self, tok: int, now: float) -> str:
        """Add one token; return the text it makes visible; set finish_reason when the sequence ends."""
        self.token_ids.append(tok)
        self.t_first = self.t_first or now
        self.t_last = now
        delta = self.detok.push(tok) if self.detok is not None else ""
        stopped = False
        if self.stops is not None:
            delta, stopped = self.stops.feed(delta)
        if stopped or tok in self.eos_ids or tok in self.params.stop_token_ids:
            self.finish_reason = "stop"
        elif len(self.token_ids) >= self.params.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None and not stopped:
            delta += self._flush()          # release text held back for a partial character or stop string
        self.text += delta
        return delta

    def _flush(self) -> str:
        tail = self.detok.flush() if self.detok is not None else ""
        if self.stops is not None:
            tail, _ = self.stops.feed(tail)
            tail += self.stops.flush()
        return tail


def generate(model: DecoderLM, seqs: list[Sequence], on_text: Callable[[int, str], None] | None = None,
             drafter=None, draft_len: int = 0, budget=None, controller=None,
             aborted: Callable[[int], bool] | None = None, on_finish: Callable[[int], None] | None = None,
             admit: Callable[[int], list[Sequence]] | None = None, release: bool = False) -> dict:
    """Run every sequence to completion in one batch. Returns batch timings (prefill_s, decode_s, steps)
    and, with a drafter, speculation counters. A step either decodes one token per live row or, with a
    drafter, drafts and verifies `draft_len` tokens per row (spec_decode/step.py); a controller
    (perf/controller.py) instead picks each step's draft length, 0 = a plain step, from the costs it
    is told. budget: a VerifyBudget that makes verification LOSSY (models/budget.py). aborted(i) is asked
    before every step: True ends sequence i with finish_reason "abort" (a server's client went away);
    on_finish(i) is called as soon as sequence i has ended (the others may go on). admit(live_rows),
    asked after every step, returns sequences that join the batch (continuous batching): they are
    prefilled on their own, their KV rows appended, and they decode with the others from the next step;
    they are appended to `seqs`, so index i keeps naming one sequence. release: once on_finish(i) has seen a
    sequence, drop its tokens, text and generator (a server whose batch never drains then holds nothing per
    finished request; `seqs[i]` keeps its counts and timings only)."""
    gens = [make_generator(s.params.seed) for s in seqs]
    slack = draft_slack(drafter, draft_len)
    t0 = time.perf_counter()
    kv, nxt = _prefill(model, seqs, gens, slack)
    prefill_experts = model.experts.stats()    # expert counters at the end of prefill: decode-only counts
    live = list(range(len(seqs)))              # row r of the cache belongs to seqs[live[r]]
    new = [[t] for t in nxt.tolist()]          # nxt: pending tokens, emitted but not yet in the KV
    t_prefill, spec = time.perf_counter() - t0, {"steps": 0, "row_steps": 0, "drafted": 0, "accepted": 0,
                                               "draft_s": 0.0, "verify_s": 0.0,
                                               "accepted_per_pos": {}, "verify_experts": 0, "verify_layers": 0,
                                               "plain_steps": 0, "draft_nodes": 0, "verify_tokens": 0}
    added: list[Sequence] = []
    steps = 0
    while True:
        if added:                              # joining sequences: prefill them, append their rows
            first = len(seqs)
            seqs.extend(added)
            gens.extend(make_generator(s.params.seed) for s in added)
            kv_new, nxt_new = _prefill(model, added, gens[first:], slack)
            if live:
                kv, nxt = kv.append_rows(kv_new), torch.cat([nxt, nxt_new])
            else:                              # the batch had run dry: start over from the newcomers
                kv, nxt, new = kv_new, nxt_new, []
            live += range(first, len(seqs))
            new += [[t] for t in nxt_new.tolist()]
            added = []
        now = time.perf_counter()
        for i, toks in zip(live, new):
            for tok in toks:
                if seqs[i].finish_reason is None:
                    try:
                        delta = seqs[i].append(tok, now)
                        if delta and on_text is not None:
                            on_text(i, delta)
                    except Exception as e:          # this sequence fails alone (detokenizer, stop matcher, callback)
                        seqs[i].fail(f"{type(e).__name__}: {e}")
            if aborted is not None and seqs[i].finish_reason is None and aborted(i):
                seqs[i].finish_reason = "abort"
        keep = [r for r, i in enumerate(live) if seqs[i].finish_reason is None]
        if len(keep) < len(live):              # finished rows leave the batch: they cost nothing more
            for r, i in enumerate(live):
                if seqs[i].finish_reason is not None:
                    if drafter is not None:
                        drafter.forget(i)
                    if on_finish is not None:
                        on_finish(i)
                    if release:
                        seqs[i].release()
                        gens[i] = None
            live = [live[r] for r in keep]
            if keep:                           # and their room: the rows left keep what they may still need
                kv.select_rows(keep, max(kv.lens[r] + _room(seqs[i], slack) for r, i in zip(keep, live)))
                nxt = nxt[keep]
        added = admit(len(live)) if admit is not None else []
        if not live:
            if added:
                continue
            break
        d, k = drafter, 0 if drafter is None else draft_len
        if drafter is not None and controller is not None:      # the controller picks k (and the drafter: auto)
            name, k = controller.next_step()
            d = drafter.members[name] if name is not None else drafter
        t_step = time.perf_counter()
        before = (spec["draft_s"], spec["verify_s"], spec["accepted"], spec["verify_tokens"])
        if k > 0:
            new, nxt = speculative_step(model, kv, live, [seqs[i].prompt_ids + seqs[i].token_ids for i in live], nxt,
                                        [seqs[i].params for i in live], [gens[i] for i in live], d,
                                        k, spec, budget=budget, prompt_lens=[len(seqs[i].prompt_ids) for i in live])
            if controller is not None:
                controller.record_spec(k, spec["draft_s"] - before[0], spec["verify_s"] - before[1],
                                       spec["accepted"] - before[2], rows=len(live),
                                       lens=[len(x) - 1 for x in new],
                                       width=(spec["verify_tokens"] - before[3]) // len(live))
        else:
            logits = model.forward(nxt[:, None], kv).logits[:, 0]
            kv.advance(1)
            failed: list[tuple[int, str]] = []
            nxt = sample(logits, [seqs[i].params for i in live], [gens[i] for i in live],
                         [(seqs[i].prompt_ids, seqs[i].token_ids) for i in live], failed=failed)
            for r, why in failed:
                seqs[live[r]].fail(why)
            new = [[t] for t in nxt.tolist()]
            if controller is not None:
                controller.record_plain(time.perf_counter() - t_step, rows=len(live))
                spec["plain_steps"] += 1
        steps += 1
    return {"prefill_s": t_prefill, "decode_s": time.perf_counter() - t0 - t_prefill, "steps": steps, "t0": t0,
            "spec": spec if drafter is not None else None, "prefill_experts": prefill_experts}


def _room(seq: Sequence, slack: int) -> int:
    """KV slots a row may still fill after its committed tokens: its pending token, the tokens it may still make
    and a draft's worth (`slack`)."""
    return seq.params.max_new_tokens - len(seq.token_ids) + slack + 1


def draft_slack(drafter, draft_len: int) -> int:
    """KV slots a verification writes past a row's pending token: the draft (a static tree: all its nodes)."""
    tree = getattr(drafter, "tree", None)
    return max(draft_len, shape_nodes(tree)) if tree else draft_len


def kv_capacity(prompt_len: int, max_new_tokens: int, slack: int) -> int:
    """The KV slots a sequence needs from its start (`_prefill`; servers budget KV memory with it)."""
    return prompt_len + max_new_tokens + slack + 1


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


def new_sequence(prompt_ids: list[int], params: SamplingParams, eos_ids: set[int], tokenizer: Tokenizer | None
                 ) -> Sequence:
    eos = set() if params.ignore_eos else set(eos_ids)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids) if tokenizer is not None else None
    stops = StopStringMatcher(params.stop) if params.stop and tokenizer is not None else None
    return Sequence(prompt_ids, params, eos, detok, stops)
