"""One speculative step for every live row: draft, verify in one target forward, accept, commit KV."""
from __future__ import annotations

import time

import torch

from ..models.decoder import ForwardPlan
from ..sampling import SamplingParams, apply_penalties, target_probs
from .drafters import Draft, Drafter
from .stats import SpecStats
from .tree import chain_parents, depths, pack
from .verify import chain_accept, greedy_accept, tree_accept, tree_greedy_accept


def speculative_step(model, kv, keys: list, contexts: list[list[int]], pending: torch.Tensor,
                     params: list[SamplingParams], gens: list, drafter: Drafter, k: int, stats: SpecStats,
                     budget=None, prompt_lens: list[int] | None = None) -> tuple[list[list[int]], torch.Tensor]:
    """contexts[r]: row r's tokens so far (prompt + output, ending with pending[r], which is not in the KV yet);
    keys[r] names the sequence for drafters that keep per-sequence state.

    Propose a draft per row, verify [pending, drafts] in one forward, accept per row, commit pending + accepted
    drafts; rows may accept different lengths. Returns per row the new tokens to emit (accepted drafts + one target
    token) and the new pending tokens [R].

    Tree drafts (Draft.parents, spec_decode/tree.py): when any row's draft is a tree, the forward runs over
    [pending, nodes] with each row's ancestor mask and positions committed length + depth; the accepted
    root path's entries are compacted behind the committed KV (`KVCache.keep`). Rows with penalties
    (prompt_lens[r] splits contexts[r] into prompt and output) penalise each verified position with its own
    history, the output so far plus the draft tokens on its path: drafters propose without penalties (lower
    acceptance, same output). Stats count along depth:
    "drafted" adds each draft's depth, "accepted" the path length; "draft_nodes" adds its nodes.
    """
    prefetch = drafter.prefetcher                      # draft-guided prefetch (spec_decode/prefetch.py)
    if prefetch is not None:
        prefetch.begin_step()
    t0 = time.perf_counter()
    proposals = propose(drafter, kv, keys, contexts, pending, params, gens, k)
    t1 = time.perf_counter()
    out, tokens, parents, depth = verify(model, kv, pending, proposals, budget)
    stats.draft_s += t1 - t0
    stats.verify_s += time.perf_counter() - t1
    stats.verify_tokens += tokens.numel()                 # rows x width, padding included
    # One verification forward reads each distinct expert once per layer (coalesced): count them.
    # (With a budget, out.kept counts what was computed; out.routing is what the router chose.)
    stats.verify_experts += sum(out.kept) if out.kept else sum(int(torch.unique(ids).numel()) for ids in out.routing)
    stats.verify_layers += len(out.routing)
    if prefetch is not None:
        prefetch.end_step(out.routing, t1 - t0)
    emitted, nxt, paths = accept(out.logits, proposals, parents, contexts, params, gens, prompt_lens, stats)
    keep = commit(kv, paths, tokens.shape[1], trees=depth is not None)
    drafter.observe_verification(out.routing, keep.reshape(-1))    # self drafting refreshes its experts
    stats.steps += 1
    stats.row_steps += len(proposals)
    return emitted, torch.tensor(nxt, dtype=torch.long)


def propose(drafter: Drafter, kv, keys: list, contexts: list[list[int]], pending: torch.Tensor,
            params: list[SamplingParams], gens: list, k: int) -> list[Draft]:
    """Each row's draft: every row in one draft forward per position (a batched drafter on the target's KV,
    self_shared.py), else row by row."""
    if drafter.batched:
        return drafter.propose_batch(kv, pending, params, gens, k)
    return [drafter.propose(key, c, k, p, g) for key, c, p, g in zip(keys, contexts, params, gens)]


