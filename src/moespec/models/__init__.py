"""Model implementations, selected by config.json's model_type (see config.FAMILIES)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig, OffloadConfig
from ..errors import MoespecError
from ..experts.pool import ResidentExperts
from ..loading import Checkpoint, load_weights
from .decoder import DecoderLM, ForwardOutput, ForwardPlan

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MoespecError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(path: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu",
               auto_layout: bool = True, offload: OffloadConfig | None = None, pack: bool | None = None) -> DecoderLM:
    """Load a Hugging Face checkpoint folder with every expert resident in memory.

    auto_layout: store each weight shape in whichever layout decodes faster here (models/layout.py).
    offload: keep only a cache of experts in fast memory over a RAM or disk tier (experts/); the
    routed experts are then never all materialised. None: every expert resident, as before.
    pack: prepack bf16 weights for oneDNN (packed.py): None where it is faster here, True / False force it.
    """
    path = Path(path)
    if not path.is_dir():
        raise MoespecError(f"model folder {path} does not exist")
    cfg = ModelConfig.from_folder(path)
    dt = parse_dtype(dtype)
    weights, pools = load_weights(Checkpoint(path), cfg, dt, device, auto_layout, experts=offload is None, pack=pack)
    if offload is None:
        return DecoderLM(cfg, weights, ResidentExperts(pools, cfg.num_experts), dt, device)
    from ..experts.build import build_expert_provider
    routers = {i: lw.moe.router for i, lw in enumerate(weights.layers) if lw.moe is not None}
    return DecoderLM(cfg, weights, build_expert_provider(path, cfg, dt, device, offload, routers, auto_layout), dt, device)


__all__ = ["DecoderLM", "ForwardOutput", "ForwardPlan", "load_model", "parse_dtype", "ModelConfig"]
