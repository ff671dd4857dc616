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

from .experts import ExpertParallel, serve
from .group import ExpertGroup, owners


def _share_of(group: ExpertGroup, ck, cfg, layout: dict):
    """This rank's pools {layer: pool of its experts}, each expert's owner [E] and slot in its owner's pools [E]."""
    from ..loading.build import load_expert_pool
    owner = owners(cfg.num_experts, group.world)
    mine = [e for e in range(cfg.num_experts) if int(owner[e]) == group.rank]
    slot = torch.arange(cfg.num_experts) // group.world                 # expert e is slot e // N on rank e % N
    pools = {i: load_expert_pool(ck, cfg, i, layout, mine) for i in cfg.moe_layer_ids}
    return pools, owner, slot


def rank0_experts(group: ExpertGroup, ck, cfg, weights, layout: dict) -> ExpertParallel:
    """Rank 0's provider, once every rank agreed on the checkpoint and got the layout."""
    group.check_same_checkpoint(Path(ck.folder))
    group.share({"layout": layout})
    pools, owner, slot = _share_of(group, ck, cfg, layout)
    act = {i: lw.moe.act for i, lw in enumerate(weights.layers) if lw.moe is not None}
    return ExpertParallel(group, pools, owner, slot, cfg.num_experts, act, cfg.weight_expert_input)


def follow(group: ExpertGroup, path: Path) -> None:
    """A rank other than 0: load this rank's experts as rank 0 stores them and serve them until rank 0 stops."""
    from ..config import ModelConfig
    from ..loading.build import expert_act
    from ..loading.checkpoint import Checkpoint
    cfg = ModelConfig.from_folder(path)
    group.check_same_checkpoint(path)
    layout = group.share()["layout"]
    pools, owner, slot = _share_of(group, Checkpoint(path), cfg, layout)
    act = {i: expert_act(cfg) for i in cfg.moe_layer_ids}
    serve(group, pools, owner, slot, act, cfg.weight_expert_input, cfg.hidden_size)


__all__ = ["ExpertGroup", "ExpertParallel", "follow", "rank0_experts"]
