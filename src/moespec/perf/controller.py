"""Online speculation controller: picks the draft length each step and switches speculation off when it loses.

Pure bookkeeping, no engine import. The engine asks `next_k()` before each step (0 = plain decoding), runs the
step, and reports it with `record_spec(...)` or `record_plain(...)`. From a sliding window the controller
estimates
  - acceptance a: the value whose model mean matches the observed accepted drafts, sum over steps of
    rows x (sigma(a, k_i) - 1) = accepted (a moment estimator, exact for i.i.d. acceptance, any k mix);
  - T_draft: seconds per draft forward; T(t): verify seconds for t tokens per row (the median of recent
    steps; unseen t interpolated between measured ones, extrapolated along the last measured slope, or taken
    from `verify_shape(t)` of the perf model scaled to the measurements);
  - T(1): plain step seconds (measured on plain steps: two at the start and all while speculation is off).
It picks k maximising sigma(k) T(1) / (k T_draft + T(k+1)), now and then trying k + 1 to measure it, where
sigma(k) - 1, the expected accepted drafts, is read from the window's per-row accepted lengths when the engine
reports them: sum over depths j <= k of P(a row accepts >= j drafts), each depth's conditional acceptance
counted over the steps that drafted that deep (smoothed toward a with 2 pseudo-steps; depths never drafted
take the deepest measured one). Acceptance is rarely i.i.d.: prompt lookup either finds a long repeated
span or nothing, so its later drafts are accepted more often than its first, and the i.i.d. sigma(a, k)
undervalues long drafts (simulated prompt lookup, tests/test_perf_controller.py: the i.i.d. model alone reached
73-77% of the best fixed draft length's tokens/s, per depth 101-105%).
Off, only on clear evidence (z = 2 standard errors; noise must not flap it): when the upper confidence bound
of the window's measured speedup (tokens/s of its speculative steps over plain tokens/s) is below 1 - margin
and the optimistic model (each depth's upper bound) sees no k reaching 1, or when the optimistic models (i.i.d.
with the upper bound of a, and per depth) predict no k reaching 1 - margin. On again
after a probe (`probe_steps` steps every `probe_every` plain steps, the interval doubling after each failed
probe, up to `probe_max`) only if the model then predicts at least 1 + margin: hysteresis.
A user can pin k (`pinned_k`): the controller then only measures.
"""
from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass
from typing import Callable

import statistics

import numpy as np


@dataclass(frozen=True)
class SpecStep:
    k: int
    draft_s: float
    verify_s: float
    accepted: int      # accepted draft tokens, summed over rows (the bonus / recovered token not included)
    rows: int = 1
    lens: tuple[int, ...] = ()   # accepted drafts of each row, when known (their sum is `accepted`)

    @property
    def emitted(self) -> int:
        return self.accepted + self.rows


_GRID = np.linspace(0.0, 1.0, 2049)


@functools.cache
def _accepted_on_grid(k: int) -> np.ndarray:
    """sigma(a, k) - 1 = a + a^2 + ... + a^k on the grid (computed once per k; callers must not modify it)."""
    return np.cumsum(np.cumprod(np.broadcast_to(_GRID, (k, len(_GRID))), axis=0), axis=0)[-1]


def estimate_acceptance(steps) -> float | None:
    """Per-token acceptance a with sum rows * (sigma(a, k) - 1) = sum accepted (None if no data).

    The left side grows with a, so a is read off a grid of 2049 values (resolution 5e-4)."""
    rows_by_k: dict[int, int] = {}
    target = 0
    for s in steps:
        if s.k > 0:
            rows_by_k[s.k] = rows_by_k.get(s.k, 0) + s.rows
            target += s.accepted
    if not rows_by_k:
        return None
    if target <= 0:
        return 0.0
    f = sum(r * _accepted_on_grid(k) for k, r in rows_by_k.items())
    return float(_GRID[min(int(np.searchsorted(f, target)), len(_GRID) - 1)])


def depth_acceptance(steps, a: float, prior: float = 2.0, z: float = 0.0) -> list[float] | None:
    """Conditional acceptance per draft depth, c[j-1] = P(row accepts >= j | it accepted >= j - 1), from the
    steps that report per-row lengths and drafted at least j (smoothed toward a with `prior` pseudo-rows;
    with z > 0 each is the upper end of its Wilson interval); None without such steps.
    Example: lengths 0 and 4 at k = 4 give c = [0.5, 1, 1, 1] before smoothing."""
    steps = [s for s in steps if s.k > 0 and s.lens]
    if not steps:
        return None
    # One row per (step, row): its k and accepted length n, vectorised (this runs before every step).
    ks = np.array([s.k for s in steps for _ in s.lens])
    ns = np.minimum(np.array([n for s in steps for n in s.lens]), ks)
    depth = np.arange(1, int(ks.max()) + 1)[None, :]                  # [1, k_top]
    drafted = depth <= ks[:, None]                                     # [rows, k_top]
    reached = np.concatenate(([0.0], (drafted & (ns[:, None] >= depth - 1)).sum(0)))
    accepted = np.concatenate(([0.0], (drafted & (ns[:, None] >= depth)).sum(0)))
    n = reached[1:] + prior
    p = (accepted[1:] + prior * a) / n
    if z > 0:                                  # Wilson upper bounds, as in acceptance_bounds
        z2 = z * z
        p = ((p + z2 / (2 * n)) + z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))) / (1 + z2 / n)
    return [float(min(1.0, x)) for x in p]


