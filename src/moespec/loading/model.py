"""Loading a checkpoint folder into a DecoderLM: dtype resolution, weights, experts resident or offloaded."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig, OffloadConfig, read_config_json
from ..errors import MoespecError
from ..experts.pool import ResidentExperts
from ..heap import release_free_memory, return_large_frees
from .build import load_weights
from .checkpoint import Checkpoint
from ..quant.scheme import QuantConfig
from ..models.decoder import DecoderLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MoespecError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPE_CHOICES)}")
    return DTYPES[dtype]


def checkpoint_dtype(path: str | Path, ck: Checkpoint | None = None) -> torch.dtype | None:
    """The dtype a checkpoint is stored in: config.json's `dtype` / `torch_dtype`, else what most of its
    tensor bytes are (None when neither says)."""
    raw = read_config_json(Path(path) / "config.json")
    name = raw.get("dtype") or raw.get("torch_dtype")
    if isinstance(name, str) and name.removeprefix("torch.") in DTYPES:
        return DTYPES[name.removeprefix("torch.")]
    return (ck or Checkpoint(path)).dtype()


def resolve_dtype(dtype: str | torch.dtype, path: str | Path, device="cpu", ck: Checkpoint | None = None) -> torch.dtype:
    """"auto" is the checkpoint's own dtype (as vLLM and transformers' dtype="auto"), except float16 on a CPU,
    which runs as bfloat16 (same size; CPUs without AVX512-FP16 compute float16 slowly), and float64 or
    unknown, which run as float32. Anything else is taken as asked."""
    if dtype != "auto":
        return parse_dtype(dtype)
    dt = checkpoint_dtype(path, ck)
    if dt is torch.float16 and torch.device(device).type == "cpu":
        return torch.bfloat16
    return dt if dt in (torch.bfloat16, torch.float16) else torch.float32


def load_model(path: str | Path, dtype: str | torch.dtype = "auto", device: str = "cpu",
               auto_layout: bool = True, offload: OffloadConfig | None = None, pack: bool | None = None,
               quant: QuantConfig | str | None = None, show_progress: bool | None = None,
               budgeted: bool = False, remote_experts=None) -> DecoderLM:
    """Load a Hugging Face checkpoint folder with every expert resident in memory.

    dtype: "auto" (the checkpoint's; resolve_dtype), "float32", "bfloat16", "float16" or a torch.dtype.
    auto_layout: store each weight shape in whichever layout decodes faster here (models/layout.py).
    offload: keep only a cache of experts in fast memory over a RAM or disk tier (experts/); the
    routed experts are then never all materialised. None: every expert resident, as before.
    pack: prepack bf16 weights for oneDNN (packed.py): None where it is faster here, True / False force it.
    quant: weight-only int8 / int4 quantization (quant/; "int8", "int4" or a QuantConfig). LOSSY.
    show_progress: progress bars while loading and packing (None: when stderr is a terminal).
    budgeted: loading under a --memory budget (moespec/memory.py): drop the checkpoint's pages from the page cache
    as they are read (a cgroup counts them, and reclaiming them later would slow decoding), and time layouts on
    16 MiB of samples instead of 64.
    remote_experts: with expert parallelism, the provider of rank 0's experts: called as (checkpoint, config, weights,
    layout) once the other weights are loaded (parallel.rank0_experts, bound to its group).
    """
    path = Path(path)
    if not path.is_dir():
        raise MoespecError(f"model folder {path} does not exist")
    cfg = ModelConfig.from_folder(path)
    quant = QuantConfig.parse(quant)
    if quant is not None and not cfg.is_moe and not quant.dense:
        raise MoespecError(f"{path} has no routed experts to quantize; add --quantize-dense to quantize its "
                           "other weights")
    if budgeted:
        return_large_frees()
    ck = Checkpoint(path, drop_cache=budgeted)
    samples = (16 if budgeted else 64) << 20
    dt = resolve_dtype(dtype, path, device, ck)
    weights, pools = load_weights(ck, cfg, dt, device, auto_layout, experts=offload is None and remote_experts is None,
                                  pack=pack, quant=quant, show_progress=show_progress, sample_bytes=samples)
    if remote_experts is not None:
        from .build import expert_layout
        experts = remote_experts(ck, cfg, weights, expert_layout(cfg, dt, device, auto_layout, quant))
    elif offload is None:
        experts = ResidentExperts(pools, cfg.num_experts)
    else:
        from .experts import build_expert_provider
        routers = {i: lw.moe.router if lw.moe.router_bias is None else (lw.moe.router, lw.moe.router_bias)
                   for i, lw in enumerate(weights.layers) if lw.moe is not None}
        experts = build_expert_provider(path, cfg, dt, device, offload, routers, auto_layout, quant, show_progress,
                                        budgeted, samples)
    model = DecoderLM(cfg, weights, experts, dt, device)
    model.quant, model.checkpoint_dtype = quant, checkpoint_dtype(path, ck)
    release_free_memory()
    return model
