"""Quantized weight matrices: pure quantize / dequantize functions and the two weight kinds the model reads.

Shapes: a weight is [O, I] (out, in); x [..., I] -> y [..., O]; g the int4 group size.

- int8, per output channel, symmetric: w ~ q * s, q in [-128, 127], s [O] = max |w_o| / 127 (bf16: the
  kernel takes bf16 scales, so q is rounded against the bf16 scale it will be multiplied by).
- int4, per group of g inputs, asymmetric: w ~ (q - 8) * s + z, q in [0, 15], s = (max - min) / 15 and
  z = min + 8 s per group (bf16), the convention of torch's `_weight_int4pack_mm_for_cpu`.

The products run on torch's own CPU kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`, with
bf16 activations). torchao wraps the same kernels in tensor subclasses that need nn.Linear modules owning
their memory; ours live in expert-cache slots that I/O fills, so we call the kernels directly. The int4
kernel's packed layout depends on the CPU capability torch dispatches to (AVX512, AVX2, DEFAULT): it is
recorded wherever packed weights are stored (`int4_pack_format`).
"""
from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F

from ..errors import MoespecError
from .mxfp4 import Mxfp4Weight

INT8_MIN_K = 16         # _weight_int8pack_mm needs in_features % 16 == 0 (else wrong results or a crash)


def int4_pack_format() -> str:
    """The CPU capability torch packs int4 weights for here (packed bytes differ between capabilities)."""
    return "cpu-" + torch.backends.cpu.get_cpu_capability().lower()


