"""Drafters: propose(key, context, k, params, generator) -> Draft (a chain of up to k tokens, or a tree of
depth up to k when the drafter has a static tree shape `tree`, spec_decode/tree.py).

`key` identifies the sequence (a drafter with state, such as a draft model's KV cache, keeps one
state per key); `context` is everything the sequence holds so far, ending with the pending token.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..sampling import SamplingParams, target_probs
from .tree import ancestor_mask, depths


@dataclass
class Draft:
    tokens: list[int]
    q: torch.Tensor | None = None      # [len(tokens), V] draft distributions; None = deterministic drafter
    # Tree drafts: parents[i] is node i's parent (-1: the pending token), parents[i] < i; q[i] is the
    # distribution node i was drawn from (siblings i.i.d. from it). None = a chain (parents i - 1).
    parents: list[int] | None = None


class Drafter:
    """What speculative_step (step.py) asks of a drafter, with defaults for the optional parts. A drafter either
    proposes row by row (`propose`) or, with `batched`, for every row in one call on the target's KV
    (`propose_batch`, self_shared.py)."""
    batched = False                    # propose_batch once for all rows instead of propose per row
    tree: list[int] | None = None      # a static draft tree shape (spec_decode/tree.py); None = chains
    prefetcher = None                  # draft-guided prefetch (spec_decode/prefetch.py), told of every step
    kind: str | None = None            # which experts a self draft computes (stats: draft_experts)

    def propose(self, key, context: list[int], k: int, params: SamplingParams, generator) -> Draft:
        """Row `key`'s draft of up to k tokens after `context` (what a row-by-row drafter must define)."""
        raise TypeError(f"{type(self).__name__} drafts row by row but defines no propose()")

    def propose_batch(self, kv, pending: torch.Tensor, params: list[SamplingParams], gens: list, k: int
                      ) -> list[Draft]:
        """Every row's draft in one call on the target's KV (what a drafter with `batched` must define)."""
        raise TypeError(f"{type(self).__name__} sets batched but defines no propose_batch()")

    def observe_verification(self, routing: list[torch.Tensor], keep: torch.Tensor) -> None:
        """After each verification: the target's routing per MoE layer [N, K] and which of its N tokens were kept
        (self drafting refreshes its expert set from it)."""

    def forget(self, key) -> None:
        """Sequence `key` has finished: drop what is kept for it."""

    def parts(self) -> list[Drafter]:
        """The drafters this one stands for (several under --spec auto)."""
        return [self]


@dataclass
class NgramDrafter(Drafter):
    """Prompt lookup: find an earlier occurrence of the context's last n tokens (n from n_max down to n_min)
    and propose the tokens that followed it: the latest occurrence followed by k tokens, else the one
    followed by the most. Free to draft; strong on code and on text that quotes its prompt.

    >>> NgramDrafter(2, 1).lookup([1, 2, 3, 9, 1, 2], 3)
    [3, 9, 1]

    With a tree shape whose root branches (b > 1), up to b continuations with distinct first tokens, from
    different earlier matches, become chains below the root (the first is the chain `lookup` gives);
    a single continuation stays a chain.
    """
    n_max: int = 3
    n_min: int = 1
    tree: list[int] | None = None       # static tree shape (spec_decode/tree.py); only its root branching is used

    def propose(self, key, context: list[int], k: int, params: SamplingParams, generator) -> Draft:
        if self.tree is None or self.tree[0] < 2:
            return Draft(self.lookup(context, k))
        conts = self.lookup_many(context, k, self.tree[0])
        if len(conts) < 2:
            return Draft(conts[0] if conts else [])
        tokens, parents = [], []
        for c in conts:
            for j, t in enumerate(c):
                parents.append(-1 if j == 0 else len(tokens) - 1)
                tokens.append(t)
        return Draft(tokens, None, parents)

    def lookup_many(self, context: list[int], k: int, b: int) -> list[list[int]]:
        """Up to b continuations (of up to k tokens) with distinct first tokens: `lookup`'s first, then
        the latest match for each other first token, longest n-grams first.

        >>> NgramDrafter(2, 1).lookup_many([1, 2, 3, 1, 2, 4, 5, 1, 2], 2, 3)
        [[4, 5], [3, 1]]
        """
        first = self.lookup(context, k)
        if not first:
            return []
        out, seen = [first], {first[0]}
        L = len(context)
        for n in range(min(self.n_max, L - 1), self.n_min - 1, -1):
            tail = context[L - n:]
            for start in range(L - n - 1, -1, -1):      # latest match first
                if len(out) >= b:
                    return out
                if context[start:start + n] == tail and context[start + n] not in seen:
                    seen.add(context[start + n])
                    out.append(context[start + n:start + n + k])
        return out

    def lookup(self, context: list[int], k: int) -> list[int]:
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

    def forget(self, key) -> None:
        pass


