"""`--memory LIMIT`: one budget for the whole process's resident memory, turned into settings before loading.

The budget is split, in this order (`plan_memory`):

    runtime     what the process already holds: Python, torch and their libraries (measured: the RSS when the
                plan is made; `moespec plan`, which imports no torch, uses RUNTIME_BYTES)
    dense       every weight but the routed experts, at the run's precision (quantized with --quantize-dense)
    kv          the KV cache for `batch` sequences of `max_model_len` tokens (float32 on a CPU for bf16
                models), doubled for a self drafter with its own cache, plus a draft model and its cache
                (and a self drafter's shadow experts, with the weights)
    reserve     activations of the largest forward (a prefill of max_model_len x batch tokens), allocator
                slack and the layout timing's samples at load (16 MiB under a budget), and two expert slots (a
                slot being prepacked exists twice for a moment): 96 MiB + 2 slots +
                tokens x (24 hidden + 8 expert width x top_k / experts) bytes
    experts     the rest: every expert resident if they all fit, else a cache of S slots per MoE layer over the
                disk tier (O_DIRECT reads, so the page cache holds none of them), S >= 1

A budget whose fixed part (runtime + dense + kv + reserve) leaves no room for one expert per MoE layer is refused
with the numbers. Sizes are parsed by perf.units.parse_size: decimal GB / MB are powers of 1000, GiB / MiB (and
bare G / M) powers of 1024.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace

from .errors import MoespecError

MiB = 1024 ** 2
PAGE = 4096
RUNTIME_BYTES = 300 * MiB       # Python + torch + moespec imported: their measured RSS with a little headroom
RESERVE_BASE = 96 * MiB         # code pages of the libraries touched once computing starts, allocator slack, the
                                # layout timing's samples at load


def rss_bytes() -> int:
    """This process's resident set size now (Linux; 0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass(frozen=True)