# -- pure quantization (float64-checked in the tests) ---------------------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [O, I] float -> (q int8 [O, I], scale bf16 [O]) with w ~ q * scale."""
    wf = w.float()
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).to(torch.bfloat16)
    q = torch.round(wf / scale.float()[:, None]).clamp_(-128, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(q [O, I], scale [O]) -> w [O, I] float32."""
    return q.float() * scale.float()[:, None]


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [O, I] float -> (q uint8 [O, I] in 0..15, scale bf16 [O, I/g], zero bf16 [O, I/g]),
    w ~ (q - 8) * scale + zero per group of `group` consecutive inputs."""
    O, I = w.shape
    wg = w.float().reshape(O, I // group, group)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scale = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(lo)).to(torch.bfloat16)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)
    q = torch.round((wg - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp_(0, 15)
    return q.to(torch.uint8).reshape(O, I), scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """Inverse of quantize_int4 -> w [O, I] float32."""
    O, I = q.shape
    qg = q.float().reshape(O, I // group, group)
    return ((qg - 8) * scale.float()[..., None] + zero.float()[..., None]).reshape(O, I)


def check_int4_shape(shape: tuple[int, int], group: int, name: str) -> None:
    O, I = shape
    if I % group or O % 16:
        raise MoespecError(f"int4 needs in_features divisible by the group size ({group}) and out_features by 16; "
                           f"{name} is [{O}, {I}]: use --quantize int8, or a group size dividing {I}")


# -- packed storage -----------------------------------------------------------------------------------
def int4_packed_shapes(shape: tuple[int, int], group: int) -> tuple[tuple[int, int], tuple[int, int, int]]:
    """(packed uint8 [O, I/2], scales-and-zeros bf16 [I/g, O, 2]) shapes of an [O, I] int4 weight."""
    O, I = shape
    return (O, I // 2), (I // group, O, 2)


def pack_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_int4's output -> (packed uint8 [O, I/2] in the kernel's layout, scales_zeros bf16 [I/g, O, 2])."""
    packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
    return packed, sz


def unpack_int4(packed: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """The float32 [O, I] matrix a packed int4 weight multiplies by (the identity matrix through the kernel)."""
    I = sz.shape[0] * group
    rows = []
    for i in range(0, I, 256):              # identity rows in chunks: eye(I) itself may be hundreds of MB
        eye = torch.zeros(min(256, I - i), I, dtype=torch.bfloat16)
        eye[:, i:i + eye.shape[0]].fill_diagonal_(1)
        rows.append(torch._weight_int4pack_mm_for_cpu(eye, packed, group, sz).float())
    return torch.cat(rows).t().contiguous()


# -- the weights the model reads -----------------------------------------------------------------------
# Decode multiplies one row at a time, where the fixed cost of every torch call adds up: the helpers skip the
# conversions a bf16 row does not need (checked in Python, which is cheaper than a no-op call).
def _bf16_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., I] as the contiguous bf16 [M, I] the kernels take."""
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    if x.dtype is not torch.bfloat16:
        x = x.to(torch.bfloat16)
    return x if x.is_contiguous() else x.contiguous()


def _finish(y: torch.Tensor, x: torch.Tensor, b: torch.Tensor | None, out: int) -> torch.Tensor:
    """The kernel's bf16 [M, O] back in x's dtype and leading shape, plus the bias."""
    if y.dtype is not x.dtype:
        y = y.to(x.dtype)
    if b is not None:
        y = y + b
    return y if x.dim() == 2 else y.view(*x.shape[:-1], out)


class Int8Weight:
    """An [O, I] int8 weight with bf16 per-row scales; `layers.linear` calls `.linear(x, b)`.

    Products of `dequant_rows` rows or more (prefill) dequantize the weight to bf16 and run one GEMM, where that is
    faster on this machine (dequant_rows_for, measured once per shape): the int8 kernel converts every weight for
    every 4 rows. Row results then differ in rounding from the kernel's, so exactness between a verification and
    plain decoding holds for products under that many rows (256 or more: batch x (draft length + 1) below it)."""
    __slots__ = ("q", "scale", "shape", "fast", "dequant_rows")

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        self.q, self.scale, self.shape = q, scale, tuple(q.shape)
        self.fast = q.device.type == "cpu" and q.shape[1] % INT8_MIN_K == 0
        self.dequant_rows = dequant_rows_for(self.shape) if self.fast else None

    @staticmethod
    def from_float(w: torch.Tensor) -> "Int8Weight":
        return Int8Weight(*quantize_int8(w))

    def linear(self, x: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if not self.fast:   # shapes (or devices) the kernel does not take: the same weight, dequantized per call
            y = (F.linear(x.reshape(-1, self.shape[1]).float(), self.q.float()) * self.scale.float()).to(x.dtype)
            return _finish(y, x, b, self.shape[0])
        x2 = _bf16_rows(x)
        if self.dequant_rows is not None and x2.shape[0] >= self.dequant_rows:
            return _finish(F.linear(x2, self.q.to(torch.bfloat16) * self.scale[:, None]), x, b, self.shape[0])
        return _finish(torch._weight_int8pack_mm(x2, self.q, self.scale), x, b, self.shape[0])

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.q, self.scale)

    @property
    def nbytes(self) -> int:
        return self.q.numel() + 2 * self.scale.numel()


class Int4Weight:
    """An [O, I] int4 weight packed for torch's CPU kernel, groups of `group` inputs."""
    __slots__ = ("packed", "sz", "group", "shape")

    def __init__(self, packed: torch.Tensor, sz: torch.Tensor, group: int, shape: tuple[int, int]):
        self.packed, self.sz, self.group, self.shape = packed, sz, group, tuple(shape)

    @staticmethod
    def from_float(w: torch.Tensor, group: int, name: str = "weight") -> "Int4Weight":
        if w.device.type != "cpu":
            raise MoespecError("int4 weights run on torch's CPU kernel only; use --quantize int8 on this device")
        check_int4_shape(tuple(w.shape), group, name)
        return Int4Weight(*pack_int4(*quantize_int4(w, group)), group, tuple(w.shape))

    def linear(self, x: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return _finish(torch._weight_int4pack_mm_for_cpu(_bf16_rows(x), self.packed, self.group, self.sz), x, b,
                       self.shape[0])

    def dequantize(self) -> torch.Tensor:
        return unpack_int4(self.packed, self.sz, self.group)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + 2 * self.sz.numel()


QUANTIZED = (Int8Weight, Int4Weight, Mxfp4Weight)
DEQUANT_MIN_ROWS = 256      # below this many rows the kernel's own rounding always applies (decode, verification)


@functools.lru_cache(maxsize=None)
def dequant_rows_for(shape: tuple[int, int]) -> int | None:
    """The row count from which dequantize-then-GEMM beats torch's int8 kernel for an [O, I] weight on this machine
    (256 or 512), or None (never). Timed once per shape and process on a random weight."""
    q = torch.randint(-127, 128, shape, dtype=torch.int8)
    scale = torch.full((shape[0],), 0.01, dtype=torch.bfloat16)
    for m in (DEQUANT_MIN_ROWS, 2 * DEQUANT_MIN_ROWS):
        x = torch.randn(m, shape[1]).to(torch.bfloat16)
        kernel = _best_of(lambda: torch._weight_int8pack_mm(x, q, scale))
        dequant = _best_of(lambda: F.linear(x, q.to(torch.bfloat16) * scale[:, None]))
        if dequant < 0.8 * kernel:
            return m
    return None


def _best_of(fn, n: int = 2) -> float:
    fn()
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def quantize_weight(w: torch.Tensor, method: str, group: int, name: str = "weight"):
    """A dense [O, I] weight as the quantized kind `method` names."""
    if method == "int8":
        return Int8Weight.from_float(w)
    return Int4Weight.from_float(w, group, name)
