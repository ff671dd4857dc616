"""MXFP4 weights (the OCP microscaling format gpt-oss ships its experts in): pure quantize / dequantize functions and
the weight kind the model reads.

Shapes: a weight is [O, I] (out, in); x [..., I] -> y [..., O]. Every 32 consecutive inputs of a row share one
power-of-two scale: w = fp4(code) * 2^(scale - 127), fp4 the 16 values of FP4_VALUES (e2m1: sign, 2 exponent bits,
1 mantissa bit). Storage, as in the checkpoint: blocks uint8 [O, I/2], two codes a byte, the even input in the low
nibble; scales uint8 [O, I/32] (e8m0, biased by 127). 4.25 bits a weight.

Products on the CPU run a small C++ kernel (mxfp4_kernel.cpp, built for this CPU class on first use with torch's
extension builder: about 30 s, once) that reads the 4-bit weight directly: at decode faster than a float32 product of
the same shape and 10-50x faster than dequantizing first, at 64 rows about a float32 GEMM's time. It computes each row
alike whatever the row count, so verification equals decoding. Other devices, and machines where the kernel cannot
be built, dequantize the weight into the activation's dtype (exactly: every fp4 value times a power of two is a
float32 and a bf16) and run one F.linear.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import MoespecError

log = logging.getLogger("moespec")
# Instruction sets the kernel is built for, by the capability torch dispatches to here (not -march=native: a build
# cache shared between machines must not hold instructions another CPU of the same class lacks).
KERNEL_FLAGS = {"avx512": ["-mavx512f", "-mavx512bw", "-mavx2", "-mfma"], "avx2": ["-mavx2", "-mfma"]}

BLOCK = 32
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def check_mxfp4_shape(shape: tuple[int, int], name: str) -> None:
    if shape[1] % BLOCK:
        raise MoespecError(f"MXFP4 needs in_features divisible by {BLOCK}; {name} is [{shape[0]}, {shape[1]}]")


@functools.lru_cache(maxsize=None)
def _byte_table(dtype: torch.dtype, device: str) -> torch.Tensor:
    """[256, 2]: the two fp4 values a byte holds (low nibble first)."""
    v = torch.tensor(FP4_VALUES, dtype=torch.float32)
    b = torch.arange(256)
    return torch.stack([v[b & 15], v[b >> 4]], dim=-1).to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _pow2_table(dtype: torch.dtype, device: str) -> torch.Tensor:
    """[256]: 2^(s - 127) for each e8m0 scale byte (255, e8m0's NaN, is left as 2^128 = inf)."""
    return torch.exp2(torch.arange(256, dtype=torch.float64) - 127).to(dtype=dtype, device=device)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(blocks uint8 [O, I/2], scales uint8 [O, I/32]) -> w [O, I] in dtype (exact for float32 and bf16)."""
    O, half = blocks.shape
    dev = str(blocks.device)
    w = F.embedding(blocks.int(), _byte_table(dtype, dev)).view(O, half // (BLOCK // 2), BLOCK)
    return (w * _pow2_table(dtype, dev)[scales.int()][..., None]).view(O, 2 * half)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [O, I] float -> (blocks uint8 [O, I/2], scales uint8 [O, I/32]): each block's scale is the smallest power of
    two that brings its largest magnitude within 6 (the OCP rule, floor(log2(amax)) - 2, would clip magnitudes in
    (6, 8) of the scale to 6), codes rounded to the nearest fp4 value (ties to the even code)."""
    O, I = w.shape
    check_mxfp4_shape((O, I), "weight")
    wg = w.float().reshape(O, I // BLOCK, BLOCK)
    amax = wg.abs().amax(dim=-1)
    e = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6)), torch.full_like(amax, -127)).clamp_(-127, 127)
    x = wg / torch.exp2(e)[..., None]
    mags = torch.tensor(FP4_VALUES[:8])
    d = (x.abs()[..., None] - mags).abs()                     # [O, I/32, 32, 8]
    code = d.argmin(dim=-1)                                   # the lower code on a tie
    up = torch.gather(d, -1, (code + 1).clamp(max=7)[..., None]).squeeze(-1)
    code = torch.where((up == d.amin(dim=-1)) & (code % 2 == 1) & (code < 7), code + 1, code)   # ties to even
    code = code | ((x < 0) & (code > 0)).long() << 3
    code = code.reshape(O, I).to(torch.uint8)
    blocks = code[:, 0::2] | (code[:, 1::2] << 4)
    return blocks.contiguous(), (e + 127).to(torch.uint8)


@functools.lru_cache(maxsize=None)
def kernel():
    """The compiled MXFP4 product (`mxfp4_linear(x, blocks, scales)`), or None where it cannot be built (no compiler:
    products dequantize instead). MOESPEC_MXFP4_KERNEL=0 turns it off."""
    if os.environ.get("MOESPEC_MXFP4_KERNEL", "1") == "0":
        return None
    try:
        return build_kernel(torch.backends.cpu.get_cpu_capability().lower())
    except Exception as e:                      # no compiler, no ninja, a failed build: the slower exact path
        log.warning("the MXFP4 kernel could not be built (%s: %s); MXFP4 products dequantize instead (slower)",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None


def build_kernel(cap: str):
    """The kernel built for CPU capability `cap` ("avx512", "avx2", "default": the portable path), cached on disk."""
    from torch.utils.cpp_extension import _get_build_directory, load
    name = f"moespec_mxfp4_{cap}"
    if not (Path(_get_build_directory(name, False)) / f"{name}.so").exists():
        print("moespec: building the MXFP4 kernel for this CPU (once, about 30 s)", file=sys.stderr, flush=True)
    return load(name=name, sources=[str(Path(__file__).with_name("mxfp4_kernel.cpp"))],
                extra_cflags=["-O3", *KERNEL_FLAGS.get(cap, [])], verbose=False)


class Mxfp4Weight:
    """An [O, I] MXFP4 weight; `layers.linear` calls `.linear(x, b)`."""
    __slots__ = ("blocks", "scales", "shape")

    def __init__(self, blocks: torch.Tensor, scales: torch.Tensor):
        self.blocks, self.scales = blocks, scales
        self.shape = (blocks.shape[0], 2 * blocks.shape[1])

    @staticmethod
    def from_float(w: torch.Tensor, name: str = "weight") -> "Mxfp4Weight":
        check_mxfp4_shape(tuple(w.shape), name)
        return Mxfp4Weight(*quantize_mxfp4(w))

    def linear(self, x: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., I] -> [..., O] in x's dtype (the kernel accumulates in float32)."""
        rows = x.numel() // x.shape[-1]
        k = kernel() if x.device.type == "cpu" else None
        if k is None:
            w = dequantize_mxfp4(self.blocks, self.scales, x.dtype)
            return F.linear(x, w, None if b is None else b.to(x.dtype))
        y = k.mxfp4_linear(x.reshape(rows, x.shape[-1]), self.blocks, self.scales)
        if b is not None:
            y = y + b
        return y.to(x.dtype).view(*x.shape[:-1], self.shape[0])

    def dequantize(self) -> torch.Tensor:
        return dequantize_mxfp4(self.blocks, self.scales)

    @property
    def nbytes(self) -> int:
        return self.blocks.numel() + self.scales.numel()