class MemoryPlan:
    limit: int
    runtime: int
    dense: int
    kv: int
    reserve: int
    expert_bytes: int            # one expert's slot (its blob rounded up to a page)
    moe_layers: int
    experts: int                 # per MoE layer
    slots: int                   # experts per MoE layer kept in memory (== experts: all resident)
    max_model_len: int
    batch: int
    quantize: str

    @property
    def resident(self) -> bool:
        return self.slots >= self.experts

    @property
    def fixed(self) -> int:
        return self.runtime + self.dense + self.kv + self.reserve

    @property
    def expert_cache(self) -> int:
        return self.slots * self.moe_layers * self.expert_bytes

    def describe(self) -> dict:
        d = asdict(self)
        d.update(resident=self.resident, fixed=self.fixed, expert_cache_bytes=self.expert_cache,
                 planned_total=self.fixed + self.expert_cache)
        return d

    def summary(self) -> str:
        where = "all resident" if self.resident else \
            f"{self.slots} of {self.experts} per MoE layer cached over the disk tier"
        return (f"--memory {_gb(self.limit)}: runtime {_gb(self.runtime)} + weights {_gb(self.dense)} + KV "
                f"{_gb(self.kv)} ({self.batch} x {self.max_model_len} tokens) + reserve {_gb(self.reserve)} + experts "
                f"{_gb(self.expert_cache)} ({where}, {self.quantize})")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def plan_memory(limit: int, *, dense_bytes: int, expert_blob_bytes: int, moe_layers: int, experts: int,
                kv_bytes_per_token: int, max_model_len: int, batch: int = 1, hidden: int = 0, expert_width: int = 0,
                top_k: int = 1, runtime: int | None = None, kv_copies: float = 1.0, extra: int = 0, quantize: str = "none") -> MemoryPlan:
    """The split described in the module docstring. runtime None: this process's RSS now. kv_copies: 2 for the
    self drafter (its own KV cache); extra: a draft model's weights and cache."""
    runtime = (rss_bytes() or RUNTIME_BYTES) if runtime is None else runtime
    tokens = max_model_len * batch
    kv = int(kv_bytes_per_token * tokens * kv_copies)
    slot = -(-expert_blob_bytes // PAGE) * PAGE
    reserve = RESERVE_BASE + 2 * slot + tokens * (24 * hidden + 8 * expert_width * top_k // max(1, experts))
    fixed = runtime + dense_bytes + kv + reserve + extra
    free = limit - fixed
    per_layer = slot * moe_layers
    slots = experts if free >= per_layer * experts else (free // per_layer if per_layer else 0)
    plan = MemoryPlan(limit, runtime, dense_bytes + extra, kv, reserve, slot, moe_layers, experts, int(slots),
                      max_model_len, batch, quantize)
    if moe_layers and slots < 1:
        raise MoespecError(
            f"--memory {_gb(limit)} is too small: the runtime ({_gb(runtime)}), the weights outside the experts "
            f"({_gb(dense_bytes + extra)}), the KV cache for {batch} x {max_model_len} tokens ({_gb(kv)}) and the "
            f"reserve ({_gb(reserve)}) need {_gb(fixed)}, leaving {_gb(max(0, free))} where one expert per MoE layer "
            f"needs {_gb(per_layer)}; lower --max-model-len, quantize (--quantize int8 / int4, --quantize-dense) or "
            "raise --memory")
    if not moe_layers and free < 0:
        raise MoespecError(f"--memory {_gb(limit)} is too small: this dense model needs {_gb(fixed)}")
    return plan


def plan_for_model(limit: int, path, cfg, dtype: str, quant, *, max_model_len: int | None, batch: int = 1,
                   spec=None, device: str = "cpu", runtime: int | None = None) -> MemoryPlan:
    """plan_memory for a checkpoint folder at the precision a run would use. max_model_len None: the model's, at
    most 2048, halved (down to 512) while fewer than top_k experts per MoE layer would fit: the KV cache gives way
    to the experts first, since a step needs its top_k experts."""
    from .model_info import model_sizes
    sizes = model_sizes(path, cfg, dtype, quant)
    kv_elem = 4 if str(device).startswith("cpu") else (4 if sizes["dtype"] == "float32" else 2)
    kv_token = cfg.num_layers * cfg.kv_values_per_token * kv_elem
    extra, copies = 0, 1.0
    if spec is not None and spec.method == "self" and spec.draft_kv == "own":
        copies = 2.0                                       # this self drafter keeps its own KV cache
    if spec is not None and spec.shadow and cfg.is_moe:   # low-bit copies of every expert, for drafting
        from .quant.scheme import QuantConfig
        extra += model_sizes(path, cfg, dtype, QuantConfig(spec.shadow))["bytes_experts"]
    if spec is not None and spec.method in ("draft_model", "auto") and spec.model:
        from .config import ModelConfig
        dcfg = ModelConfig.from_folder(spec.model)
        dsz = model_sizes(spec.model, dcfg, dtype, None)
        extra += dsz["bytes_total"] + dcfg.num_layers * dcfg.kv_values_per_token * kv_elem * \
            (max_model_len or min(cfg.max_position_embeddings, 2048)) * batch
    common = dict(dense_bytes=sizes["bytes_dense"], expert_blob_bytes=sizes["bytes_per_expert"],
                  moe_layers=sizes["moe_layers"] if cfg.is_moe else 0, experts=cfg.num_experts,
                  kv_bytes_per_token=kv_token, batch=batch, hidden=cfg.hidden_size,
                  expert_width=cfg.moe_intermediate_size or cfg.intermediate_size, top_k=cfg.top_k or 1,
                  runtime=runtime, kv_copies=copies,
                  extra=extra, quantize=quant.tag if quant is not None else "none")
    if max_model_len is not None:
        return plan_memory(limit, max_model_len=min(max_model_len, cfg.max_position_embeddings), **common)
    n = min(cfg.max_position_embeddings, 2048)
    while True:
        try:
            p = plan_memory(limit, max_model_len=n, **common)
        except MoespecError:
            if n <= 512:
                raise
            n //= 2
            continue
        if p.slots >= min(cfg.top_k, cfg.num_experts) or n <= 512 or not cfg.is_moe:
            return p
        n //= 2


def plan_for_run(memory, path, dtype: str, quantize, offload, spec, max_model_len: int | None, batch: int,
                 device: str = "cpu"):
    """What LLM(memory=...) runs with: (plan, quantization, OffloadConfig or None, max_model_len).

    quantize "auto": the most precise of none / int8 / int4 that keeps every expert resident; if none does, the one
    the performance model predicts decodes fastest with the cache it leaves (perf.step.forward_cost)."""
    from .config import ModelConfig, OffloadConfig
    from .perf.units import parse_size
    from .quant.scheme import QuantConfig
    try:
        limit = parse_size(memory, "--memory")
    except Exception as e:                          # PerfError: one message either way
        raise MoespecError(str(e)) from None
    if offload is not None and offload.expert_cache is not None:
        raise MoespecError("--memory sizes the expert cache itself: give --memory or --expert-cache, not both")
    if batch < 1:
        raise MoespecError(f"max_batch={batch} must be at least 1")
    cfg = ModelConfig.from_folder(path)
    if quantize == "auto":
        options = [None, QuantConfig("int8"), QuantConfig("int4")] if cfg.is_moe else [None]
        plans = []
        for q in options:
            try:
                plans.append((q, plan_for_model(limit, path, cfg, dtype, q, max_model_len=max_model_len, batch=batch,
                                                spec=spec, device=device)))
            except MoespecError as e:
                last = e
        if not plans:
            raise last
        q, plan = next(((q, p) for q, p in plans if p.resident), None) or _fastest(path, cfg, plans, batch)
    else:
        q = QuantConfig.parse(quantize)
        plan = plan_for_model(limit, path, cfg, dtype, q, max_model_len=max_model_len, batch=batch, spec=spec,
                              device=device)
    if plan.resident:
        return plan, q, None, plan.max_model_len
    # the budget counts no page cache for experts: the disk tier with O_DIRECT (the config given keeps its other
    # settings; none given: next-layer prefetch)
    off = replace(offload or OffloadConfig(prefetch="next-layer"), expert_cache=plan.slots, offload="disk",
                  direct_io=True)
    return plan, q, off, plan.max_model_len


def _fastest(path, cfg, plans, batch: int):
    """The (quantization, plan) with the lowest predicted decode step time on this machine's profile."""
    from .perf.hardware import get_profile
    from .perf.model import ModelDesc
    from .perf.step import Offload, forward_cost
    hw = get_profile("this-machine")

    def tpot(qp):
        q, p = qp
        bits = None if q is None else 8 * p.expert_bytes / (3 * cfg.hidden_size * cfg.moe_intermediate_size)
        m = ModelDesc.from_file(path, expert_bits=bits)
        return forward_cost(m, hw, batch, 1, p.max_model_len // 2, offload=Offload(float(p.slots))).time
    return min(plans, key=tpot)
