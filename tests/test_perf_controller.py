"""The online controller on a simulated workload: off with a useless drafter, near the best fixed k with a good one."""
import numpy as np
import pytest

from moespec.perf.controller import (SpecController, SpecStep, acceptance_bounds, depth_acceptance,
                                     estimate_acceptance, expected_accepted_depth)
from moespec.perf.spec import expected_accepted
from moespec.perf.union import expected_union

TD = 1e-3                                             # draft seconds per token


def verify_s(t):                                       # Mixtral-like: fixed part + expert union growth
    return 2e-3 + 4e-3 * expected_union(8, 2, t)


def iid(a):
    """A drafter whose every draft token is accepted with probability a, independently."""
    return lambda rng, k: int((rng.random(k) < a).cumprod().sum())


def bursty(p, stay):
    """Prompt lookup's shape: with probability p the draft copies a repeated span, whose tokens are accepted
    while the span lasts (each next one with probability `stay`); otherwise the first token is wrong."""
    return lambda rng, k: int((rng.random(k) < stay).cumprod().sum()) if rng.random() < p else 0


def simulate(policy, a, tokens=1500, seed=0, noise=0.05, lens=True):
    """Tokens/s of a decode run; `policy` is a SpecController or a fixed k; `a` an acceptance (i.i.d. drafts)
    or a drafter (rng, k) -> accepted. Returns (rate, ks chosen)."""
    draw = a if callable(a) else iid(a)
    rng = np.random.default_rng(seed)
    clock, made, ks = 0.0, 0, []
    while made < tokens:
        k = policy.next_k() if isinstance(policy, SpecController) else policy
        ks.append(k)
        jitter = lambda: 1 + noise * rng.standard_normal()  # noqa: E731
        if k == 0:
            dt = verify_s(1) * jitter()
            clock, made = clock + dt, made + 1
            if isinstance(policy, SpecController):
                policy.record_plain(dt)
            continue
        acc = draw(rng, k)
        d, v = k * TD * jitter(), verify_s(k + 1) * jitter()
        clock, made = clock + d + v, made + acc + 1
        if isinstance(policy, SpecController):
            policy.record_spec(k, d, v, acc, lens=[acc] if lens else ())
    return made / clock, ks


