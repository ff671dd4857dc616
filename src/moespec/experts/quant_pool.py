"""Quantized expert pools: one blob per slot holding an expert's quantized gate+up and down with their scales.

Same contract as experts.pool.ExpertPool (slots, blob, raw(slot), layout, pack, flat), so the expert cache,
the RAM and disk stores and the packed file move quantized experts exactly as they move float ones: a miss
reads the quantized bytes (2x / 4x fewer than bf16) straight into a slot, and the MoE block multiplies them
there with no per-call conversion. Blob layout, each field 64-byte aligned (I expert width, D hidden):

    int8: q13 int8 [2I, D] | q2 int8 [D, I] | s13 bf16 [2I] | s2 bf16 [D]
    int4: p13 uint8 [2I, D/2] | p2 uint8 [D, I/2] | z13 bf16 [D/g, 2I, 2] | z2 bf16 [I/g, D, 2]   (kernel layout)
    mxfp4: p13 uint8 [2I, D/2] | p2 uint8 [D, I/2] | e13 uint8 [2I, D/32] | e2 uint8 [D, I/32]     (checkpoint layout)

Experts with biases (gpt-oss) append b13 [2I] | b2 [D] in the model's dtype.
"""
from __future__ import annotations

import torch

from .pool import pack_bias, slot_memory
from ..quant.mxfp4 import Mxfp4Weight, check_mxfp4_shape, quantize_mxfp4
from ..quant.mxfp4 import kernel as mxfp4_kernel
from ..quant.weights import (Int4Weight, Int8Weight, check_int4_shape, int4_pack_format, int4_packed_shapes, pack_int4,
                      quantize_int4, quantize_int8)

FIELD_ALIGN = 64