def verify(model, kv, pending: torch.Tensor, proposals: list[Draft], budget=None):
    """One target forward over [pending, draft] of every row (written into the KV after its committed entries, not
    committed yet). Returns (ForwardOutput, tokens [R, width], parents per row, depth [R, width] for trees else None).

    depth: the pending token 0, a node its depth in its tree, padding past a short draft -1."""
    drafts = [d.tokens for d in proposals]
    width = 1 + max(map(len, drafts))
    tokens = torch.zeros(len(drafts), width, dtype=torch.long)
    tokens[:, 0] = pending
    for r, d in enumerate(drafts):
        tokens[r, 1:1 + len(d)] = torch.tensor(d, dtype=torch.long)
    trees = any(prop.parents is not None for prop in proposals)
    parents = [prop.parents if prop.parents is not None else chain_parents(len(prop.tokens)) for prop in proposals]
    vis, depth = pack(parents, width)              # vis [R, width, width]: each row's ancestor mask (trees only)
    plan = ForwardPlan(record_routing=True)
    if budget is not None:     # lossy: hold each MoE layer to the verify budget (models/budget.py)
        # Padding (depth -1) is routed inside the kept set but does not vote for experts.
        plan.budget, plan.depth = budget, depth.reshape(-1)
    if trees:
        out = model.forward(tokens, kv, positions=kv.lens_tensor()[:, None] + torch.where(depth < 0, 1, depth),
                            tree=vis, plan=plan)
    else:
        out = model.forward(tokens, kv, plan=plan)
    return out, tokens, parents, depth if trees else None


def accept(logits: torch.Tensor, proposals: list[Draft], parents: list[list[int]], contexts: list[list[int]],
           params: list[SamplingParams], gens: list, prompt_lens: list[int] | None, stats: SpecStats
           ) -> tuple[list[list[int]], list[int], list[list[int]]]:
    """logits [R, width, V] of the verification. Per row: the tokens to emit (accepted path + one target token), the
    new pending token, and the accepted path (node indices from the root)."""
    emitted, nxt, paths = [], [], []
    for r, (prop, p) in enumerate(zip(proposals, params)):
        d = prop.tokens
        rows = logits[r, :len(d) + 1]
        if p.has_penalties:
            rows = _penalised(rows, contexts[r], prompt_lens[r], d, parents[r], p)
        if prop.parents is None:           # a chain
            if p.is_greedy:
                n, tok = greedy_accept(d, rows.argmax(-1).tolist())
            else:
                n, tok = chain_accept(d, prop.q, target_probs(rows, p.temperature, p.top_k, p.top_p), gens[r])
            path = list(range(n))
        elif p.is_greedy:
            path, tok = tree_greedy_accept(prop.parents, d, rows.argmax(-1).tolist())
        else:
            path, tok = tree_accept(prop.parents, d, prop.q, target_probs(rows, p.temperature, p.top_k, p.top_p),
                                    gens[r])
        emitted.append([d[i] for i in path] + [tok])
        nxt.append(tok)
        paths.append(path)
        stats.drafted += max(depths(parents[r]), default=0)
        stats.draft_nodes += len(d)
        stats.accepted += len(path)
        for pos in range(len(path)):
            stats.accepted_per_pos[pos] = stats.accepted_per_pos.get(pos, 0) + 1
    return emitted, nxt, paths


def commit(kv, paths: list[list[int]], width: int, trees: bool) -> torch.Tensor:
    """Commit each row's pending token and accepted path: a chain's is a prefix of what the forward wrote, a tree's
    is compacted (its nodes are scattered among the written entries). Returns keep [R, width] bool: the verified
    positions kept."""
    keep = torch.zeros(len(paths), width, dtype=torch.bool)
    keep[:, 0] = True
    for r, path in enumerate(paths):
        keep[r, [1 + i for i in path]] = True
    if trees:
        for r, path in enumerate(paths):
            base = kv.lens[r]
            kv.keep(r, [base] + [base + 1 + i for i in path])
    else:
        kv.advance([1 + len(path) for path in paths])
    return keep


def _penalised(rows: torch.Tensor, context: list[int], prompt_len: int, draft: list[int], parents: list[int],
               p: SamplingParams) -> torch.Tensor:
    """rows [1 + n, V]: position 0 follows the context, position 1 + i follows draft node i (after its
    ancestors). Each gets the penalties of its own history."""
    out = context[prompt_len:]
    paths: list[list[int]] = []
    for i, parent in enumerate(parents):         # a node's path = its parent's path + itself (parents precede)
        paths.append((paths[parent] if parent >= 0 else []) + [draft[i]])
    return apply_penalties(rows, context[:prompt_len], [out] + [out + path for path in paths], p)
