"""gpt-oss's experts as its checkpoints store them: per layer, fused over experts, with biases, gate and up interleaved
(row 2i the gate, 2i + 1 the up projection), either MXFP4 (`gate_up_proj_blocks` [E, 2I, D/32, 16] uint8 and
`gate_up_proj_scales` [E, 2I, D/32], down [E, D, I/32, 16] / [E, D, I/32]: the hub's files) or float in transformers'
x @ W orientation (`gate_up_proj` [E, D, 2I], `down_proj` [E, I, D]: what transformers saves).

MXFP4 experts go into an MXFP4 pool byte for byte (their rows reordered gate then up); any other pool gets them
dequantized (exactly) and then stored as that pool stores experts (float, or requantized with --quantize).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig
from ..quant.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from .checkpoint import Checkpoint


def fill_gpt_oss_experts(ck: Checkpoint, c: ModelConfig, block: str, pool, ids) -> None:
    """Expert ids[j] of the MoE block at `block` into slot j of `pool`, one expert read at a time."""
    D, E, I = c.hidden_size, c.num_experts, c.moe_intermediate_size
    dtype, dev = getattr(torch, pool.layout["dtype"]), pool.blob.device
    order = torch.cat([torch.arange(0, 2 * I, 2), torch.arange(1, 2 * I, 2)])     # interleaved -> gate rows, up rows
    x = block + "experts."
    mx = ck.has(x + "gate_up_proj_blocks")
    keep = getattr(pool, "method", None) == "mxfp4"
    for j, e in enumerate(ids):
        def rows(name, shape):
            return ck.get_rows(x + name, e, e + 1, (E, *shape))[0]
        b13 = rows("gate_up_proj_bias", (2 * I,))[order].to(dtype=dtype, device=dev)
        b2 = rows("down_proj_bias", (D,)).to(dtype=dtype, device=dev)
        if mx:
            w13 = (rows("gate_up_proj_blocks", (2 * I, D // 32, 16)).reshape(2 * I, D // 2)[order],
                   rows("gate_up_proj_scales", (2 * I, D // 32))[order])
            w2 = rows("down_proj_blocks", (D, I // 32, 16)).reshape(D, I // 2), rows("down_proj_scales", (D, I // 32))
            if keep:
                pool.pack_mxfp4(j, w13, w2, b13, b2)
                continue
            gu, down = dequantize_mxfp4(*w13, dtype).to(dev), dequantize_mxfp4(*w2, dtype).to(dev)
        else:
            gu = rows("gate_up_proj", (D, 2 * I)).t()[order].to(dtype=dtype, device=dev)
            down = rows("down_proj", (I, D)).t().to(dtype=dtype, device=dev)
        pool.pack(j, gu[:I], gu[I:], down, b13, b2)


def write_mxfp4_experts(folder: Path) -> dict[str, torch.Tensor]:
    """Rewrite a float gpt-oss checkpoint (one model.safetensors, as transformers saves a small model) with its experts
    in the hub's MXFP4 format and `quantization_config` in config.json. Returns the experts' float tensors as the
    MXFP4 file now holds them (exactly dequantized, transformers' [E, in, out] orientation), by tensor name."""
    import json

    from safetensors.torch import load_file, save_file
    f = folder / "model.safetensors"
    tensors, out = load_file(str(f)), {}
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        w = tensors.pop(name)                                               # [E, in, out]
        packed = [quantize_mxfp4(w[e].t().float()) for e in range(w.shape[0])]   # [out, in/2], [out, in/32]
        blocks, scales = torch.stack([b for b, _ in packed]), torch.stack([s for _, s in packed])
        E, O, half = blocks.shape
        tensors[name + "_blocks"] = blocks.view(E, O, half // 16, 16)
        tensors[name + "_scales"] = scales
        out[name] = torch.stack([dequantize_mxfp4(b, s).t() for b, s in packed])
    save_file(tensors, str(f), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return out
