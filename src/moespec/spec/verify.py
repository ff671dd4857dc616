"""Acceptance rules as pure functions (METHODS.md section 0).

A chain draft x1..xk is verified with the target distributions p1..p(k+1) from one forward over
[pending, x1..xk]: p(i) is the target's distribution for the token after position i-1.
"""
from __future__ import annotations

import torch


def greedy_accept(draft: list[int], target: list[int]) -> tuple[int, int]:
    """Accept while draft[i] equals the target's argmax; then emit the target's own token.

    target[i] is the argmax after i accepted drafts (len(draft) + 1 entries).
    Returns (accepted count n, next token = target[n]): the output is exactly plain greedy decoding.
    >>> greedy_accept([5, 7, 9], [5, 7, 2, 4])
    (2, 2)
    """
    n = 0
    while n < len(draft) and draft[n] == target[n]:
        n += 1
    return n, target[n]


def chain_accept(draft: list[int], q: torch.Tensor | None, p: torch.Tensor,
                 generator: torch.Generator | None) -> tuple[int, int]:
    """Speculative sampling over a chain: the emitted tokens are distributed exactly as the target's.

    draft [k] tokens, q [k, V] the draft's distributions (None: a deterministic drafter, i.e. one-hot),
    p [k+1, V] the target's. Accept x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first
    rejection sample from norm(max(0, p_i - q_i)); if all are accepted, sample a bonus token from p_(k+1).
    Returns (accepted count n, the recovered or bonus token).
    """
    for i, x in enumerate(draft):
        qx = 1.0 if q is None else float(q[i, x])
        px = float(p[i, x])
        if qx > 0 and float(torch.rand((), generator=generator)) < min(1.0, px / qx):
            continue
        if q is None:
            residual = p[i].clone()
            residual[x] = 0.0
        else:
            residual = (p[i] - q[i]).clamp_min(0.0)
        total = residual.sum()
        if total <= 0:          # p_i == q_i: rejection had probability 0; numerically, fall back to p
            residual, total = p[i], p[i].sum()
        return i, int(torch.multinomial(residual / total, 1, generator=generator))
    return len(draft), int(torch.multinomial(p[len(draft)], 1, generator=generator))
