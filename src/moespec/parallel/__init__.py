"""Expert parallelism over torch.distributed (gloo), launched by torchrun: `--expert-parallel N`.

Rank 0 loads the model without its routed experts but its own share of them, and computes everything else; ranks
1..N-1 load only their share of each MoE layer's experts (round-robin: expert e on rank e % N) and compute, for every
MoE layer rank 0 dispatches, the entries routed to them (experts.py). Rank 0 shares its storage layout (dtype,
quantization, row or column order) so every rank stores and multiplies experts alike, and every rank checks that it
loads the same checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..experts.pool import ResidentExperts
from .experts import ExpertParallel, Share, serve
from .group import ExpertGroup, owners


def _share_of(group: ExpertGroup, ck, cfg, layout: dict, offload, device="cpu") -> Share:
    """This rank's experts: in memory (its share of every layer, expert e in slot e // N on rank e % N), or with
    `offload` (the disk tier) a cache of offload.expert_cache slots per layer over the packed file, from which this
    rank only ever loads its own experts."""
    from ..loading.build import expert_act, load_expert_pool
    E = cfg.num_experts
    owner = owners(E, group.world)
    if offload is not None:
        from ..loading.experts import build_expert_provider
        local = build_expert_provider(ck.folder, cfg, getattr(torch, layout["dtype"]), device, offload,
                                      layout=layout, show_progress=False)
        ids = torch.arange(E)
    else:
        mine = [e for e in range(E) if int(owner[e]) == group.rank]
        local = ResidentExperts({i: load_expert_pool(ck, cfg, i, layout, mine) for i in cfg.moe_layer_ids}, len(mine))
        ids = torch.arange(E) // group.world
    return Share(local, ids, owner, group.rank, expert_act(cfg), cfg.weight_expert_input)


def rank0_experts(group: ExpertGroup, ck, cfg, weights, layout: dict, offload=None) -> ExpertParallel:
    """Rank 0's provider, once every rank agreed on the checkpoint and got the layout."""
    group.check_same_checkpoint(Path(ck.folder))
    group.share({"layout": layout})
    return ExpertParallel(group, _share_of(group, ck, cfg, layout, offload), cfg.num_experts)


def follow(group: ExpertGroup, path: Path, offload=None) -> None:
    """A rank other than 0: load this rank's experts as rank 0 stores them (with `offload`, its own cache over the
    disk tier) and serve them until rank 0 stops."""
    from ..config import ModelConfig
    from ..loading.checkpoint import Checkpoint
    cfg = ModelConfig.from_folder(path)
    group.check_same_checkpoint(path)
    layout = group.share()["layout"]
    share = _share_of(group, Checkpoint(path), cfg, layout, offload)
    try:
        serve(group, share, cfg.hidden_size)
    finally:
        share.local.close()


__all__ = ["ExpertGroup", "ExpertParallel", "follow", "rank0_experts"]
