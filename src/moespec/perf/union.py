"""How many distinct experts t routed tokens touch in one MoE layer (the MoE union problem, METHODS.md).

Uniform routing: each token picks K of E experts, so expert e is missed by one token with probability 1 - K/E
and by t independent tokens with probability (1 - K/E)^t:

    U(t) = E * (1 - (1 - K/E)^t)          Mixtral E=8, K=2: U(1) = 2, U(4) = 8 * (1 - 0.75^4) = 5.47

Measured routing profile: p[e] = the fraction of tokens whose top-K contains expert e (sum(p) = K). Assuming
tokens choose independently of each other (true across batch rows, optimistic within one sequence, where
consecutive tokens share experts more often, which lowers the real union), U(t) = sum_e 1 - (1 - p[e])^t.
With p = [0.5, 0.5, 0.5, 0.5, 0, 0, 0, 0] (4 hot experts, K=2) U(4) = 4 * (1 - 0.5^4) = 3.75 instead of 5.47.
"""
from __future__ import annotations

import numpy as np

from .errors import PerfError


def expected_union(E: int, K: int, t: float) -> float:
    """Expected distinct experts for t tokens under uniform top-K routing (t may be fractional or an array)."""
    if E <= 0:
        return 0.0
    if not 0 < K <= E:
        raise PerfError(f"top-k K={K} must be in [1, E={E}]")
    t = np.maximum(np.asarray(t, dtype=float), 0.0)
    u = E * (1.0 - (1.0 - K / E) ** t)
    return float(u) if u.ndim == 0 else u


def check_profile(p) -> np.ndarray:
    """A routing profile as a float array [E] or [layers, E] of per-token inclusion probabilities in [0, 1]."""
    p = np.asarray(p, dtype=float)
    if p.ndim not in (1, 2) or p.shape[-1] == 0 or np.any(p < 0) or np.any(p > 1 + 1e-9) or not np.all(np.isfinite(p)):
        raise PerfError("a routing profile is an array [E] or [layers, E] of per-token probabilities in [0, 1] "
                        "(expert e's count divided by the number of tokens routed)")
    return np.minimum(p, 1.0)


def expected_union_profile(p, t: float) -> float:
    """Expected distinct experts per layer for t independent tokens with inclusion probabilities p ([E] or
    [layers, E]; the result is averaged over layers)."""
    p = check_profile(p)
    u = np.sum(1.0 - (1.0 - p) ** max(float(t), 0.0), axis=-1)
    return float(np.mean(u))


def expected_misses(E: int, K: int, t: float, cached: float, profile=None) -> float:
    """Expected experts per layer that t tokens touch outside a cache of `cached` experts.

    Uniform routing: any given expert is cached with probability cached/E, so misses = U(t) * (1 - cached/E).
    With a profile the cache holds the `cached` most frequent experts of each layer (a fractional size keeps
    that fraction of the next one) and misses = sum over the others of 1 - (1 - p[e])^t.
    Example: E=8, K=2, t=1, cached=4: 2 * (1 - 4/8) = 1 miss per layer.
    """
    if E <= 0:
        return 0.0
    c = min(max(float(cached), 0.0), float(E))
    if profile is None:
        return expected_union(E, K, t) * (1.0 - c / E)
    p = np.atleast_2d(check_profile(profile))
    touched = 1.0 - (1.0 - np.sort(p, axis=-1)[:, ::-1]) ** max(float(t), 0.0)   # hottest first
    keep = np.zeros(p.shape[-1])
    whole = int(c)
    keep[:whole] = 1.0
    if whole < p.shape[-1]:
        keep[whole] = c - whole
    return float(np.mean(np.sum(touched * (1.0 - keep), axis=-1)))


def profile_coverage(E: int, K: int, n: float, profile=None) -> float:
    """Fraction of routing choices that land in the n most used experts: n/E uniform, top-n mass with a profile."""
    if E <= 0:
        return 1.0
    n = min(max(float(n), 0.0), float(E))
    if profile is None:
        return n / E
    p = np.atleast_2d(check_profile(profile))
    s = np.sort(p, axis=-1)[:, ::-1]
    whole = int(n)
    mass = s[:, :whole].sum(-1) + (s[:, whole] * (n - whole) if whole < p.shape[-1] else 0.0)
    return float(np.mean(mass / np.maximum(p.sum(-1), 1e-12)))


def sample_union(E: int, K: int, t: int, trials: int = 2000, rng=None, weights=None) -> float:
    """Monte-Carlo mean of distinct experts touched by t tokens, each choosing K distinct experts.

    Uniform when `weights` is None; otherwise each token samples K experts without replacement with
    probability proportional to `weights` (Gumbel top-K), independently of the other tokens.
    """
    rng = np.random.default_rng(rng)
    logw = np.zeros(E) if weights is None else np.log(np.asarray(weights, dtype=float))
    total, done = 0.0, 0
    chunk = max(1, min(trials, 4_000_000 // max(1, t * E)))     # bound memory at ~32 MB of keys
    while done < trials:
        n = min(chunk, trials - done)
        keys = logw + rng.gumbel(size=(n, t, E)).astype(np.float32)
        top = np.argpartition(-keys, K - 1, axis=-1)[..., :K]                  # [n, t, K]
        hit = np.zeros((n, E), dtype=bool)
        np.put_along_axis(hit, top.reshape(n, t * K), True, axis=1)
        total += hit.sum()
        done += n
    return total / trials


def sample_inclusion(E: int, K: int, weights, tokens: int = 20000, rng=None) -> np.ndarray:
    """Monte-Carlo per-token inclusion probabilities p[e] of the Gumbel top-K router in `sample_union`."""
    rng = np.random.default_rng(rng)
    keys = np.log(np.asarray(weights, dtype=float)) + rng.gumbel(size=(tokens, E))
    top = np.argpartition(-keys, K - 1, axis=-1)[:, :K]
    return np.bincount(top.ravel(), minlength=E) / tokens
