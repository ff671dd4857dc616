"""bf16 weights prepacked for oneDNN (the reorder models/packed.py explains), below both models/ and experts/."""
from __future__ import annotations

import torch


def pack(w: torch.Tensor) -> torch.Tensor:
    """[out, in] bf16 (any storage order) -> the same matrix prepacked for oneDNN."""
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1)
