"""One speculative step for every live row: draft, verify in one target forward, accept, commit KV."""
from __future__ import annotations

import time

import torch

from ..models.decoder import ForwardPlan
from ..sampling import SamplingParams, target_probs
from .verify import chain_accept, greedy_accept


def speculative_step(model, kv, keys: list, contexts: list[list[int]], pending: torch.Tensor,
                     params: list[SamplingParams], gens: list, drafter, k: int, stats: dict,
                     budget=None) -> tuple[list[list[int]], torch.Tensor]:
    """contexts[r]: row r's tokens so far (prompt + output, ending with pending[r], which is not in the KV yet);
    keys[r] names the sequence for drafters that keep per-sequence state.

    Writes [pending, drafts] after each row's committed KV in one forward, accepts per row, and commits
    pending + accepted drafts; rows may accept different lengths. Returns per row the new tokens to emit
    (accepted drafts + one target token) and the new pending tokens [R].
    """
    prefetch = getattr(drafter, "prefetcher", None)     # draft-guided prefetch (spec/prefetch.py)
    if prefetch is not None:
        prefetch.begin_step()
    t0 = time.perf_counter()
    proposals = [drafter.propose(key, c, k, p, g) for key, c, p, g in zip(keys, contexts, params, gens)]
    t1 = time.perf_counter()
    drafts = [d.tokens for d in proposals]
    width = 1 + max(map(len, drafts))
    tokens = torch.zeros(len(drafts), width, dtype=torch.long)
    tokens[:, 0] = pending
    for r, d in enumerate(drafts):
        tokens[r, 1:1 + len(d)] = torch.tensor(d, dtype=torch.long)
    observe = getattr(drafter, "observe_verification", None)
    plan = ForwardPlan(record_routing=True)
    if budget is not None:     # lossy: hold each MoE layer to the verify budget (spec/budget.py)
        # depth [R*width]: token j of a row's [pending, drafts] is at depth j; padding past a short draft
        # gets -1, so it is routed inside the kept set but does not vote for experts.
        depth = torch.arange(width).repeat(len(drafts), 1)
        depth[depth > torch.tensor([len(d) for d in drafts])[:, None]] = -1
        plan.budget, plan.depth = budget, depth.reshape(-1)
    out = model.forward(tokens, kv, plan=plan)
    logits = out.logits                                            # [R, width, V]
    stats["draft_s"] += t1 - t0
    stats["verify_s"] += time.perf_counter() - t1
    # One verification forward reads each distinct expert once per layer (coalesced): count them.
    # (With a budget, out.kept counts what was computed; out.routing is what the router chose.)
    stats["verify_experts"] += sum(out.kept) if out.kept else sum(int(torch.unique(ids).numel()) for ids in out.routing)
    stats["verify_layers"] += len(out.routing)
    if prefetch is not None:
        prefetch.end_step(out.routing, t1 - t0)
    emitted, nxt, commit = [], [], []
    for r, (d, prop, p) in enumerate(zip(drafts, proposals, params)):
        rows = logits[r, :len(d) + 1]
        if p.is_greedy:
            n, tok = greedy_accept(d, rows.argmax(-1).tolist())
        else:
            n, tok = chain_accept(d, prop.q, target_probs(rows, p.temperature, p.top_k, p.top_p), gens[r])
        emitted.append(d[:n] + [tok])
        nxt.append(tok)
        commit.append(1 + n)
        stats["drafted"] += len(d)
        stats["accepted"] += n
        for pos in range(n):
            stats["accepted_per_pos"][pos] = stats["accepted_per_pos"].get(pos, 0) + 1
    kv.advance(commit)
    if observe is not None:                # self-drafting: refresh the draft experts from what was verified
        keep = torch.arange(width)[None, :] < torch.tensor(commit)[:, None]
        observe(out.routing, keep.reshape(-1))
    stats["steps"] += 1
    stats["row_steps"] += len(drafts)
    return emitted, torch.tensor(nxt, dtype=torch.long)
