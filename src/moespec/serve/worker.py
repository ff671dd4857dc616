"""The engine thread of `moespec serve`: requests queue up; each turn decodes everything waiting as one batch.

One thread owns the model (the KV cache, expert cache and drafter state are not shared between threads).
Requests that arrive while a batch decodes wait for the next turn: batching is per turn, not continuous
(a request cannot join a batch already decoding). Events go back to each request's asyncio queue through
its event loop: ("text", choice, delta), ("finish", choice, Output), ("error", message).
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from ..engine import LLM, Output
from ..errors import MoespecError
from ..sampling import SamplingParams
from .metrics import ServerMetrics


class Overloaded(Exception):
    """More requests are waiting than the server was told to hold (the HTTP layer answers 503)."""


@dataclass
class Job:
    """One HTTP request: its choices (one prompt and SamplingParams each) and where its events go."""
    prompts: list[list[int]]
    params: list[SamplingParams]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False              # set by the HTTP layer when the client goes away
    t_arrival: float = field(default_factory=time.perf_counter)
    t_last: list[float] = field(default_factory=list)    # per choice, time of its last text (for ITL)

    def emit(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class EngineWorker(threading.Thread):
    """Runs `llm.generate` on batches of waiting jobs, at most max_num_seqs sequences per batch."""

    def __init__(self, llm: LLM, metrics: ServerMetrics, max_num_seqs: int = 16, max_waiting: int = 64):
        super().__init__(name="moespec-engine", daemon=True)
        self.llm, self.metrics = llm, metrics
        self.max_num_seqs, self.max_waiting = max_num_seqs, max_waiting
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self._held: Job | None = None          # a job that did not fit the last batch: first in the next

    def submit(self, job: Job) -> None:
        if self.queue.qsize() >= self.max_waiting:
            raise Overloaded(f"{self.queue.qsize()} requests are already waiting (--max-waiting {self.max_waiting})")
        job.t_last = [0.0] * len(job.prompts)
        self.queue.put(job)
        self.metrics.waiting.set(self.queue.qsize())

    def stop(self) -> None:
        self.queue.put(None)

    def run(self) -> None:
        while (batch := self._next_batch()) is not None:
            self.run_batch(batch)

    def _next_batch(self) -> list[Job] | None:
        first = self._held or self.queue.get()
        self._held = None
        if first is None:
            return None
        batch, n = [first], len(first.prompts)
        while True:                               # everything already waiting joins, up to max_num_seqs
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.queue.put(None)
                break
            if n + len(job.prompts) > self.max_num_seqs:
                self._held = job
                break
            batch.append(job)
            n += len(job.prompts)
        self.metrics.waiting.set(self.queue.qsize() + (self._held is not None))
        return batch

    def run_batch(self, batch: list[Job]) -> None:
        jobs = [j for j in batch if not j.cancelled]
        rows = [(job, c) for job in jobs for c in range(len(job.prompts))]    # batch row -> (job, choice)
        if not rows:
            return
        m = self.metrics
        m.running.set(len(jobs))

        def on_text(i: int, delta: str) -> None:
            job, c = rows[i]
            now = time.perf_counter()
            if job.t_last[c] == 0.0:
                m.ttft.observe(now - job.t_arrival)
            else:
                m.itl.observe(now - job.t_last[c])
            job.t_last[c] = now
            job.emit("text", c, delta)

        def on_finish(i: int, out: Output) -> None:
            job, c = rows[i]
            if out.finish_reason != "abort":
                m.finished(out, time.perf_counter() - job.t_arrival)
            job.emit("finish", c, out)

        try:
            outs = self.llm.generate([job.prompts[c] for job, c in rows], [job.params[c] for job, c in rows],
                                     on_text=on_text, aborted=lambda i: rows[i][0].cancelled, on_finish=on_finish)
            m.batch_done(outs[0].stats)
        except MoespecError as e:
            for job in jobs:
                job.emit("error", 400, str(e))
        except Exception as e:       # the engine failed: every request of the batch learns it, the server goes on
            for job in jobs:
                job.emit("error", 500, f"internal error while decoding: {type(e).__name__}: {e}")
        finally:
            m.running.set(0)
