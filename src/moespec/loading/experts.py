"""Build the expert provider an OffloadConfig asks for (the cache over a RAM or disk store)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig, OffloadConfig
from ..errors import MoespecError
from ..experts.cache import ExpertCache
from ..experts.policy import load_profile, parse_capacity
from ..experts.pool import PAGE, round_up
from ..experts.store import DiskStore, RamStore
from ..models.layout import LayoutChooser
from .build import expert_layout, load_expert_pool
from .checkpoint import Checkpoint


def build_expert_provider(path: str | Path, cfg: ModelConfig, dtype: torch.dtype, device, offload: OffloadConfig,
                          routers: dict[int, torch.Tensor] | None = None, auto_layout: bool = True,
                          quant=None, show_progress: bool | None = None, drop_cache: bool = False,
                          sample_bytes: int = 64 << 20, layout: dict | None = None) -> ExpertCache:
    """An ExpertCache with `offload.expert_cache` slots per MoE layer on `device` over the slow tier.

    routers {moe layer: [E, D]} feed the next-layer prefetcher (load_model passes them).
    quant (QuantConfig): experts stay quantized in the store, the packed file and the cache slots.
    layout: the experts' storage layout (default: the one load_weights would give them here; expert parallelism
    passes rank 0's).
    """
    offload.validate()
    if not cfg.is_moe:
        raise MoespecError(f"expert offloading needs a Mixture-of-Experts model; {path} has no routed experts")
    ck = Checkpoint(path, drop_cache=drop_cache)
    layers = cfg.moe_layer_ids
    layout = layout or expert_layout(cfg, dtype, device, auto_layout, quant)
    if offload.offload == "disk":
        store = DiskStore(ck, cfg, offload.resolved_dir(), layout, lambda i, e: load_expert_pool(ck, cfg, i, layout, [e]),
                          offload.direct_io, show_progress)
    else:
        store = RamStore({i: load_expert_pool(ck, cfg, i, layout) for i in layers})
    try:
        slot_bytes = round_up(store.blob_bytes, PAGE) if torch.device(device).type == "cpu" else store.blob_bytes
        slots = parse_capacity(offload.expert_cache, cfg.num_experts, len(layers), slot_bytes)
        hot = load_profile(offload.hot_profile, layers, cfg.num_experts) if offload.policy == "static" else None
        return ExpertCache(store, layers, slots, cfg.top_k, device, offload.policy, offload.prefetch, routers, hot,
                           offload.io_threads, offload.io_timeout_s,
                           offload.prefetch_min_prob,
                           # Prepacking an expert costs as much as tens of products with it: only a cache that
                           # holds every expert (nothing is ever evicted) is sure to repay it.
                           prepack=quant is None and slots >= cfg.num_experts
                           and _packs(cfg, dtype, device, auto_layout, sample_bytes))
    except BaseException:
        store.close()
        raise


def _packs(cfg: ModelConfig, dtype: torch.dtype, device, auto_layout: bool, sample_bytes: int) -> bool:
    """Whether resident experts of this model would be prepacked here (models/layout.py decides per shape)."""
    lay = LayoutChooser(dtype, device, auto_layout, sample_bytes=sample_bytes)
    D, I = cfg.hidden_size, cfg.moe_intermediate_size
    return bool(lay.packs((2 * I, D)) and lay.packs((D, I)))
