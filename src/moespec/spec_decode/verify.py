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


def tree_greedy_accept(parents: list[int], tokens: list[int], target: list[int]) -> tuple[list[int], int]:
    """Greedy acceptance over a draft tree (spec_decode/tree.py): from the root, step to the first child whose
    token is the target's argmax at the current node; stop where no child matches.

    target[0] is the argmax after the pending token (the root), target[i + 1] the argmax after node i.
    Returns (accepted path: node indices from the root down, next token = the argmax where it stopped),
    which is exactly plain greedy decoding.
    >>> tree_greedy_accept([-1, -1, 0, 1], [5, 6, 7, 8], [6, 0, 8, 0, 3])
    ([1, 3], 3)
    """
    path, node = [], -1
    while True:
        want = target[node + 1]
        nxt = next((i for i, p in enumerate(parents) if p == node and tokens[i] == want), None)
        if nxt is None:
            return path, want
        path.append(nxt)
        node = nxt


def tree_accept(parents: list[int], tokens: list[int], q: torch.Tensor | None, p: torch.Tensor,
                generator: torch.Generator | None) -> tuple[list[int], int]:
    """Speculative sampling over a draft tree (multi-candidate rejection, SpecInfer / Miao et al.).

    q [N, V]: q[i] is the draft distribution node i was drawn from (siblings drawn i.i.d. from their
    parent's q); None: a deterministic drafter (one-hot q; siblings should be distinct tokens).
    p [N + 1, V]: the target's distribution at the root (p[0]) and after each node (p[i + 1]).
    At a node with residual target r (starting as its p), try its children in order: accept child x with
    probability min(1, r(x) / q(x)); if rejected, r <- norm(max(r - q, 0)) and try the next child. A
    child accepted becomes the node; when every child is rejected (or there are none) the token is drawn
    from r. The emitted tokens are distributed exactly as the target's. With a chain this is
    `chain_accept`, consuming the same random numbers.
    Returns (accepted path: node indices from the root down, the recovered or bonus token).
    """
    path, node = [], -1
    r = p[0]
    while True:
        moved = False
        for i in (j for j, par in enumerate(parents) if par == node):
            x = tokens[i]
            qx = 1.0 if q is None else float(q[i, x])
            if qx > 0 and float(torch.rand((), generator=generator)) < min(1.0, float(r[x]) / qx):
                path.append(i)
                node, r, moved = i, p[i + 1], True
                break
            if q is None:
                residual = r.clone()
                residual[x] = 0.0
            else:
                residual = (r - q[i]).clamp_min(0.0)
            total = residual.sum()
            if total > 0:       # else r == q: rejection had probability 0; numerically, keep r
                r = residual / total
        if not moved:
            return path, int(torch.multinomial(r, 1, generator=generator))