def fields(hidden: int, inter: int, method: str, group: int, bias: torch.dtype | None = None
           ) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The blob's fields (name, dtype, shape); bias: the dtype of the experts' biases, None when they have none."""
    D, I = hidden, inter
    if method == "int8":
        out = [("q13", torch.int8, (2 * I, D)), ("q2", torch.int8, (D, I)),
               ("s13", torch.bfloat16, (2 * I,)), ("s2", torch.bfloat16, (D,))]
    elif method == "mxfp4":
        out = [("p13", torch.uint8, (2 * I, D // 2)), ("p2", torch.uint8, (D, I // 2)),
               ("e13", torch.uint8, (2 * I, D // 32)), ("e2", torch.uint8, (D, I // 32))]
    else:
        (p13, z13), (p2, z2) = int4_packed_shapes((2 * I, D), group), int4_packed_shapes((D, I), group)
        out = [("p13", torch.uint8, p13), ("p2", torch.uint8, p2), ("z13", torch.bfloat16, z13),
               ("z2", torch.bfloat16, z2)]
    return out + ([("b13", bias, (2 * I,)), ("b2", bias, (D,))] if bias is not None else [])


def field_offsets(hidden: int, inter: int, method: str, group: int, bias: torch.dtype | None = None
                  ) -> tuple[dict[str, int], int]:
    """({field: byte offset in the blob}, blob bytes) with every field FIELD_ALIGN-aligned."""
    off, out = 0, {}
    for name, dtype, shape in fields(hidden, inter, method, group, bias):
        out[name] = off
        n = torch.empty((), dtype=dtype).element_size()
        for d in shape:
            n *= d
        off += -(-n // FIELD_ALIGN) * FIELD_ALIGN
    return out, off


class QuantExpertPool:
    """`slots` quantized experts of one MoE layer. w13[s] / w2[s] are Int8Weight, Int4Weight or Mxfp4Weight views
    into slot s of the blob (made once: I/O refills the bytes in place); b13 [S, 2I] / b2 [S, D] the biases or None."""

    def __init__(self, slots: int, hidden: int, inter: int, dtype: torch.dtype, method: str, group: int = 0,
                 device="cpu", align: int = 0, bias: bool = False):
        for shape, name in (((2 * inter, hidden), "the experts' gate/up projection"),
                            ((hidden, inter), "the experts' down projection")):
            if method == "int4":
                check_int4_shape(shape, group, name)
            elif method == "mxfp4":
                check_mxfp4_shape(shape, name)
        self.hidden, self.inter, self.slots, self.dtype = hidden, inter, slots, dtype
        self.method, self.group, self.bias = method, group if method == "int4" else 0, bool(bias)
        bias_dtype = dtype if bias else None
        offs, nbytes = field_offsets(hidden, inter, method, self.group, bias_dtype)
        self._mm, self.stride_bytes, self.blob = slot_memory(slots, nbytes, device, align)
        self.f = {}
        for name, fdtype, shape in fields(hidden, inter, method, self.group, bias_dtype):
            n = torch.empty(shape, dtype=fdtype, device="meta").numel() * torch.empty((), dtype=fdtype).element_size()
            self.f[name] = self.blob[:, offs[name]:offs[name] + n].view(fdtype).view(slots, *shape)
        self.b13, self.b2 = self.f.get("b13"), self.f.get("b2")
        D, I = hidden, inter
        if method == "int8":
            self.w13 = [Int8Weight(self.f["q13"][s], self.f["s13"][s]) for s in range(slots)]
            self.w2 = [Int8Weight(self.f["q2"][s], self.f["s2"][s]) for s in range(slots)]
        elif method == "mxfp4":
            if slots and torch.device(device).type == "cpu":
                mxfp4_kernel()                 # built (once per CPU class) at load, not in the first product
            self.w13 = [Mxfp4Weight(self.f["p13"][s], self.f["e13"][s]) for s in range(slots)]
            self.w2 = [Mxfp4Weight(self.f["p2"][s], self.f["e2"][s]) for s in range(slots)]
        else:
            self.w13 = [Int4Weight(self.f["p13"][s], self.f["z13"][s], group, (2 * I, D)) for s in range(slots)]
            self.w2 = [Int4Weight(self.f["p2"][s], self.f["z2"][s], group, (D, I)) for s in range(slots)]

    @property
    def layout(self) -> dict:
        lay = {"hidden": self.hidden, "inter": self.inter, "dtype": str(self.dtype).removeprefix("torch."),
               "t13": False, "t2": False, "quant": self.method, "group_size": self.group or None}
        if self.method == "int4":
            lay["int4_pack"] = int4_pack_format()
        if self.bias:
            lay["bias"] = True
        return lay

    @property
    def blob_bytes(self) -> int:
        return self.blob.shape[1]

    def raw(self, slot: int) -> memoryview | None:
        if self._mm is None:
            return None
        return memoryview(self._mm)[slot * self.stride_bytes:(slot + 1) * self.stride_bytes]

    def after_load(self, slots: list[int]) -> None:
        """(The loader's hook: quantized slots are already in their kernel's layout.)"""

    def hit(self, slot: int) -> None:
        """(The cache's per-use hook, as after_load.)"""

    def pack(self, slot: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
             b13: torch.Tensor | None = None, b2: torch.Tensor | None = None) -> None:
        """Quantize one expert (HF per-expert layout: gate/up [I, D], down [D, I]; biases [2I], [D]) into a slot."""
        w13 = torch.cat([gate, up])
        f = self.f
        if self.method == "mxfp4":
            return self.pack_mxfp4(slot, quantize_mxfp4(w13), quantize_mxfp4(down), b13, b2)
        pack_bias(self, slot, b13, b2)
        if self.method == "int8":
            for qn, sn, w in (("q13", "s13", w13), ("q2", "s2", down)):
                q, sc = quantize_int8(w)
                f[qn][slot].copy_(q)
                f[sn][slot].copy_(sc)
        else:
            for pn, zn, w in (("p13", "z13", w13), ("p2", "z2", down)):
                packed, sz = pack_int4(*quantize_int4(w, self.group))
                f[pn][slot].copy_(packed)
                f[zn][slot].copy_(sz)

    def pack_mxfp4(self, slot: int, w13: tuple[torch.Tensor, torch.Tensor], w2: tuple[torch.Tensor, torch.Tensor],
                   b13: torch.Tensor | None = None, b2: torch.Tensor | None = None) -> None:
        """An MXFP4 expert's (blocks, scales) of gate+up [2I, D] and down [D, I] into a slot as they are (no
        requantization: what an MXFP4 checkpoint stores)."""
        for (p, e), (blocks, scales) in ((("p13", "e13"), w13), (("p2", "e2"), w2)):
            self.f[p][slot].copy_(blocks)
            self.f[e][slot].copy_(scales)
        pack_bias(self, slot, b13, b2)

    def flat(self) -> torch.Tensor:
        """[S, 3 I D] every slot's weights dequantized (float32), gate+up then down."""
        return torch.stack([torch.cat([a.dequantize().reshape(-1), b.dequantize().reshape(-1)])
                            for a, b in zip(self.w13, self.w2)])