@dataclass
class DraftModelDrafter(Drafter):
    """A separate small model with the same tokenizer drafts k tokens autoregressively.

    Each sequence keeps its own draft KV cache; before drafting, the cache is rolled back to the longest
    prefix it shares with the context (the accepted tokens), and the rest of the context is fed in.
    Greedy requests draft greedily; sampled ones draw from the draft's distribution under the same
    temperature / top-k / top-p and return it as q for the rejection rule.

    With a static tree shape `tree` (spec_decode/tree.py) a node with branching b gets the b most likely tokens
    (greedy requests) or b i.i.d. samples from q (sampled ones: the multi-candidate rejection rule of
    `verify.tree_accept` is exact for these). The tree grows one depth per draft forward: a forward over
    every node so far under the tree's ancestor mask, not committed, so the draft KV ends at the context
    and the next call re-feeds what was accepted.
    """
    model: object                       # a DecoderLM
    capacity: int = 4096
    _state: dict = field(default_factory=dict)   # key -> (KVCache, tokens in it)
    tree: list[int] | None = None                # static tree shape (branching per depth); None = chains
    # Draft-guided prefetch (SP-MoE, spec_decode/prefetch.py) from a draft model: `projection` (spec_decode/router_proj.py)
    # turns each draft position's hidden state into guesses of the target's experts, `prefetcher` loads them.
    prefetcher: object | None = None
    projection: object | None = None
    _frontier = 1                                # rows of the running draft forward that are new nodes

    def plan(self):
        """The ForwardPlan for each draft forward (None: the draft model as it is)."""
        return None

    def propose(self, key, context: list[int], k: int, params: SamplingParams, generator) -> Draft:
        kv, held = self._state.get(key) or (self.model.new_cache(1, self.capacity), [])
        common = 0
        for a, b in zip(held, context):
            if a != b:
                break
            common += 1
        common = min(common, len(context) - 1)      # always re-feed at least the last token for its logits
        kv.rollback(len(held) - common)
        feed = context[common:]
        out = self.model.forward(torch.tensor([feed]), kv, logits_at=torch.tensor([[len(feed) - 1]]),
                                 plan=self.plan())
        logits = out.logits[0, 0]
        kv.advance(len(feed))
        self._guess(out)
        if self.tree is not None and any(b > 1 for b in self.tree[:k]):
            self._state[key] = (kv, list(context))
            return self._propose_tree(kv, logits, self.tree[:k], params, generator)
        tokens, qs, fed = [], [], []
        for i in range(k):
            if kv.lens[0] + 1 >= self.capacity:
                break
            if params.is_greedy:
                tok = int(logits.argmax())
            else:
                q = target_probs(logits, params.temperature, params.top_k, params.top_p)
                tok = int(torch.multinomial(q, 1, generator=generator))
                qs.append(q)
            tokens.append(tok)
            # The last draft needs no logits, but verification routes it too: fed for its guesses when prefetching.
            if i + 1 < k or (self.prefetcher is not None and kv.lens[0] + 1 < self.capacity):
                out = self.model.forward(torch.tensor([[tok]]), kv, plan=self.plan())
                logits = out.logits[0, 0]
                kv.advance(1)
                fed.append(tok)
                self._guess(out)
        # The cache holds the context and the drafts fed back; the next call rolls back what was rejected.
        self._state[key] = (kv, context + fed)
        return Draft(tokens, torch.stack(qs) if qs else None)

    def _guess(self, out) -> None:
        """Queue the target experts the projection guesses for the position just drafted from."""
        if self.prefetcher is not None and self.projection is not None:
            for layer, ids in self.projection.picks(out.hidden[0, -1:]).items():     # ids [1, K]
                self.prefetcher.observe(layer, ids[0].tolist())

    def _propose_tree(self, kv, logits: torch.Tensor, shape: list[int], params: SamplingParams,
                      generator) -> Draft:
        """Grow the static tree `shape` from the root's draft logits, one draft forward per depth but the
        last (leaves need no logits). The draft KV stays at the context: each forward writes every node
        so far after it, uncommitted, under the ancestor mask, at positions context + depth - 1."""
        parents: list[int] = []
        tokens: list[int] = []
        qs: list[torch.Tensor] = []
        base = kv.lens[0]                  # the context, ending with the pending token at base - 1
        frontier = [(-1, logits)]
        for d, b in enumerate(shape):
            new = []
            for node, lg in frontier:
                if params.is_greedy:       # the argmax first (ties as in greedy decoding), then the runners-up
                    top = int(lg.argmax())
                    ranked = torch.topk(lg, min(b + 1, lg.numel())).indices.tolist()
                    picks = [top] + [t for t in ranked if t != top][:b - 1]
                else:
                    q = target_probs(lg, params.temperature, params.top_k, params.top_p)
                    picks = torch.multinomial(q, b, replacement=True, generator=generator).tolist()
                    qs.extend([q] * len(picks))
                for t in picks:
                    parents.append(node)
                    tokens.append(t)
                    new.append(len(tokens) - 1)
            if d + 1 == len(shape) or base + len(tokens) > self.capacity:
                break
            pos = torch.tensor([[base - 1 + x for x in depths(parents)]])
            self._frontier = len(new)
            try:
                out = self.model.forward(torch.tensor([tokens]), kv, positions=pos, tree=ancestor_mask(parents),
                                         logits_at=torch.tensor([new]), plan=self.plan())
            finally:
                self._frontier = 1
            frontier = list(zip(new, out.logits[0]))
        return Draft(tokens, torch.stack(qs) if qs else None, parents)

    def forget(self, key) -> None:
        self._state.pop(key, None)


