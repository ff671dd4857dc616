"""A measuring instrument for the performance model: drafts of a chosen acceptance at no cost.

MoESD's question (when does speculation pay, as a function of batch) is about the target's verification costs;
a real drafter mixes in its own costs and an acceptance that differs by model. The oracle knows each sequence's
plain greedy continuation (`reference`) and proposes it, each draft token correct with probability `acceptance`
(seeded) and otherwise replaced by another token, so the same acceptance can be measured on an MoE and on a dense
model. Greedy verification keeps the output equal to the reference whatever it drafts.
"""
from __future__ import annotations

import random

from ..spec_decode.drafters import Draft, Drafter


class OracleDrafter(Drafter):
    def __init__(self, reference: dict[tuple[int, ...], list[int]], acceptance: float, vocab: int, seed: int = 0):
        """reference: prompt ids (as a tuple) -> its plain greedy output ids."""
        self.reference, self.acceptance, self.vocab = reference, acceptance, vocab
        self.rng = random.Random(seed)
        self.prompt_of: dict = {}           # sequence key -> its reference output
        self.prompt_len: dict = {}

    def propose(self, key, context: list[int], k: int, params, generator) -> Draft:
        ref = self._ref(key, context)
        done = len(context) - self.prompt_len[key]          # output tokens so far, the pending one included
        out = []
        for t in ref[done:done + k]:
            out.append(t if self.rng.random() < self.acceptance else (t + 1) % self.vocab)
        return Draft(out)

    def _ref(self, key, context):
        if key not in self.prompt_of:
            for prompt, ref in self.reference.items():
                if tuple(context[:len(prompt)]) == prompt:
                    self.prompt_of[key], self.prompt_len[key] = ref, len(prompt)
                    break
            else:
                raise KeyError("the oracle has no reference for this prompt")
        return self.prompt_of[key]

    def forget(self, key) -> None:
        self.prompt_of.pop(key, None)