@pytest.mark.parametrize("a", [0.0, 0.05, 0.5])
def test_switches_off_with_a_drafter_that_loses(a):
    plain, _ = simulate(0, a)
    c = SpecController()
    rate, ks = simulate(c, a)
    assert not c.enabled and c.switches >= 1
    assert ks[len(ks) // 4:].count(0) / len(ks[len(ks) // 4:]) > 0.95     # plain decoding after the switch
    assert rate >= 0.95 * plain                                          # within 5% of plain decoding


def expected_rate(k, a):
    """Tokens/s of a fixed draft length k in expectation (k = 0: plain decoding)."""
    return 1 / verify_s(1) if k == 0 else expected_accepted(a, k) / (k * TD + verify_s(k + 1))


@pytest.mark.parametrize("a,seed", [(0.8, 0), (0.8, 4), (0.9, 1), (0.95, 2)])
def test_stays_on_near_the_best_fixed_draft_length(a, seed):
    fixed = {k: expected_rate(k, a) for k in range(0, 9)}
    k_best = max(fixed, key=fixed.get)
    assert k_best > 0 and fixed[k_best] > 1.08 * fixed[0]
    c = SpecController()
    rate, ks = simulate(c, a, tokens=3000, seed=seed)
    assert c.enabled
    assert rate >= 0.95 * fixed[k_best]                                  # within 5% of the best fixed k
    late = ks[len(ks) // 2:]
    k_mode = max(set(late), key=late.count)
    assert fixed[k_mode] >= 0.95 * fixed[k_best]                         # picks a k about as good as the best


def test_pinned_k_is_obeyed_and_estimates():
    c = SpecController(pinned_k=2)
    simulate(c, 0.0, tokens=300)
    assert c.next_k() == 2 and c.enabled
    assert c.acceptance() == 0.0 and c.measured_speedup() < 0.8
    steps = [SpecStep(4, 0.0, 1.0, int(x)) for x in np.random.default_rng(0).geometric(0.3, 2000).clip(max=5) - 1]
    assert estimate_acceptance(steps) == pytest.approx(0.7, abs=0.03)
    a, lo, hi = acceptance_bounds([SpecStep(1, 0.0, 1.0, 0)] * 30)
    assert (a, lo) == (0.0, 0.0) and hi == pytest.approx(0.118, abs=1e-3)


def test_depth_acceptance_reads_bursty_drafts():
    steps = [SpecStep(4, 0.0, 1.0, n, 1, (n,)) for n in [0, 4] * 50]
    c = depth_acceptance(steps, a=estimate_acceptance(steps), prior=0.0)
    assert c == [0.5, 1.0, 1.0, 1.0]
    assert expected_accepted_depth(c, 4) == 3.0 and expected_accepted_depth(c, 8) == 5.0   # deeper: last c
    assert depth_acceptance([SpecStep(4, 0.0, 1.0, 2)], a=0.5) is None                     # no lengths
    # Two rows of one step, lengths 1 and 3 at k = 3: depth 1 both, depth 2 one of one, depth 3 one of one.
    assert depth_acceptance([SpecStep(3, 0.0, 1.0, 4, 2, (1, 3))], a=0.5, prior=0.0) == [1.0, 0.5, 1.0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bursty_drafter_gets_near_the_best_fixed_draft_length(seed):
    """With prompt-lookup-like drafts the i.i.d. model undervalues long drafts; per-depth acceptance does not."""
    draw = bursty(0.6, 0.97)
    fixed = {k: simulate(k, draw, tokens=20000, seed=10 + k, noise=0.0)[0] for k in range(0, 9)}
    k_best = max(fixed, key=fixed.get)
    assert k_best == 8
    rate, ks = simulate(SpecController(), draw, tokens=4000, seed=seed)
    assert rate >= 0.95 * fixed[k_best]
    late = ks[len(ks) // 2:]
    assert max(set(late), key=late.count) >= 7
    old, _ = simulate(SpecController(), draw, tokens=4000, seed=seed, lens=False)   # i.i.d. model only
    assert rate > old


def test_verify_seconds_price_the_width_and_the_full_batch():
    """Prompt lookup often drafts fewer than k tokens: a step asked for k = 8 that verified 3 tokens per row is the
    price of 3, not of 9. And the last steps of a batch, with fewer rows, do not price a full step."""
    c = SpecController(k_max=8)
    c.record_spec(8, 0.0, 0.003, 2, rows=4, width=3)
    c.record_spec(8, 0.0, 0.009, 8, rows=4, width=9)
    c.record_spec(4, 0.0, 0.004, 1, rows=4)                 # width unknown: k + 1
    assert {t: list(v) for t, v in c.verify.items()} == {3: [0.003], 9: [0.009], 5: [0.004]}
    c.record_spec(8, 0.0, 0.001, 2, rows=1, width=9)        # one row left: cheaper, not a full step's price
    c.record_plain(0.0005, rows=1)
    assert list(c.verify[9]) == [0.009] and not c.plain


def test_the_model_over_all_draft_lengths_matches_the_formula():
    """best_k prices every k at once (it runs before every step); each entry is sigma(k) T(1) / (k T_draft + T(k+1))
    with sigma from the per-depth acceptance, or i.i.d. at a given acceptance."""
    c = SpecController(k_max=8)
    simulate(c, bursty(0.6, 0.9), tokens=400)
    t1, td, depths = c.t_plain(), c.t_draft(), c.depths()
    for k in range(1, 9):
        step = k * td + c.t_verify(k + 1)
        assert c.predicted(k) == pytest.approx(expected_accepted_depth(depths, k) * t1 / step, rel=1e-9)
        assert c.predicted(k, a=0.7) == pytest.approx(expected_accepted(0.7, k) * t1 / step, rel=1e-9)
    s = [c.predicted(k) for k in range(1, 9)]
    assert c.best_k() == (1 + s.index(max(s)), max(s))
    assert SpecController().best_k() == (0, 1.0)                 # nothing measured yet