def expected_accepted_depth(c: list[float], k: int) -> float:
    """sigma(k): 1 + sum over j <= k of prod_{i <= j} c_i; depths past the measured ones repeat the last c."""
    sigma, reach = 1.0, 1.0
    for j in range(k):
        reach *= c[min(j, len(c) - 1)]
        sigma += reach
    return sigma


def acceptance_bounds(steps, z: float = 2.0, a: float | None = None) -> tuple[float, float, float] | None:
    """(estimate, lower, upper): a Wilson interval over the Bernoulli trials the steps observed, i.e. the
    accepted drafts plus the expected rejections rows x (1 - a^k). Example: 30 steps at k = 1, none accepted:
    (0.0, 0.0, 0.118)."""
    a = estimate_acceptance(steps) if a is None else a
    if a is None:
        return None
    steps = [s for s in steps if s.k > 0]
    succ = sum(s.accepted for s in steps)
    n = succ + sum(s.rows * (1 - a ** s.k) for s in steps)
    if n <= 0:
        return a, 0.0, 1.0
    p, z2 = succ / n, z * z
    mid = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return a, max(0.0, mid - half), min(1.0, mid + half)


class SpecController:
    def __init__(self, k_max: int = 8, k_init: int = 3, window: int = 64, margin: float = 0.05, z: float = 2.0,
                 min_steps: int = 6, warmup_plain: int = 2, probe_every: int = 32, probe_max: int = 256,
                 probe_steps: int = 4, explore_every: int = 8, pinned_k: int | None = None,
                 verify_shape: Callable[[int], float] | None = None):
        self.k_max, self.k_init, self.margin, self.min_steps, self.z = k_max, k_init, margin, min_steps, z
        self.warmup_plain, self.probe_steps = warmup_plain, probe_steps
        self.probe_every0, self.probe_every, self.probe_max = probe_every, probe_every, probe_max
        self.pinned_k, self.verify_shape = pinned_k, verify_shape
        self.spec: deque[SpecStep] = deque(maxlen=window)
        self.plain: deque[float] = deque(maxlen=window)     # seconds per plain step
        self.verify: dict[int, deque[float]] = {}            # t -> recent verify seconds
        self.enabled = True
        self.plain_since_off = 0
        self.probing, self.probe_k = 0, 1                   # speculative steps left in the probe, its k
        self.switches = 0
        self.steps_on, self.explore_every = 0, explore_every
        self._memo: dict = {}                                # estimates of the current window; reset on record
        self.rows_max = 0                                    # the most rows a step has run: the batch's full size

    def _cached(self, key, fn):
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    # -- estimates ----------------------------------------------------------------------------------------------
    def t_plain(self) -> float | None:
        """Seconds of a plain step: median of recent plain steps (else the verify model at t = 1)."""
        if self.plain:
            return self._cached("t1", lambda: statistics.median(self.plain))
        return self.t_verify(1)

    def _points(self) -> dict[int, tuple[float, int]]:
        """t -> (median seconds, steps) of the measured widths (plain steps give t = 1)."""
        def build():
            pts = {tt: (statistics.median(v), len(v)) for tt, v in self.verify.items() if v}
            if self.plain:
                pts.setdefault(1, (statistics.median(self.plain), len(self.plain)))
            return pts
        return self._cached("pts", build)

    def t_verify(self, t: int, settled: int = 4) -> float | None:
        """Verify seconds for t tokens per row. A width measured `settled` times or more: the median of its recent
        steps. Otherwise a local straight line through the medians of the (up to 4) nearest measured widths, each
        weighted by its steps (at most 8): single steps vary widely on a shared machine, and choosing k weighs
        neighbouring widths against each other, so one unlucky step must not decide it (at batch 64, where a batch
        is 8 steps at k = 16, single samples kept k at 16 although k = 8 ran faster). Beyond the measured
        widths the line extends, rising or flat; with `verify_shape` (the perf model's curve) that shape, scaled to
        the measurements, prices the unmeasured widths instead."""
        pts = self._points()
        if not pts:
            return None
        if t in pts and pts[t][1] >= settled:
            return pts[t][0]
        if self.verify_shape is not None:
            if t in pts:
                return pts[t][0]
            scale = float(np.median([v / self.verify_shape(tt) for tt, (v, _) in pts.items()]))
            return scale * self.verify_shape(t)
        near = sorted(pts, key=lambda x: (abs(x - t), x))[:4]
        if len(near) == 1:                              # nothing to lean on: cost grows like the tokens
            return pts[near[0]][0] * t / near[0]
        x = np.array(near, float)
        y = np.array([pts[v][0] for v in near])
        w = np.array([min(pts[v][1], 8) for v in near], float)
        xm, ym = (w * x).sum() / w.sum(), (w * y).sum() / w.sum()
        slope = max(float((w * (x - xm) * (y - ym)).sum() / (w * (x - xm) ** 2).sum()), 0.0)
        return max(ym + slope * (t - xm), 0.5 * float(y.min()))

    def t_draft(self) -> float | None:
        """Seconds per draft forward (all rows): the median over the window's steps of draft seconds / k (a median:
        a drafter's first steps can be many times slower, its kernels warming up, and must not brand it for good)."""
        def build():
            per = [s.draft_s / s.k for s in self.spec if s.k > 0]
            return statistics.median(per) if per else None
        return self._cached("td", build)

    def acceptance(self) -> float | None:
        return self._cached("a", lambda: estimate_acceptance(self.spec))

    def depths(self, z: float = 0.0) -> list[float] | None:
        """Conditional acceptance per draft depth over the window (`depth_acceptance`; z > 0: upper bounds),
        None without per-row lengths."""
        a = self.acceptance()
        return None if a is None else self._cached(("c", z), lambda: depth_acceptance(self.spec, a, z=z))

    def speedups(self, a: float | None = None, upper: bool = False) -> np.ndarray | None:
        """Model speedup of every draft length k = 1..k_max [k_max] from the current estimates, None before there is
        anything to predict from: sigma(k) x T(1) / (k T_draft + T(k + 1)), sigma from the per-depth acceptance when
        rows' lengths are known (their upper bounds when `upper`), else (or when an acceptance `a` is given) i.i.d.
        at a."""
        def build():
            c = self.depths(self.z if upper else 0.0) if a is None else None
            a_ = self.acceptance() if a is None else a
            td, t1 = self.t_draft(), self.t_plain()
            tk = [self.t_verify(k + 1) for k in range(1, self.k_max + 1)]
            if None in (a_, td, t1) or None in tk:
                return None
            c = c or [a_]
            step = np.arange(1, self.k_max + 1) * td + np.array(tk)           # [K] seconds of a step at k
            sigma = 1.0 + np.cumsum(np.cumprod([c[min(j, len(c) - 1)] for j in range(self.k_max)]))
            return sigma * t1 / step
        return self._cached(("s", a, upper), build)

    def predicted(self, k: int, a: float | None = None, upper: bool = False) -> float | None:
        """Model speedup of draft length k (`speedups`)."""
        s = self.speedups(a, upper)
        return None if s is None else float(s[k - 1])

    def best_k(self, a: float | None = None, upper: bool = False) -> tuple[int, float]:
        """(k, predicted speedup) maximising the model over 1..k_max (`speedups`); the speedup may be below 1;
        (0, 1.0) before there is anything to predict from. Memoised until the next record (it runs before every
        step)."""
        s = self.speedups(a, upper)
        if s is None:
            return 0, 1.0
        k = int(np.argmax(s))
        return k + 1, float(s[k])

    def measured_speedup(self, steps=None, z: float = 0.0) -> float | None:
        """Tokens/s of the given speculative steps (default: the window) over plain tokens/s; with z > 0, that
        plus z standard errors of the per-step speedups (an upper confidence bound)."""
        steps = list(self.spec if steps is None else steps)
        t1 = self.t_plain()
        if not steps or t1 is None:
            return None
        rows = sum(s.rows for s in steps) / len(steps)
        rate = sum(s.emitted for s in steps) / sum(s.draft_s + s.verify_s for s in steps)
        point = rate / (rows / t1)
        if z <= 0 or len(steps) < 2:
            return point
        per = np.array([s.emitted * t1 / (s.rows * (s.draft_s + s.verify_s)) for s in steps])
        return point + z * float(per.std(ddof=1)) / len(per) ** 0.5

    # -- decisions ----------------------------------------------------------------------------------------------
    def next_k(self) -> int:
        """Draft length for the next step; 0 means a plain decoding step."""
        if self.pinned_k is not None:
            return self.pinned_k
        if len(self.plain) < self.warmup_plain and not self.spec:
            return 0
        if self.probing:
            return self.probe_k
        if not self.enabled:
            return 0
        if len(self.spec) < self.min_steps:
            return self.k_init
        k, s = self.best_k()
        s_hi = s
        if s < 1 - self.margin:           # the optimistic models only matter when the estimate loses
            bounds = self._cached("bounds", lambda: acceptance_bounds(self.spec, self.z, self.acceptance()))
            s_hi = max(self.best_k(upper=True)[1], self.best_k(bounds[2])[1] if bounds else 1.0)
        if k == 0 or s_hi < 1 - self.margin:           # even an optimistic acceptance loses: off, probe later
            self._switch_off()
            return 0
        return self.explore_k(k)

    def explore_k(self, k: int) -> int:
        """k, or k + 1 now and then to measure it."""
        self.steps_on += 1
        # Explore one longer draft now and then, so verify costs beyond the current k are measured, not guessed
        # (unmeasured lengths are priced by extrapolation, which overprices a concave cost): every other step
        # while k is the longest length measured so far, every `explore_every` steps otherwise.
        every = 2 if not self.verify or k + 1 >= max(self.verify) else self.explore_every
        if self.steps_on % every == 0 and k < self.k_max:
            return k + 1
        return k

    def _full(self, rows: int) -> bool:
        """Whether a step ran the whole batch: step costs are priced at the batch's full size. The last steps of a
        batch run fewer rows (rows finish at different steps) and cost less; taken as the price of a full step
        they made long drafts look cheap."""
        self.rows_max = max(self.rows_max, rows)
        return rows >= self.rows_max

    def next_step(self) -> tuple[None, int]:
        """(drafter, k) as DrafterChooser gives it (perf/chooser.py): this controller has one drafter (None)."""
        return None, self.next_k()

    def record_plain(self, step_s: float, rows: int = 1) -> None:
        """Report a plain decoding step (one token per row)."""
        self._memo = {}
        if self._full(rows):
            self.plain.append(step_s)
        if not self.enabled and self.pinned_k is None and not self.probing:
            self.plain_since_off += 1
            if self.plain_since_off >= self.probe_every:    # probe at the k an optimistic acceptance favours
                bounds = acceptance_bounds(self.spec, self.z)
                k, s = self.best_k(bounds[2] if bounds else None)
                if self.depths() and self.best_k(upper=True)[1] > s:      # per depth, optimistic
                    k = self.best_k(upper=True)[0]
                self.probing, self.probe_k, self.plain_since_off = self.probe_steps, max(1, k), 0

    def record_spec(self, k: int, draft_s: float, verify_s: float, accepted: int, rows: int = 1,
                    lens: list[int] | tuple[int, ...] = (), width: int | None = None) -> None:
        """Report a speculative step: k drafted per row, timings, accepted drafts summed over rows, and (better)
        each row's accepted drafts in `lens`; `width`: the tokens per row the verification forward really had
        (a drafter may propose fewer than k: prompt lookup near the end of a match), default k + 1. Its seconds
        price that width: pricing k + 1 with a narrower forward's time made long drafts look free. (Acceptance
        still counts a draft shorter than k as rejected from there on: that predicts the tokens a step at k
        really yields.)"""
        if k <= 0:
            return self.record_plain(draft_s + verify_s, rows)
        self._memo = {}
        self.spec.append(SpecStep(k, draft_s, verify_s, accepted, rows, tuple(lens)))
        t = k + 1 if width is None else max(1, min(int(width), k + 1))
        if self._full(rows):
            self.verify.setdefault(t, deque(maxlen=self.spec.maxlen)).append(verify_s)
        if self.pinned_k is not None:
            return
        if self.probing:
            self.probing -= 1
            if self.probing == 0:                      # hysteresis: back on only if clearly better than plain
                _, s = self.best_k()
                if s >= 1 + self.margin:
                    self.enabled, self.probe_every, self.steps_on = True, self.probe_every0, 0
                    self.switches += 1
                else:
                    self.probe_every = min(2 * self.probe_every, self.probe_max)
            return
        if self.enabled and len(self.spec) >= self.min_steps:
            s_hi = self.measured_speedup(z=self.z)
            # The window measured a clear loss, and the model sees no other draft length that would win (a
            # window at a short k can lose where a longer one wins: prompt lookup's long repeated spans).
            if s_hi is not None and s_hi < 1 - self.margin and self.best_k(upper=True)[1] < 1:
                self._switch_off()

    def _switch_off(self) -> None:
        self.enabled, self.plain_since_off = False, 0
        self.switches += 1

    def stats(self) -> dict:
        k, s = self.best_k()
        return {"enabled": self.enabled, "pinned_k": self.pinned_k, "acceptance": self.acceptance(),
                "depth_acceptance": self.depths(),
                "t_plain_s": self.t_plain(), "t_draft_s": self.t_draft(), "best_k": k, "predicted_speedup": s,
                "measured_speedup": self.measured_speedup(), "switches": self.switches,
                "probe_every": self.probe_every}
