"""Shared transformer pieces: RMSNorm, rotary embeddings, attention over the explicit KV cache.

Shapes: B batch rows, T new tokens per row, H query heads, G kv heads, hd head dim,
L keys visible (committed cache + new tokens), D hidden.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..quant.weights import QUANTIZED


# CPUs without native bf16 (AVX2 and older) run bf16 GEMM several times slower than fp32, while one-row bf16
# products stay fast (they are memory-bound and read half the bytes).
SLOW_BF16_GEMM = torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "NO AVX", "AVX", "AVX2")
UPCAST_MIN_ROWS = 8


# Products of a few rows (decode, verification) with a row-major [out, in] weight run as W @ X^T: MKL's
# GEMM with 2..15 columns can stream the weight much faster than its x W^T path or its GEMV (fp32; most of
# all on the output head). One row is padded to two columns. The layout chooser (layout.py) times this path
# against column-major F.linear per shape at load.
MMT_MAX_ROWS = 15


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; few-row fp32 products with a row-major weight on CPU go through W @ X^T (see above); multi-row
    bf16 products on CPUs without fast bf16 GEMM run in fp32.

    The bf16 upcast makes prefill and verification cost what fp32 costs instead of several times more; the weights stay
    bf16 in memory and the result is rounded back to bf16 (more accurate than a bf16 GEMM, not bit-equal to it).
    """
    if type(w) in QUANTIZED:            # int8 / int4 weights (quant/weights.py) run their own kernels
        return w.linear(x, b)
    if x.device.type == "cpu":
        d = x.shape[-1]
        m = x.numel() // d if d else 0
        if x.dtype is torch.bfloat16 and m > BUCKET_FROM and not (SLOW_BF16_GEMM and m >= UPCAST_MIN_ROWS):
            return _bucketed(x, w, b, m)
        if w.layout == torch._mkldnn:
            return _product(x, w, b)
        if (0 < m <= MMT_MAX_ROWS and x.dtype is torch.float32 and w.dtype is torch.float32
                and w.stride() == (d, 1)):
            return linear_mmt(x, w, b, m)
        if x.dtype is torch.bfloat16 and SLOW_BF16_GEMM and m >= UPCAST_MIN_ROWS:
            return F.linear(x.float(), w.float(), None if b is None else b.float()).to(torch.bfloat16)
    return F.linear(x, w, b)


# oneDNN keeps what it builds for each bf16 product shape (primitives, JIT kernels) for the life of the process: a
# server sees a new row count with every batch and prompt length, and its RSS grew without bound (a 1024 x 512
# weight times 400 row counts kept 200 MB). Rows past BUCKET_FROM are padded to a bucket (multiples of 16 up to
# 256, then of 64), which bounds the shapes and costs a few zero rows of compute.
BUCKET_FROM = 16


