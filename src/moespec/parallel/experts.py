"""Expert parallelism: rank 0's expert provider, which sends each MoE layer's tokens to every rank, and the loop the
other ranks run.

Per MoE layer of a forward, rank 0 broadcasts a header (layer, tokens N, top-k K) on the control group, then the
hidden states x [N, D], the routed experts ids [N, K] and their weights w [N, K] as one buffer on the data group (three
collectives a layer with the gather: each costs the link's latency). Every rank
computes the (token, k) entries whose expert it holds into acc [N, K, D] (zeros elsewhere) and rank 0 gathers the
accs; each entry comes from exactly one rank, so merging them is exact, and rank 0 adds the K outputs in k order as one
process does: the output is bit-identical to one process holding every expert (with the same layouts, which rank 0
shares). A verification forward sends the k + 1 tokens of every row in one dispatch per layer.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ..models.moe import routed
from .group import ExpertGroup, failed

OP_MOE, OP_STOP = 1, 0
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


class Share:
    """A rank's share of the experts: `local` provides them (resident pools of this rank's experts, or a cache over
    the disk tier), `ids[e]` is expert e as `local` numbers it; owner[e] the rank holding e."""

    def __init__(self, local, ids: torch.Tensor, owner: torch.Tensor, rank: int, act, weight_input: bool):
        self.local, self.ids, self.owner, self.rank = local, ids, owner, rank
        self.act, self.weight_input = act, weight_input

    def outputs(self, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """acc [N, K, D]: this rank's experts' weighted outputs at their (token, k) entries, zeros elsewhere. The
        entries go to the experts as one token each, in token order: every expert multiplies the same rows in the
        same order as in one process, so each entry has the same bits."""
        acc = x.new_zeros(ids.shape[0], ids.shape[1], x.shape[-1])
        tok, kk = (self.owner[ids] == self.rank).nonzero(as_tuple=True)
        if tok.numel():
            acc[tok, kk] = routed(x[tok], self.ids[ids[tok, kk]][:, None], w[tok, kk][:, None], self.act,
                                  self.weight_input, layer, self.local)
        return acc


class ExpertParallel:
    """Rank 0's expert provider: its own share of each layer's experts (`share`), the rest on the other ranks.
    Every expert is in some rank's memory, so drafting and the budget see all of them."""

    def __init__(self, group: ExpertGroup, share: Share, num_experts: int):
        self.group, self.share, self.owner, self.num_experts = group, share, share.owner, num_experts
        self._all = torch.arange(num_experts)
        self.dispatch_s, self.dispatch_bytes, self.dispatches = 0.0, 0, 0
        self.closed = False

    def dispatch(self, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [N, D], ids / w [N, K] -> acc [N, K, D], every entry computed by the rank holding its expert."""
        g = self.group
        t = time.perf_counter()
        x, ids, w = x.contiguous(), ids.contiguous(), w.to(x.dtype).contiguous()
        try:
            dist.broadcast(torch.tensor([OP_MOE, layer, x.shape[0], ids.shape[1], DTYPES.index(x.dtype)]), 0,
                           group=g.control)
            dist.broadcast(torch.cat([t.reshape(-1).view(torch.uint8) for t in (x, ids, w)]), 0, group=g.data)
        except RuntimeError as e:
            raise failed(e, f"sending layer {layer}'s tokens") from None
        t_local = time.perf_counter()
        acc = self.share.outputs(layer, x, ids, w)
        local_s = time.perf_counter() - t_local
        parts = [torch.empty_like(acc) for _ in range(g.world)]
        try:
            dist.gather(acc, parts, dst=0, group=g.data)
        except RuntimeError as e:
            raise failed(e, f"gathering layer {layer}'s expert outputs") from None
        owner = self.owner[ids]                                                    # [N, K] rank of each entry
        for r in range(1, g.world):
            acc = torch.where((owner == r)[..., None], parts[r], acc)
        self.dispatch_s += time.perf_counter() - t - local_s
        self.dispatch_bytes += (x.numel() * x.element_size() + ids.numel() * 8 + w.numel() * w.element_size()) * \
            (g.world - 1) + acc.numel() * acc.element_size() * (g.world - 1)
        self.dispatches += 1
        return acc

    # -- the ExpertProvider protocol (experts/pool.py) --------------------------------------------------------------
    def observe(self, layer: int, x: torch.Tensor) -> None:
        pass

    def pool(self, layer: int):
        return self.share.local.pool(layer)

    def resident(self, layer: int) -> torch.Tensor:
        return self._all

    def cached(self, layer: int) -> torch.Tensor:
        return self._all

    def expert_bytes(self) -> int:
        return self.share.local.expert_bytes()

    def stats(self) -> dict:
        """Rank 0's own expert memory's counters (its cache's, when it offloads), and the exchanges'."""
        return {**self.share.local.stats(), "tier": "expert-parallel", "ranks": self.group.world,
                "local_tier": self.share.local.stats().get("tier", "cache"), "dispatch_s": self.dispatch_s,
                "dispatch_bytes": self.dispatch_bytes, "dispatches": self.dispatches}

    def close(self) -> None:
        """Tell the other ranks to stop (once)."""
        if self.closed:
            return
        self.closed = True
        try:
            dist.broadcast(torch.tensor([OP_STOP, 0, 0, 0, 0]), 0, group=self.group.control)
        except RuntimeError:
            pass                    # a rank already gone: nothing left to stop
        self.share.local.close()
        # gloo's threads must end before the interpreter does: left to exit-time destructors they abort the process
        # ("terminate called without an active exception")
        self.group.close()


def serve(group: ExpertGroup, share: Share, hidden: int) -> None:
    """A follower rank: compute this rank's experts' entries of every MoE layer rank 0 sends, until it says stop."""
    head = torch.zeros(5, dtype=torch.long)
    while True:
        try:
            dist.broadcast(head, 0, group=group.control)
        except RuntimeError as e:
            raise failed(e, "waiting for rank 0") from None
        op, layer, n, k, dt = head.tolist()
        if op == OP_STOP:
            return
        es = DTYPES[dt].itemsize
        sizes = (n * hidden * es, n * k * 8, n * k * es)              # x, ids, w as rank 0 packed them
        buf = torch.empty(sum(sizes), dtype=torch.uint8)
        try:
            dist.broadcast(buf, 0, group=group.data)
            xb, ib, wb = buf.split(sizes)
            x, ids = xb.view(DTYPES[dt]).view(n, hidden), ib.view(torch.long).view(n, k)
            acc = share.outputs(layer, x, ids, wb.view(DTYPES[dt]).view(n, k))
            dist.gather(acc, None, dst=0, group=group.data)
        except RuntimeError as e:
            raise failed(e, f"layer {layer}'s exchange with rank 0") from None
