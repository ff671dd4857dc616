"""Time of one forward: per layer max(bytes / bandwidth, flops / peak) + overhead, plus slow-link expert loads.

One forward processes `batch` rows of `t` new tokens over `context` cached tokens (N = batch x t routed tokens).
Per MoE layer it reads the layer's dense weights once, the U(N) distinct experts the tokens touch, and the KV
cache of every row; the experts among them that are not cached cross the slow link first. Worked example,
Mixtral-8x7B bf16 on rtx4090-pcie4 (806 GB/s reachable) with all experts resident, batch 1, t = 1: an MoE
layer reads 0.087 GB dense + 2 x 0.352 GB experts = 0.80 GB -> 0.99 ms, far above its 0.80 GFLOP / 116 TFLOP/s,
so decoding is memory-bound; at t = 4 it reads 5.47 experts (2.0 GB, 2.5x the time for 4x the tokens).

With a measured M-rows table in the profile (`Hardware.rows_fp32_tflops`, from `moespec calibrate`) the weight
matmuls are priced by their rows and matrix sizes instead of by one peak: per layer max(weight bytes / bw,
sum of `Hardware.matmul_time`) + max(KV bytes / bw, attention flops / peak), where the dense weights see N rows
(attention as 4 matrices q, k, v, o; the router as one; shared experts and dense MLPs as 2, as the engine
stores gate+up fused), each of the U touched experts the mean N x K / U rows (2 matrices), and the head
batch x logit positions rows. Every forward also pays `Hardware.step_overhead_s` once (the generation loop's
sampling and bookkeeping). Profiles without a table use the formula above unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

from .hardware import Hardware
from .model import ModelDesc
from .union import expected_misses, expected_union_profile


@dataclass(frozen=True)
class Offload:
    """Experts outside a per-layer cache live in the slow tier (host RAM for a GPU, SSD for a CPU)."""
    cached_experts: float            # C experts per MoE layer kept in fast memory (an average: may be fractional)
    hit_rate: float | None = None    # a measured cache hit rate (touched experts found cached) overrides routing
    union: float | None = None       # a measured mean of distinct experts per MoE layer per forward (with hit_rate)
    overlap: bool = False            # loads overlap the layer's compute (pipelined) instead of stalling it
    prefetched_layers: int = 0       # the first L MoE layers had their misses loaded while drafting (SP-MoE)
    prefetch_accuracy: float = 0.0   # fraction of those misses the prefetch predicted: the measured recall
                                     # (planner.PREFETCH_RECALL, or a run's predictor_recall)


@dataclass(frozen=True)
class ForwardCost:
    time: float          # seconds for the whole forward, with the profile's per-step overhead
    compute_time: float  # the fast-tier part: sum over layers of max(bytes / bw, flops / peak)
    slow_time: float     # slow-link time (hidden or not, depending on `Offload.overlap`)
    bytes: float         # fast-tier bytes read
    slow_bytes: float    # bytes over the slow link
    flops: float
    union: float         # mean distinct experts per MoE layer
    misses: float        # mean experts per MoE layer loaded over the slow link


def forward_cost(model: ModelDesc, hw: Hardware, batch: int, t: int, context: int, *,
                 offload: Offload | None = None, profile=None, experts: float | None = None,
                 budget: float | None = None, logits_per_row: int | None = None) -> ForwardCost:
    """Cost of one forward; `experts` restricts routing to that many resident experts (the self-drafter, which
    substitutes the nearest resident expert: routing is then taken as uniform over them), `budget` caps the
    distinct experts per layer (MoE-Spec), `logits_per_row` defaults to t (verification needs every position)."""
    N = batch * t
    union, misses = _experts_read(model, N, offload, profile, experts, budget)
    kv_read, attn_flops = _attention(model, batch, t, context)
    moe_bytes = model.moe_layer_dense_bytes + union * model.expert_bytes + kv_read
    moe_flops = 2 * N * (model.attn_params + model.moe_dense_params + model.top_k * model.expert_params) + attn_flops
    dense_bytes = model.dense_layer_bytes + kv_read
    dense_flops = 2 * N * (model.attn_params + model.mlp_params) + attn_flops
    rows = t if logits_per_row is None else logits_per_row
    head_bytes, head_flops = model.head_bytes, 2 * batch * rows * model.head_params
    moe_compute, dense_compute, head_compute = _compute(model, hw, batch * rows, N, union, kv_read, attn_flops,
                                                        (moe_bytes, moe_flops), (dense_bytes, dense_flops),
                                                        (head_bytes, head_flops))
    ov = offload or Offload(model.experts)
    pre = min(ov.prefetched_layers, model.moe_layers)
    layer_misses = [misses * (1 - ov.prefetch_accuracy)] * pre + [misses] * (model.moe_layers - pre)
    total, slow_total = 0.0, 0.0
    for m in layer_misses:
        s = _slow(model, hw, m)
        slow_total += s
        total += (max(moe_compute, s) if ov.overlap else moe_compute + s) + hw.layer_overhead_s
    total += model.dense_layers * (dense_compute + hw.layer_overhead_s) + head_compute + hw.layer_overhead_s
    total += hw.step_overhead_s
    return ForwardCost(
        time=total,
        compute_time=model.moe_layers * moe_compute + model.dense_layers * dense_compute + head_compute,
        slow_time=slow_total,
        bytes=model.moe_layers * moe_bytes + model.dense_layers * dense_bytes + head_bytes,
        slow_bytes=sum(layer_misses) * model.expert_bytes,
        flops=model.moe_layers * moe_flops + model.dense_layers * dense_flops + head_flops,
        union=union, misses=misses)


def _experts_read(model: ModelDesc, N: int, offload: Offload | None, profile, experts: float | None,
                  budget: float | None) -> tuple[float, float]:
    """Distinct experts a MoE layer computes for N tokens (the union), and how many of them miss the cache."""
    E, K = model.experts, model.top_k
    if experts is not None and E:
        E = max(float(min(experts, E)), float(K))
    restricted = E != model.experts
    if not model.moe_layers:
        union = 0.0
    elif profile is not None and not restricted:
        union = expected_union_profile(profile, N)
    else:
        union = E * (1.0 - (1.0 - K / E) ** N)
    if offload is not None and offload.union is not None and model.moe_layers and not restricted:
        union = float(offload.union)
    misses = 0.0
    if offload is not None and model.moe_layers and not restricted and offload.cached_experts < model.experts:
        if offload.hit_rate is not None:
            misses = union * (1.0 - offload.hit_rate)
        else:
            misses = expected_misses(model.experts, K, N, offload.cached_experts, profile)
    if budget is not None and union > budget:
        misses *= budget / union
        union = float(budget)
    return union, misses


def _attention(model: ModelDesc, batch: int, t: int, context: int) -> tuple[float, float]:
    """KV bytes read and attention flops of a layer, averaged over layers: every row reads its whole cache once and
    each new token attends to the cache and the new tokens before it; sliding layers see at most their window."""
    def kv_len(full):
        return model.kv_len(context + t, full)

    def pairs(full):
        return t * model.kv_len(context + (t + 1) / 2, full)

    sliding = model.layers - model.full_attn_layers
    avg = lambda f: (model.full_attn_layers * f(True) + sliding * f(False)) / model.layers  # noqa: E731
    return batch * avg(kv_len) * model.kv_values * model.kv_bytes_per_value, batch * avg(pairs) * model.attn_pair_flops


def _compute(model: ModelDesc, hw: Hardware, head_rows: int, N: int, union: float, kv_read: float,
             attn_flops: float, moe: tuple, dense: tuple, head: tuple) -> tuple[float, float, float]:
    """Compute seconds of a MoE layer, a dense layer and the head ((bytes, flops) each): the roofline, or the
    measured M-rows rates when the hardware has them (module docstring)."""
    bw, peak = hw.mem_bw, hw.peak_flops(model.dtype_bytes)
    if hw.rows_table(model.dtype_bytes) is None:
        return tuple(max(b / bw, f / peak) for b, f in (moe, dense, head))
    db = model.dtype_bytes                       # the time is linear in params, so sum them
    ew = model.expert_bits / 8 if model.expert_bits is not None else db

    def mm(params, n, width, matrices):          # `params` in `matrices` equal matrices, n rows each
        return hw.matmul_time(params, n, width, params * width / matrices) if params > 0 else 0.0
    router = model.experts * model.hidden if model.moe_layers else 0
    attn = max(kv_read / bw, attn_flops / peak)
    attn_mm = mm(model.attn_params, N, db, 4)                           # q, k, v, o
    moe_mm = (attn_mm + mm(router, N, db, 1) + mm(model.moe_dense_params - router, N, db, 2)   # shared expert
              + (union * mm(model.expert_params, N * model.top_k / union, ew, 2) if union > 0 else 0.0))  # w13, w2
    moe_compute = max((model.moe_layer_dense_bytes + union * model.expert_bytes) / bw, moe_mm) + attn
    dense_compute = max(model.dense_layer_bytes / bw, attn_mm + mm(model.mlp_params, N, db, 2)) + attn
    head_compute = max(head[0] / bw, mm(model.head_params, head_rows, db, 1))
    return moe_compute, dense_compute, head_compute


def _slow(model: ModelDesc, hw: Hardware, m: float) -> float:
    """Seconds a layer waits for m expert reads from the slow tier."""
    if m <= 0:
        return 0.0
    wait = hw.miss_overhead_s * min(1.0, m)            # the layer waits for its loads once
    if hw.slow_read_gbs or hw.miss_read_gbs:           # calibrated: the engine's miss rate, or one random read each
        return m * hw.miss_read_s(model.expert_bytes) + wait
    return m * model.expert_bytes / hw.slow_bw + hw.slow_latency_s * min(1.0, m) + wait   # latency once per batch


def t_target(model: ModelDesc, hw: Hardware, batch: int, t: int, context: int, **kw) -> float:
    """T_target(B, t): seconds for one target forward of `batch` rows x `t` tokens at `context` cached tokens."""
    return forward_cost(model, hw, batch, t, context, **kw).time


def prefill_time(model: ModelDesc, hw: Hardware, prompt_len: int = 512, batch: int = 1, **kw) -> float:
    """TTFT estimate: one forward over the prompt (logits of the last position only)."""
    return forward_cost(model, hw, batch, prompt_len, 0, logits_per_row=1, **kw).time


def decode_tpot(model: ModelDesc, hw: Hardware, batch: int, context: int, **kw) -> float:
    """Time per output token of plain decoding: one forward of one token per row."""
    return t_target(model, hw, batch, 1, context, **kw)


def decode_tokens_per_s(model: ModelDesc, hw: Hardware, batch: int, context: int, **kw) -> float:
    """Aggregate tokens/s of plain decoding at batch B: B / TPOT."""
    return batch / decode_tpot(model, hw, batch, context, **kw)
