"""One continuous batch on a loaded model, stepped by its caller, as nano-vllm's LLMEngine.

`LLM.generate` and the server's engine thread both run the same loop: `add` sequences, `step()` until it returns
False, adding more between steps (continuous batching: newcomers join at the next step), then `outputs()`.
"""
from __future__ import annotations

from typing import Callable

from .outputs import Output, early_output, final_output
from .perf.chooser import DrafterChooser
from .perf.controller import SpecController
from .sequence import Sequence
from .step_engine import StepEngine


class Batch:
    """llm: a loaded engine.LLM. Hooks (StepEngine's): on_text(i, delta) as text decodes; aborted(i), asked before
    each step, ends sequence i ("abort") when True; on_finish(i, early Output) as soon as sequence i has ended (its
    stats are its own: the batch's exist once the batch ends). keep: keep every sequence for `outputs()`; without it
    (a server, whose batch may never drain) a finished sequence is gone once on_finish has its Output. release (with
    keep): a finished sequence drops its tokens once on_finish has its Output; its final Output carries its stats."""

    def __init__(self, llm, size: int, on_text: Callable[[int, str], None] | None = None,
                 aborted: Callable[[int], bool] | None = None,
                 on_finish: Callable[[int, Output], None] | None = None, keep: bool = True, release: bool = False):
        self.llm, self.size, self.keep, self.release = llm, size, keep, release and on_finish is not None
        self.seqs: list[Sequence] = []                 # with keep: every sequence, in the order added
        self.on_finish = on_finish
        self.controller = _controller(llm, size)
        self.before = llm.expert_stats() if llm.offload is not None else None
        self.engine = StepEngine(llm.model, llm.drafter, llm.spec.k_max if llm.spec else 0, llm.budget,
                                 self.controller, on_text, aborted, self._finished)

    def _finished(self, i: int, s: Sequence) -> None:
        if self.on_finish is not None:
            self.on_finish(i, early_output(self.llm, s))
        if self.release:
            s.release()

    def add(self, seqs: list[Sequence]) -> range:
        """Sequences (LLM.sequences) joining at the next step, numbered after those added before; returns their
        numbers."""
        if self.keep:
            self.seqs.extend(seqs)
        return self.engine.add(seqs)

    @property
    def spec(self):
        """The batch's speculation counters so far (SpecStats)."""
        return self.engine.spec

    def step(self) -> bool:
        """One step of the batch (StepEngine.step); False once nothing is left to decode."""
        return self.engine.step()

    @property
    def live_rows(self) -> int:
        return len(self.engine.live)

    def outputs(self) -> list[Output]:
        """Every sequence's Output (a batch made with keep), in the order they joined, with the batch's counters."""
        llm, timing = self.llm, self.engine.timing()
        if self.controller is not None:
            timing["spec"].controller = self.controller.stats()
        if self.before is not None:
            timing["experts"] = _expert_counters(llm, self.before, timing.pop("prefill_experts"))
        return [final_output(llm, s, timing, self.size) for s in self.seqs]


def _controller(llm, size: int):
    """With draft length "auto": one controller per batch size, kept across batches (step costs depend on the batch;
    what it learned about acceptance and costs carries over to the next request)."""
    if llm.spec is None or not llm.spec.adaptive:
        return None
    if size not in llm.controllers:
        kw = dict(k_max=llm.spec.k_max, k_init=min(3, llm.spec.k_max))
        llm.controllers[size] = DrafterChooser(list(llm.drafter.members), **kw) \
            if llm.spec.method == "auto" else SpecController(**kw)
    return llm.controllers[size]


def _expert_counters(llm, before: dict, mid: dict) -> dict:
    """Expert cache counters of one batch (after minus before); decode_* leave the batch's first prefill out (a
    prefill touches most experts of every layer at once)."""
    after = llm.expert_stats()
    out = {"expert_hits": after["hits"] - before["hits"], "expert_misses": after["misses"] - before["misses"],
           "decode_expert_hits": after["hits"] - mid["hits"], "decode_expert_misses": after["misses"] - mid["misses"],
           "expert_bytes_read": after["bytes_read"] - before["bytes_read"],
           "stall_s": after["stall_s"] - before["stall_s"], "cache_capacity": after["capacity"],
           **{k: after[k] - before[k] for k in ("prefetch_issued", "prefetch_used", "prefetch_wasted")}}
    parts = llm.drafter.parts() if llm.drafter is not None else []
    pf = next((d.prefetcher for d in parts if d.prefetcher is not None), None)     # --spec auto: any member's
    if pf is not None:                       # cumulative since load, like expert_stats()
        out.update(pf.stats())
    return out