class SelfDrafter(DraftModelDrafter):
    """SpecMoE: the target drafts for itself with only N draft experts per MoE layer.

    A token whose routed experts fall outside the draft set takes its top-K experts inside the set by
    router probability (routing "reroute", as the verification budget does; the default: on reference v3
    it accepted 0.32 vs 0.24 of drafts with 8 of 16 experts resident, 0.21 vs 0.17 from a 25% cache), or
    each such expert is replaced by its nearest one in the set (routing "substitute": a table from expert
    affinity, computed once). With offloading the draft set is chosen among the
    cached experts, so drafting starts no reads; after each verification the set is refreshed to the
    N experts the verified positions chose most (recency beats a static hot list, per the paper), and
    before each draft forward members evicted meanwhile (by a prefill, say) give way to cached ones.
    Its draft KV lives in its own cache (the target's cache only ever holds verified tokens).

    With a `prefetcher` (draft-guided prefetch, spec_decode/prefetch.py) each draft forward hands it the
    router's picks layer by layer, and the cache loads them while drafting goes on, into slots outside
    the draft set (prefetch never evicts it). Experts prefetched join the substitution set from the
    next proposal on: they are the router's own picks, and by then they have landed.
    "Cached" counts slots whose load is in flight, so what is drafted never depends on I/O timing.
    """

    def __init__(self, model, n_experts: int, capacity: int = 4096, prefetcher=None,
                 top_k: int | None = None, layers: int | None = None, routing: str = "reroute"):
        super().__init__(model, capacity)
        E = model.cfg.num_experts
        # Re-routing picks top-K inside the set: the set must hold at least the experts a token uses.
        self.n = max(1 if routing == "substitute" else (top_k or model.cfg.top_k), min(n_experts, E))
        self.routing = routing
        self.prefetcher = prefetcher
        # Cheaper drafts (issue 5's variants): fewer experts per token, or only the first `layers` layers.
        self.top_k, self.layers = top_k, layers
        self.E, self.moe_layers = E, list(model.cfg.moe_layer_ids)
        # Expert affinities only for substitution (an [E, E] distance over every expert's weights per layer).
        self.dist = {i: expert_distances(model, i) for i in self.moe_layers} if routing == "substitute" else {}
        # Start from the experts resident now (all of them when nothing is offloaded): the first N. An
        # offload cache that is still empty falls back to experts 0..N-1 (loaded once, then resident).
        self.sets, self._maps, self._over = {}, {}, {}
        for i in self.moe_layers:
            res = model.experts.cached(i)
            self.sets[i] = (res if len(res) else torch.arange(E))[:self.n].clone()
            self._remap(i, self.sets[i])

    def _remap(self, layer: int, allowed: torch.Tensor) -> None:
        """The plan's per-layer entry for draft set `allowed` [A]: a mask [E] bool (reroute), or a substitution
        map [E] sending every expert to its nearest allowed one (substitute)."""
        if self.routing == "reroute":
            mask = torch.zeros(self.E, dtype=torch.bool)
            mask[allowed] = True
            self._maps[layer] = mask
        else:
            d = self.dist[layer][:, allowed]                      # [E, A]
            self._maps[layer] = allowed[d.argmin(dim=1)]          # allowed experts map to themselves
        self._over[layer] = allowed

    def propose(self, key, context: list[int], k: int, params: SamplingParams, generator) -> Draft:
        self._snap = None                       # taken by the first draft forward of this proposal
        return super().propose(key, context, k, params, generator)

    def plan(self):
        from ..models.decoder import ForwardPlan
        first = getattr(self, "_snap", None) is None
        if first:
            self._snap = {}
        for layer in self.moe_layers:
            cached = self.model.experts.cached(layer)
            if first:
                self._snap[layer] = cached
            elif self.prefetcher is not None:
                # Experts prefetched during this proposal join the set from the next one: by then they
                # have landed, so a draft forward does not wait on its own prefetches.
                cached = cached[torch.isin(cached, self._snap[layer])]
            base = self.sets[layer]
            gone = ~torch.isin(base, cached)
            if gone.any() and cached.numel():   # evicted since the last verification (e.g. by a prefill)
                fill = cached[~torch.isin(cached, base)][:int(gone.sum())]
                self.sets[layer] = base = torch.cat([base[~gone], fill]).sort().values
            # With prefetch, experts it brought in join the set: they are the router's own picks.
            allowed = torch.unique(torch.cat([base, cached])) if self.prefetcher is not None else base
            if not torch.equal(allowed, self._over[layer]):
                self._remap(layer, allowed)
        reroute = self.routing == "reroute"
        return ForwardPlan(expert_map=None if reroute else self._maps, expert_sets=self._maps if reroute else None,
                           after_moe=self._after_moe if self.prefetcher else None, top_k=self.top_k,
                           layers=self.layers)

    def _after_moe(self, layer: int, routed: torch.Tensor) -> None:
        # The newest rows: the token being drafted, or a tree depth's new nodes (their picks rank by rank).
        picks = routed[-self._frontier:].T.reshape(-1).tolist()
        self.prefetcher.observe(layer, picks, self.sets[layer])

    def observe_verification(self, routing: list[torch.Tensor], keep: torch.Tensor) -> None:
        """routing: per MoE layer the ids [R*width, K] the verification routed; keep [R*width] bool marks
        the positions that were committed. The N experts they chose most, among those usable without
        I/O, become the next draft set."""
        for layer, ids in zip(self.moe_layers, routing):
            counts = torch.bincount(ids[keep].reshape(-1), minlength=self.E).float()
            resident = self.model.experts.cached(layer)     # not resident(): must not depend on I/O timing
            counts[resident] += 0.5                           # ties (and unseen experts) go to resident ones
            usable = torch.zeros_like(counts, dtype=torch.bool)
            usable[resident] = True
            counts[~usable] = -1
            if not usable.any():
                continue
            top = torch.topk(counts, min(self.n, int(usable.sum()))).indices
            self.sets[layer] = top.sort().values
            self._remap(layer, self.sets[layer])


def expert_distances(model, layer: int) -> torch.Tensor:
    """[E, E] L2 distances between experts' flattened weights (resident pools), or between their router
    rows when the experts are not all in memory (offloaded): the affinity used for substitution."""
    pool = model.experts.pool(layer)
    E = model.cfg.num_experts
    if pool.slots == E and len(model.experts.resident(layer)) == E:
        flat = pool.flat().float()
    else:
        flat = model.w.layers[layer].moe.router.float()
    return torch.cdist(flat[None], flat[None])[0]
