"""`--spec auto`: pick the drafter as well as the draft length, from measurements, and decode plainly when none pays.

Pure bookkeeping, like controller.py (which it builds on: one SpecController per candidate drafter picks that
drafter's k and knows its acceptance, draft cost and verify cost). The generation loop asks `next_step()` for
(drafter name, k) before each step (k = 0: a plain step) and reports the step with `record_spec` / `record_plain`.

- Explore: each candidate, in the order given (best first by the performance model's guess), runs `explore`
  speculative steps at its controller's initial k.
- Settle: while another candidate's optimistic prediction beats the leader's pessimistic one, it gets `probe`
  more steps (up to `settle` steps in all).
- Exploit: the candidate whose controller predicts the highest speedup (measured acceptance per depth, measured
  draft and verify seconds, the best k) drafts at that k (a longer one now and then, to measure it). Plain steps
  when even its optimistic model loses; speculation again once its estimate clearly wins.
- Revisit: every `revisit` steps one of the others whose optimistic prediction (upper bounds of their per-depth
  acceptance) beats the active one's estimate gets `probe` steps, the one revisited longest ago (any other once
  the interval has reached its maximum), so a drafter that starts to win (prompt lookup once the output repeats
  its prompt) is noticed;
  the interval doubles after each revisit that changes nothing, and starts over after one that does.
Plain steps are reported to every candidate's controller, and they share one table of verification costs: both
are the target's, whoever drafted.
"""
from __future__ import annotations

from .controller import SpecController, acceptance_bounds


