"""The generation loop: a StepEngine (step_engine.py) steps until every sequence has stopped.

Kept on one screen on purpose; speculative decoding replaces the decode phase of a step, not the loop.
"""
from __future__ import annotations

from typing import Callable

from .models.decoder import DecoderLM
from .sequence import Sequence
from .step_engine import StepEngine


def generate(model: DecoderLM, seqs: list[Sequence], on_text: Callable[[int, str], None] | None = None,
             drafter=None, draft_len: int = 0, budget=None, controller=None,
             aborted: Callable[[int], bool] | None = None,
             on_finish: Callable[[int, Sequence], None] | None = None) -> dict:
    """Run every sequence to completion in one batch (seqs[i] is sequence i; the engine decodes into them); returns
    StepEngine.timing(). A step either decodes one token per live row or, with a drafter, drafts and verifies
    `draft_len` tokens per row (spec_decode/step.py); a controller (perf/controller.py) instead picks each step's
    draft length, 0 = a plain step. budget: a VerifyBudget that makes verification LOSSY (models/budget.py). The
    hooks are StepEngine's: aborted(i) ends sequence i early, on_finish(i, seq) as soon as it has ended."""
    engine = StepEngine(model, drafter, draft_len, budget, controller, on_text, aborted, on_finish)
    engine.add(seqs)
    while engine.step():
        pass
    return engine.timing()