def row_bucket(m: int) -> int:
    """The row count a bf16 product of m rows runs at: m up to BUCKET_FROM, then the next multiple of 16 (of 64 past
    256)."""
    if m <= BUCKET_FROM:
        return m
    step = 16 if m <= 256 else 64
    return -(-m // step) * step


def _bucketed(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, m: int) -> torch.Tensor:
    """x [..., in] (m rows, bf16) times w, run at row_bucket(m) rows (zero rows appended, then dropped)."""
    x2 = x.reshape(m, x.shape[-1])
    pad = row_bucket(m) - m
    if pad:
        x2 = torch.cat([x2, x2.new_zeros(pad, x2.shape[-1])])
    y = _product(x2, w, b)
    return y[:m].view(*x.shape[:-1], y.shape[-1])


def _product(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x times w: a bf16 weight prepacked at load (packed.py) through oneDNN, bit-identical to F.linear; else F.linear."""
    if w.layout == torch._mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)


def linear_mmt(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, m: int) -> torch.Tensor:
    """x [..., in] (m rows) times row-major w [out, in] as (w @ x^T)^T -> [..., out].

    MKL's fast small-N GEMM needs X^T column-major, i.e. x row-major [m, in]; one row is duplicated (a
    second column costs nothing) because a one-column product falls back to a slow GEMV.
    """
    x2 = x.reshape(m, x.shape[-1])
    if m == 1:
        x2 = x2.expand(2, -1)
    x2 = x2.contiguous()
    if x2.data_ptr() % 64:              # MKL's rounding depends on operand alignment: keep it fixed (64 bytes)
        x2 = x2.clone()
    y = torch.mm(w, x2.t())                                    # [out, max(m, 2)]
    out = (y[:, :1] if m == 1 else y).t().contiguous()         # [m, out]
    if b is not None:
        out = out + b
    return out.view(*x.shape[:-1], w.shape[0])


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    # One fused kernel; bit-identical to HF's float32 formula (in bf16 it rounds once instead of twice).
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale for the config's rope type (HF formulas)."""
    rp, dim = cfg.rope, cfg.rope_dim
    base = float(rp["rope_theta"])
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = rp["rope_type"]
    if kind == "linear":
        return inv / float(rp["factor"]), 1.0
    if kind == "llama3":
        factor, lo, hi = float(rp["factor"]), float(rp["low_freq_factor"]), float(rp["high_freq_factor"])
        old = float(rp["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(rp, dim, base, cfg.max_position_embeddings)
    if kind == "longrope":       # the short factors: a sequence within the original context (families._phimoe)
        short = torch.tensor(rp["short_factor"], dtype=torch.float32)
        orig, factor = rp["original_max_position_embeddings"], rp["factor"]
        scale = rp.get("short_mscale") or rp.get("attention_factor") or (
            1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig)))
        return 1.0 / (short * base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), float(scale)
    return inv, 1.0


def _yarn(rp: dict, dim: int, base: float, max_pos: int) -> tuple[torch.Tensor, float]:
    orig = rp.get("original_max_position_embeddings") or max_pos
    factor = rp.get("factor") or max_pos / orig

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = rp.get("attention_factor")
    if attn is None:
        m, m_all = rp.get("mscale"), rp.get("mscale_all_dim")
        attn = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    fast, slow = rp.get("beta_fast") or 32, rp.get("beta_slow") or 1

    def corr_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    lo, hi = corr_dim(fast), corr_dim(slow)
    if rp.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extra = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
    return inv, attn


def rope_tables(cfg: ModelConfig, max_len: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, signed sin tables [max_len, hd], indexed by position (apply_rope's form: the sin table's first half
    negated, so rotate_half(x) * sin is roll(x) * signed sin, bit for bit)."""
    inv, scale = rope_inv_freq(cfg)
    freqs = torch.arange(max_len, dtype=torch.int64).float()[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = (emb.cos() * scale).to(dtype=dtype, device=device), (emb.sin() * scale).to(dtype=dtype, device=device)
    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's x * cos + rotate_half(x) * sin, with sin signed (rope_tables): rotate_half(x) = cat(-x2, x1), and
    cat(-x2, x1) * sin == roll(x, half) * cat(-sin1, sin2) exactly (negation is exact), in one op fewer ways.
    x [B, heads, T, hd]; cos/sin [B, 1, T, hd]."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None = None
           ) -> torch.Tensor:
    """q [B, H, T, hd], k/v [B, G, L, hd], mask [B, 1, T, L] bool (True = visible) or None -> [B, T, H*hd].

    A cache kept wider than the model (float32 K/V for a bf16 model, DecoderLM.kv_dtype) attends at its width; scale:
    the softmax scale (None: hd ** -0.5)."""
    out = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[1]).to(q.dtype)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


SINK_CHUNK = 1 << 24        # scores computed per chunk of queries, at most this many at a time (64 MB in float32)


def attend_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, sinks: torch.Tensor,
                      scale: float | None = None) -> torch.Tensor:
    """attend() with a sink per head (gpt-oss): a logit sinks[h] joins each query's softmax and takes its share of
    the mass, with no value. q [B, H, T, hd], k/v [B, G, L, hd], mask [B, 1, T, L] | None (plain causal over the
    cache: T == 1), sinks [H] -> [B, T, H*hd]. Query heads are grouped by kv head, so the cache is never expanded;
    queries go in chunks that keep the scores under SINK_CHUNK values."""
    B, H, T, hd = q.shape
    G, L = k.shape[1], k.shape[2]
    r, dt = H // G, q.dtype
    q = q.to(k.dtype)
    sink = sinks.to(k.dtype).view(1, H, 1, 1)
    step = max(1, SINK_CHUNK // max(1, B * H * L))
    outs = []
    for t0 in range(0, T, step):
        qc = q[:, :, t0:t0 + step]
        tc = qc.shape[2]
        s = torch.matmul(qc.reshape(B, G, r * tc, hd), k.transpose(-1, -2)).view(B, H, tc, L)
        s = s * (hd ** -0.5 if scale is None else scale)
        if mask is not None:
            s = s.masked_fill(~mask[:, :, t0:t0 + tc], float("-inf"))
        z = torch.cat([s, sink.expand(B, H, tc, 1)], dim=-1)
        p = torch.softmax(z - z.amax(dim=-1, keepdim=True), dim=-1)[..., :L]
        outs.append(torch.matmul(p.reshape(B, G, r * tc, L), v).view(B, H, tc, hd))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.to(dt).transpose(1, 2).reshape(B, T, -1)
