"""The engine thread of `moespec serve`: requests queue up and join the running batch between steps.

One thread owns the model (the KV cache, expert cache and drafter state are not shared between threads).
It steps one batch at a time (batch.py); after every step, requests waiting in the queue join it (continuous
batching) as long as the batch has fewer than max_num_seqs sequences.
Events go back to each request's asyncio queue through its event loop: ("text", choice, delta),
("finish", choice, Output), ("error", status, message).
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from ..engine import LLM, Output
from ..errors import MoespecError
from ..spec_decode.stats import SpecStats
from ..heap import release_free_memory
from ..sampling import SamplingParams
from .metrics import ServerMetrics


TRIM_EVERY_S = 1.0          # a trim costs 1-5 ms: at most ~0.5% of a decoding batch's time


class Overloaded(Exception):
    """More requests are waiting than the server was told to hold (the HTTP layer answers 503)."""


class TooLarge(Exception):
    """A request that could never run within the server's KV budget (the HTTP layer answers 400)."""


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
    kv_tokens: int = 0                   # KV slots per row its sequences need (EngineWorker.job_tokens)

    def emit(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:                 # its event loop is closed: nobody is listening any more
            self.cancelled = True


class EngineWorker(threading.Thread):
    """Steps a batch of the waiting jobs (LLM.batch), admitting more while it decodes, at most max_num_seqs
    sequences at once (a job larger than that runs when the batch is empty)."""

    def __init__(self, llm: LLM, metrics: ServerMetrics, max_num_seqs: int = 16, max_waiting: int = 64,
                 kv_budget: int | None = None):
        super().__init__(name="moespec-engine", daemon=True)
        self.llm, self.metrics = llm, metrics
        self.max_num_seqs, self.max_waiting = max_num_seqs, max_waiting
        # KV bytes the batch may hold: every row is sized to the batch's largest (prompt + max_tokens), so a job
        # joins only while rows x that size fits; one that never could is refused when it arrives.
        self.kv_budget = kv_budget
        self._cap = 0                          # KV slots per row of the running batch (its largest job's)
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self._held: Job | None = None          # a job that did not fit the batch: first to join next
        self._stopping = False
        self._running: dict[int, list] = {}    # the jobs of the batch decoding now -> [job, choices left]
        self.last_error: tuple[float, str] | None = None    # (monotonic time, why) of the last failed batch
        self._trimmed = 0.0                    # monotonic time the heap was last trimmed

    def trim_heap(self, force: bool = False) -> None:
        """Return the heap's free pages to the OS, at most once a TRIM_EVERY_S while a batch decodes. Batches of
        ever-changing shapes leave freed blocks between live ones that glibc keeps: a bf16 server's RSS grew 20% over
        a few hundred requests without this, and stays within a few percent with it (docs/serving.md)."""
        now = time.monotonic()
        if force or now - self._trimmed >= TRIM_EVERY_S:
            release_free_memory()
            self._trimmed = time.monotonic()

    def job_tokens(self, job: Job) -> int:
        """KV slots per row the job's sequences need (LLM.kv_row_tokens; the batch sizes rows alike), computed once:
        admission asks after every step while jobs wait."""
        if not job.kv_tokens:
            job.kv_tokens = max(self.llm.kv_row_tokens(len(p), sp.max_new_tokens)
                                for p, sp in zip(job.prompts, job.params))
        return job.kv_tokens

    def _fits(self, rows: int, tokens: int) -> bool:
        return self.kv_budget is None or rows * tokens * self.llm.kv_bytes_per_token <= self.kv_budget

    def submit(self, job: Job) -> None:
        tokens = self.job_tokens(job)
        if not self._fits(len(job.prompts), tokens):
            need = len(job.prompts) * tokens * self.llm.kv_bytes_per_token
            raise TooLarge(f"the request needs {need / 1e6:.1f} MB of KV cache ({len(job.prompts)} sequence(s) x "
                           f"{tokens} tokens: prompt, max_tokens and a draft), more than this server's KV budget of "
                           f"{self.kv_budget / 1e6:.1f} MB (--kv-memory); lower max_tokens, n or the prompt")
        if self.queue.qsize() >= self.max_waiting:
            raise Overloaded(f"{self.queue.qsize()} requests are already waiting (--max-waiting {self.max_waiting})")
        job.t_last = [0.0] * len(job.prompts)
        self.queue.put(job)
        self.metrics.waiting.set(self.queue.qsize())

    def stop(self) -> None:
        self.queue.put(None)                   # wakes a waiting get; the batch decoding now finishes first

    def shutdown(self, timeout_s: float) -> bool:
        """Stop taking jobs and let the running batch finish for up to timeout_s; then cancel every job it still
        decodes (its rows abort at the next step) and those waiting. True when the engine thread has ended."""
        self.stop()
        if self.is_alive():
            self.join(timeout_s)
        if self.is_alive():
            for job in [j for j, _ in list(self._running.values())] + list(self.queue.queue) + [self._held]:
                if job is not None:
                    job.cancelled = True
            self.join(10.0)
        return not self.is_alive()

    def run(self) -> None:
        while not self._stopping:
            self._cap = 0                      # a new batch
            jobs = self._take(self.max_num_seqs, wait=True)
            if jobs:
                self.run_batch(jobs)

    def _take(self, room: int, wait: bool = False, live: int = 0) -> list[Job]:
        """Waiting jobs (oldest first) whose sequences fit in `room` and, with the `live` rows decoding, in the KV
        budget; with wait, block for the first one."""
        jobs, n = [], 0
        while not self._stopping:
            if self._held is not None:
                job, self._held = self._held, None
            else:
                try:
                    job = self.queue.get(block=wait and not jobs)
                except queue.Empty:
                    break
            if job is None:
                self._stopping = True
                break
            if job.cancelled:                  # its client left while it waited
                continue
            tokens = max(self._cap, self.job_tokens(job))
            if (n + len(job.prompts) > room or not self._fits(live + n + len(job.prompts), tokens)) and \
                    (jobs or live or room < self.max_num_seqs):
                self._held = job
                break
            jobs.append(job)
            n += len(job.prompts)
            self._cap = tokens
        self.metrics.waiting.set(self.queue.qsize() + (self._held is not None))
        return jobs

    def _sequences(self, jobs: list[Job]) -> list:
        return self.llm.sequences([p for job in jobs for p in job.prompts], [sp for job in jobs for sp in job.params])

    def _admit(self, n_live: int, left: dict[int, list]) -> list[Job]:
        """Waiting jobs that join the batch (n_live rows decoding) at its next step; asked after every step."""
        if self.queue.empty() and self._held is None:     # the common case
            return []
        # The rows of finished jobs have left (and the engine shrinks the KV to the rows still decoding).
        self._cap = max((self.job_tokens(job) for job, _ in left.values()), default=0)
        more = self._take(self.max_num_seqs - n_live, live=n_live)
        left.update((id(job), [job, len(job.prompts)]) for job in more)
        self.metrics.running.set(len(left))
        return more

    def run_batch(self, jobs: list[Job]) -> None:
        m = self.metrics
        # The jobs still decoding -> [job, choices left] (errors reach them; shutdown cancels them). Nothing of a
        # finished request stays: a batch may never drain while requests keep coming.
        left = self._running = {id(job): [job, len(job.prompts)] for job in jobs}
        m.running.set(len(left))
        try:
            run = _Running(self, left)
            batch = run.batch = self.llm.batch(sum(len(j.prompts) for j in jobs), run.on_text,
                                               lambda i: run.rows[i][0].cancelled, run.on_finish, keep=False)
            run.add(jobs)
            while True:
                busy = batch.step()
                more = self._admit(batch.live_rows, left)
                if more:
                    run.add(more)
                elif not busy:
                    break
            m.speculation(batch.spec, run.seen)
        except Exception as e:       # the engine failed (a read error, say): the batch's requests learn it, the
            # server goes on and /health reports degraded for a while. Requests were validated before queueing,
            # so this is the server's failure, never the client's: a 5xx.
            why = str(e) if isinstance(e, MoespecError) else f"{type(e).__name__}: {e}"
            self.last_error = (time.monotonic(), why)
            for job, _ in left.values():
                job.emit("error", 500, f"the engine failed while decoding: {why}")
        finally:
            m.running.set(0)
            self.trim_heap(force=True)


class _Running:
    """The running batch's side of the worker: which job and choice each sequence is, and its events."""

    def __init__(self, worker: EngineWorker, left: dict[int, list]):
        self.worker, self.m, self.left = worker, worker.metrics, left
        self.rows: dict[int, tuple[Job, int]] = {}      # sequence i -> (job, choice), while it decodes
        self.seen = SpecStats()                          # speculation counters already reported
        self.batch = None

    def add(self, jobs: list[Job]) -> None:
        """The jobs' sequences join the batch, numbered in order after those added before."""
        ids = self.batch.add(self.worker._sequences(jobs))
        self.rows.update(zip(ids, ((job, c) for job in jobs for c in range(len(job.prompts)))))

    def on_text(self, i: int, delta: str) -> None:
        job, c = self.rows[i]
        now = time.perf_counter()
        if job.t_last[c] == 0.0:
            self.m.ttft.observe(now - job.t_arrival)
        else:
            self.m.itl.observe(now - job.t_last[c])
        job.t_last[c] = now
        job.emit("text", c, delta)

    def on_finish(self, i: int, out: Output) -> None:
        job, c = self.rows.pop(i)
        if out.finish_reason != "abort":
            self.m.finished(out, time.perf_counter() - job.t_arrival)
        self.left[id(job)][1] -= 1
        if not self.left[id(job)][1]:
            del self.left[id(job)]
            self.m.running.set(len(self.left))
            self.seen = self.m.speculation(self.batch.spec, self.seen)
            self.worker.trim_heap()
        if out.finish_reason == "error":        # this request failed alone; the batch decodes on
            job.emit("error", 500, f"generation failed for this request: {out.stats.get('error')}")
        else:
            job.emit("finish", c, out)
