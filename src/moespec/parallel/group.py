"""The processes of an expert-parallel run: torch.distributed over gloo, launched by torchrun.

Rank 0 runs the model (attention, dense layers, routing, sampling, speculation, the server); every rank, rank 0
included, holds a share of each MoE layer's experts. Two process groups: `control` carries rank 0's request headers
(followers may wait on it as long as rank 0 is idle, so its timeout is long) and `data` carries a layer's tokens and
results (a short timeout: a rank that stops answering mid-step is an error, not a hang).
"""
from __future__ import annotations

import hashlib
import json
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import MoespecError

CONTROL_TIMEOUT = timedelta(days=7)


def data_timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get("MOESPEC_EP_TIMEOUT_S", "60")))


class ExpertGroup:
    """This process's place in the run: rank, world size, the two groups."""

    def __init__(self, rank: int, world: int, control, data):
        self.rank, self.world, self.control, self.data = rank, world, control, data

    @staticmethod
    def join(n: int) -> "ExpertGroup":
        """Join the run torchrun started (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment)."""
        if not isinstance(n, int) or n < 1:
            raise MoespecError(f"--expert-parallel {n!r} must be a number of processes (1 or more)")
        world = int(os.environ.get("WORLD_SIZE", "0") or 0)
        if world != n:
            raise MoespecError(f"--expert-parallel {n} runs one process per rank: launch it as `torchrun "
                               f"--nproc-per-node {n} -m moespec.cli ...` (on one machine; --nnodes and "
                               f"--rdzv-endpoint across machines); this process sees WORLD_SIZE={world or 'unset'}")
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=CONTROL_TIMEOUT)
        data = dist.new_group(backend="gloo", timeout=data_timeout())
        return ExpertGroup(dist.get_rank(), dist.get_world_size(), dist.group.WORLD, data)

    def check_same_checkpoint(self, folder: Path) -> None:
        """Every rank must load the same weights: compare config.json and the tensors' headers by content."""
        mine = checkpoint_fingerprint(folder)
        every = [None] * self.world
        dist.all_gather_object(every, mine, group=self.data)
        odd = [r for r, f in enumerate(every) if f != every[0]]
        if odd:
            raise MoespecError(f"expert-parallel ranks {odd} load a checkpoint other than rank 0's ({folder} here): "
                               "config.json or the safetensors headers differ; give every rank the same model")

    def share(self, obj=None):
        """Rank 0's object (a setup dict) on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.data)
        return box[0]

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def checkpoint_fingerprint(folder: Path) -> str:
    """A hash of config.json and every safetensors header (names, dtypes, shapes, offsets) in the folder."""
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        h.update(f.name.encode() + json.dumps(header, sort_keys=True).encode())
    return h.hexdigest()


def owners(num_experts: int, world: int) -> torch.Tensor:
    """[E] the rank holding each expert: round-robin, so every rank holds a share of every layer."""
    return torch.arange(num_experts) % world


def failed(e: Exception, what: str) -> MoespecError:
    """A collective that failed (a rank died or stopped answering) as the error users see."""
    return MoespecError(f"expert parallelism: {what} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        "a rank has stopped or stopped answering, so every rank stops")