class DrafterChooser:
    def __init__(self, names: list[str], k_max: int = 8, k_init: int = 3, explore: int = 3, revisit: int = 32,
                 revisit_max: int = 512, probe: int = 2, settle: int = 16, hysteresis: float = 0.03, **controller_kw):
        if not names:
            raise ValueError("DrafterChooser needs at least one candidate drafter")
        self.names = list(names)
        self.ctl = {n: SpecController(k_max=k_max, k_init=k_init, **controller_kw) for n in names}
        # Verification costs the same whoever drafted (t tokens per row through the target): one table for all,
        # so a candidate's draft length is priced from every step measured, not from its own few.
        shared = self.ctl[names[0]].verify
        for c in self.ctl.values():
            c.verify = shared
        self.explore, self.probe, self.settle, self.hysteresis = explore, probe, settle, hysteresis
        self.revisit0, self.revisit, self.revisit_max = revisit, revisit, revisit_max
        self.queue: list[str] = [n for n in names for _ in range(explore)]    # steps owed to candidates
        self.active = names[0]
        self.since = 0                          # steps since the last revisit
        self.steps = {n: 0 for n in names}
        self.switches = 0
        self.on = True
        self._probing: str | None = None        # the leader when a revisit started, until it ends
        self._probed: dict[str, int] = {}       # candidate -> the step its last revisit started
        self.since_start = 0                    # steps handed out
        self.last: str | None = None            # the drafter of the step handed out last (what record_spec reports)

    def _score(self, name: str) -> float:
        k, s = self.ctl[name].best_k()
        return s if k > 0 else 0.0

    def _low(self, name: str) -> float:
        """The candidate's speedup at the lower end of its acceptance interval (controller.acceptance_bounds)."""
        c = self.ctl[name]
        b = acceptance_bounds(c.spec, c.z, c.acceptance())
        return c.best_k(b[1])[1] if b else 0.0

    def _warm(self) -> bool:
        c = self.ctl[self.names[0]]
        return len(c.plain) >= c.warmup_plain

    def next_step(self) -> tuple[str | None, int]:
        """(drafter, k) for the next step; k = 0 is a plain step (drafter None)."""
        if not self._warm():                    # the plain step's cost first: every speedup is measured against it
            return None, 0
        if self.queue:
            name = self.queue[0]
            # At least k_init deep: a probe at k = 1 would never measure the later depths that may make it win.
            c = self.ctl[name]
            k = c.pinned_k or max(c.k_init, c.best_k()[0] if len(c.spec) >= c.min_steps else 0)
            self.last = name
            return name, k
        best = max(self.names, key=self._score)
        if best != self.active and self._score(best) > (1 + self.hysteresis) * self._score(self.active):
            self.active, self.switches = best, self.switches + 1     # a clear lead only: noise must not flap it
        best = self.active
        if self._probing is not None:           # a revisit just ended: a winner keeps revisits frequent
            if best != self._probing:
                self.revisit = self.revisit0
            self._probing = None
        # Settle close calls now: a candidate whose optimistic model beats the leader's pessimistic one gets more
        # steps, up to `settle` in all (acceptance from a few steps is uncertain, and the draft length it
        # favours with it).
        low = max(self._low(best), 1.0)         # a candidate that cannot beat plain decoding needs no more steps
        close = [n for n in self.names if n != best and self.steps[n] < self.settle
                 and self.ctl[n].best_k(upper=True)[1] > low]
        if close:
            self.queue = [n for n in close for _ in range(self.probe)]
            return self.next_step()
        self.since += 1
        self.since_start += 1
        if self.since >= self.revisit and len(self.names) > 1:
            self._schedule_revisit()
        # On / off with hysteresis, as controller.py: off when even the leader's optimistic model loses, on again
        # once its estimate clearly wins (the revisits keep measuring while off).
        c = self.ctl[self.active]
        k, s = c.best_k()
        if self.on and (k == 0 or c.best_k(upper=True)[1] < 1 - c.margin):
            self.on, self.switches = False, self.switches + 1
        elif not self.on and k > 0 and s >= 1 + c.margin:
            self.on, self.switches = True, self.switches + 1
        if not self.on:
            self.last = None
            return None, 0
        self.last = self.active
        return self.active, c.explore_k(k)

    def _schedule_revisit(self) -> None:
        """Queue probe steps of one candidate (or none) other than the active drafter."""
        self.since = 0
        # Candidates whose optimistic model (upper bounds of their per-depth acceptance) could beat the
        # active one are measured again soon; when none could, all are, ever more rarely.
        now = max(self._score(self.active), 1.0)
        hopeful = [n for n in self.names if n != self.active and self.ctl[n].best_k(upper=True)[1] > now]
        # Only those that could win are probed; once the interval has grown to its maximum, all of them (a
        # drafter's acceptance changes with the text: prompt lookup once the output repeats its prompt).
        if not hopeful and self.revisit >= self.revisit_max:
            hopeful = [n for n in self.names if n != self.active]
        # One candidate per revisit, the one measured longest ago: a probe step of a drafter that loses costs
        # a whole step (at batch 64 a batch is 8 steps, and probing three candidates at once cost 6-10%).
        hopeful = sorted(hopeful, key=lambda n: self._probed.get(n, -1))[:1]
        for n in hopeful:
            self._probed[n] = self.since_start
        self.queue = [n for n in hopeful for _ in range(self.probe)]
        self._probing = self.active if hopeful else None
        self.revisit = min(2 * self.revisit, self.revisit_max)      # back to revisit0 if a probe wins

    def record_spec(self, k: int, draft_s: float, verify_s: float, accepted: int, rows: int = 1, lens=(),
                    width: int | None = None) -> None:
        """Report the speculative step next_step() handed out (its drafter is `last`)."""
        name = self.last
        self.steps[name] += 1
        if self.queue and self.queue[0] == name:
            self.queue.pop(0)
        self.ctl[name].record_spec(k, draft_s, verify_s, accepted, rows, lens, width)

    def record_plain(self, step_s: float, rows: int = 1) -> None:
        for c in self.ctl.values():
            c.record_plain(step_s, rows)

    def stats(self) -> dict:
        return {"active": self.active, "on": self.on, "switches": self.switches, "steps": dict(self.steps),
                "predicted_speedup": {n: self.ctl[n].best_k()[1] for n in self.names},
                "best_k": {n: self.ctl[n].best_k()[0] for n in self.names},
                "acceptance": {n: self.ctl[n].acceptance() for n in self.names}}
