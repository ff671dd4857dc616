"""Drafters: propose(context, k) -> up to k draft tokens (a chain)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class NgramDrafter:
    """Prompt lookup: find an earlier occurrence of the context's last n tokens (n from n_max down to n_min)
    and propose the tokens that followed it: the latest occurrence followed by k tokens, else the one
    followed by the most. Free to draft; strong on code and on text that quotes its prompt.

    >>> NgramDrafter(2, 1).propose([1, 2, 3, 9, 1, 2], 3)
    [3, 9, 1]
    """
    n_max: int = 3
    n_min: int = 1

    def propose(self, context: list[int], k: int) -> list[int]:
        L = len(context)
        for n in range(min(self.n_max, L - 1), self.n_min - 1, -1):
            tail = context[L - n:]
            best: list[int] = []
            for start in range(L - n - 1, -1, -1):      # latest match first
                if context[start:start + n] == tail:
                    follow = context[start + n:start + n + k]
                    if len(follow) == k:
                        return follow
                    best = follow if len(follow) > len(best) else best
            if best:
                return best
        return []
