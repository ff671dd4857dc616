"""Published setups, predicted vs reported (issue 7): the step model run on other people's measurements.

Each `Setup` names a bundled model config, the precision (bits per weight), the hardware (built here from
datasheet figures, each with its source), where the experts live, batch and context, and one reported figure
(decode tokens/s or seconds per output token). `compare()` predicts the same figure with the perf model's own
functions (`decode_tpot`, `memory_plan`) and reports the relative error (predicted - reported) / reported.

Conventions (ours, not fitted to these numbers; the same as the built-in profiles in hardware.py): GPUs reach
0.8 of peak memory bandwidth, 0.7 of tensor peak and 0.8 of PCIe, with 50 us per layer; Apple GPUs 0.75 of
bandwidth and 100 us per layer; CPUs 0.7 of peak DRAM bandwidth (1.0 for a measured figure), 0.5 of peak flops,
50 us per layer. Routing is uniform. Context is a nominal value where the source gives none.

llama.cpp `--n-cpu-moe N` keeps every weight on the GPU except the experts of the first N layers, which the
CPU computes from RAM (nothing crosses PCIe per token). The step model has one fast tier, so such a setup is
priced as the sum of three forwards (ours): the model without experts on the GPU, the GPU-resident experts
alone on the GPU, and the CPU experts alone on the CPU.

Precision: GGUF Q8_0 is 8.5 bits/weight; Q4_K_M mixes Q4_K (4.5) with Q6_K (6.5625) for half of the
ffn_down / attn_v tensors, ~4.85 on average (the 18,557 MB Qwen3-30B-A3B file is 4.86 over 30.5 B params).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace

from .hardware import Hardware
from .model import ModelDesc, known_model
from .planner import memory_plan, offload_for
from .step import Offload, decode_tpot

GiB = 1024 ** 3
Q8_0, Q4_K_M = 8.5, 4.85
_PCIE3 = "PCI-SIG PCI Express Base Specification 3.0: 8 GT/s per lane, x16 = 15.75 GB/s per direction"
_PCIE4 = "PCI-SIG PCI Express Base Specification 4.0: 16 GT/s per lane, x16 = 31.5 GB/s per direction"


def _gpu(name, bw, fp32, tensor, pcie, mem_gb, sources):
    return Hardware(name, bw, fp32, tensor, pcie, 10e-6, 50e-6, int(mem_gb * GiB), "pcie", 0.8, 0.7, 0.8,
                    "published-setup GPU; reachable fractions as the built-in GPU profiles", tuple(sources))


def _cpu(name, bw, fp32, mem_gb, sources, mem_eff=0.7):
    return Hardware(name, bw, fp32, fp32, 3.0, 100e-6, 50e-6, int(mem_gb * GiB), "ssd", mem_eff, 0.5, 1.0,
                    "published-setup CPU (experts or whole model in DRAM); slow link unused", tuple(sources))


HW = {h.name: h for h in [
    Hardware("m2-ultra-192gb", 800, 27.2, 27.2, 5.0, 100e-6, 100e-6, 192 * GiB, "ssd", 0.75, 0.6, 0.9,
             "Mac Studio M2 Ultra (76-core GPU), llama.cpp Metal; GPU flops are ours (76 x 128 ALUs x 2 x "
             "1.4 GHz); conventions of the built-in m3-max-laptop profile",
             ("Apple newsroom 2023-06-05 'Apple introduces M2 Ultra': 800 GB/s unified memory bandwidth, up "
              "to 192 GB, up to 76-core GPU",)),
    _cpu("i7-8700-ddr4-2666", 41.6, 0.614, 32,
         ("Intel ARK, Core i7-8700: 6 cores, 3.2 GHz base, 2 channels DDR4-2666, max memory bandwidth 41.6 GB/s; "
          "fp32 peak ours: 6 x 3.2 GHz x 32 flop/cycle (AVX2, 2 FMA); the RAM fitted is not stated by the source",)),
    _gpu("rtx2080-pcie3", 448, 10.1, 40.3, 15.75, 8,
         ("NVIDIA Turing GPU Architecture whitepaper, GeForce RTX 2080 (reference): 448 GB/s GDDR6, 8 GB, "
          "10.1 TFLOPS FP32, 40.3 TFLOPS FP16 tensor with FP32 accumulate", _PCIE3)),
    _cpu("i9-10900x-ddr4-4ch", 102, 2.37, 62,
         ("github.com/AlexsJones/llmfit/pull/755: the submitter's measured ~102 GB/s quad-channel DDR4 (used as "
          "an achieved rate, mem_eff 1.0); Intel ARK i9-10900X: 10 cores, 3.7 GHz base, AVX-512 (fp32 peak ours: "
          "10 x 3.7 GHz x 64 flop/cycle)",), mem_eff=1.0),
    _gpu("rtx-a5000-pcie4", 768, 27.8, 111.1, 31.5, 24,
         ("NVIDIA RTX A5000 datasheet: 24 GB GDDR6, 768 GB/s, 27.8 TFLOPS FP32, 222.2 TFLOPS tensor with "
          "sparsity (111.1 dense), PCIe 4.0 x16", _PCIE4)),
    _gpu("t4-pcie3", 320, 8.1, 65, 15.75, 16,
         ("NVIDIA T4 datasheet: 16 GB GDDR6, 320 GB/s, 8.1 TFLOPS FP32, 65 TFLOPS FP16/FP32 mixed precision, "
          "PCIe Gen3 x16", _PCIE3)),
    _gpu("rtx3060-pcie3", 360, 12.7, 25.5, 15.75, 12,
         ("NVIDIA GeForce RTX 3060 spec page: 3584 CUDA cores, 1.78 GHz boost, 12 GB GDDR6 192-bit at 15 Gbps "
          "= 360 GB/s; FP32 and FP16-tensor-with-FP32-accumulate (half the FP16-accumulate rate on GeForce "
          "Ampere) derived by us; the paper's desktop runs it on PCIe Gen3", _PCIE3)),
]}

_MO = ("Eliseev & Mazur 2023, 'Fast Inference of Mixture-of-Experts Language Models with Offloading' "
       "(arXiv 2312.17238), Table 2, 'W/o expert pre-loading' row, 2-bit experts")
_MI = ("github.com/EfficientMoE/MoE-Infinity README (commit 00181f1), Performance: single A5000 24GB, FP16, "
       "per-token latency (s), mixed LongBench/GSM8K/FLAN/BIG-Bench/MMLU")
# mixtral-offloading Table 1 sizes (GiB): 4-bit attn + 2-bit experts 17.54, FP16 attn + 2-bit experts 19.33 ->
# experts 3.1 bits/param over 45.1 B params (the text says ~2.6), non-expert weights 0.80 bytes/param on average
_MO_EXPERT_BITS, _MO_DENSE_BITS = 3.1, 6.4


@dataclass(frozen=True)
class Setup:
    name: str
    model: str                          # a bundled config name (perf/configs)
    hardware: Hardware                  # the fast tier: GPU memory, Apple unified memory, or CPU DRAM
    metric: str                         # "tok_s" (decode tokens/s) or "tpot_s" (seconds per output token)
    reported: float
    source: str
    dense_bits: float | None = None     # bits per non-expert weight (None: the config's dtype)
    expert_bits: float | None = None    # bits per expert weight (None: as dense, or the model's native format)
    batch: int = 1
    context: int = 256                  # tokens already cached (nominal where the source gives none)
    cached_experts: float | None = None  # experts per MoE layer in fast memory (None: from memory_bytes, or all)
    memory_bytes: float | None = None   # fast memory budget -> cached experts via planner.memory_plan
    overlap: bool = False               # expert loads overlap compute (prefetching engines)
    cpu: Hardware | None = None         # llama.cpp --n-cpu-moe: this CPU computes some layers' experts
    cpu_moe_layers: int = 0             # MoE layers whose experts stay on `cpu`
    notes: str = ""


SETUPS: tuple[Setup, ...] = (
    Setup("llama.cpp Metal, Qwen3-30B-A3B Q8_0", "qwen3-30b-a3b", HW["m2-ultra-192gb"], "tok_s", 76.31,
          "github.com/ggml-org/llama.cpp/pull/15616 (llama-bench tg128, qwen3moe 30B.A3B Q8_0, 30.25 GiB, M2 Ultra)",
          dense_bits=Q8_0, expert_bits=Q8_0, context=64, notes="Qwen3-Coder-30B-A3B, same shapes as the config"),
    Setup("llama.cpp CPU only, Qwen3-30B-A3B Q4_K_M", "qwen3-30b-a3b", HW["i7-8700-ddr4-2666"], "tok_s", 10.6,
          "inventivehq.com/blog/moe-on-cpu-benchmark (i7-8700, no GPU, 30B-A3B 18,557 MB, 10.6 tok/s)",
          dense_bits=Q4_K_M, expert_bits=Q4_K_M),
    Setup("llama.cpp --n-cpu-moe 36, Qwen3-30B-A3B Q4_K_M", "qwen3-30b-a3b", HW["rtx2080-pcie3"], "tok_s", 36.7,
          "github.com/AlexsJones/llmfit/pull/755 (RTX 2080 8GB + i9-10900X, -ngl 99 --n-cpu-moe 36, server "
          "generation speed)", dense_bits=Q4_K_M, expert_bits=Q4_K_M,
          cpu=HW["i9-10900x-ddr4-4ch"], cpu_moe_layers=36, notes="Qwen3-30B-A3B-Instruct-2507"),
    Setup("llama.cpp --n-cpu-moe 12, gpt-oss-20b MXFP4", "gpt-oss-20b", HW["rtx2080-pcie3"], "tok_s", 36.4,
          "github.com/AlexsJones/llmfit/pull/775 (RTX 2080 8GB + i9-10900X, --n-cpu-moe 12, llmfit bench avg)",
          cpu=HW["i9-10900x-ddr4-4ch"], cpu_moe_layers=12,
          notes="bench average includes prompt processing; experts MXFP4 (4.25 bits), the rest bf16 (config)"),
    Setup("llama.cpp --n-cpu-moe 16, DeepSeek-Coder-V2-Lite Q4_K_M", "deepseek-v2-lite", HW["rtx2080-pcie3"],
          "tok_s", 49.6, "github.com/AlexsJones/llmfit/pull/778 (RTX 2080 8GB + i9-10900X, --n-cpu-moe 16, "
          "llmfit bench avg)", dense_bits=Q4_K_M, expert_bits=Q4_K_M, cpu=HW["i9-10900x-ddr4-4ch"],
          cpu_moe_layers=15, notes="same shapes as DeepSeek-V2-Lite; blocks 0-15 hold 15 MoE layers "
          "(block 0 is dense)"),
    Setup("MoE-Infinity, Mixtral-8x7B FP16", "mixtral-8x7b", HW["rtx-a5000-pcie4"], "tpot_s", 0.735, _MI,
          memory_bytes=24 * GiB, overlap=True, context=512),
    Setup("MoE-Infinity, Qwen3-30B-A3B FP16", "qwen3-30b-a3b", HW["rtx-a5000-pcie4"], "tpot_s", 0.150, _MI,
          memory_bytes=24 * GiB, overlap=True, context=512),
    Setup("MoE-Infinity, DeepSeek-V2-Lite FP16", "deepseek-v2-lite", HW["rtx-a5000-pcie4"], "tpot_s", 0.100, _MI,
          memory_bytes=24 * GiB, overlap=True, context=512, notes="DeepSeek-V2-Lite-Chat"),
    Setup("mixtral-offloading T4 (Colab), k=4 LRU", "mixtral-8x7b", HW["t4-pcie3"], "tok_s", 1.567, _MO,
          dense_bits=_MO_DENSE_BITS, expert_bits=_MO_EXPERT_BITS, cached_experts=4,
          notes="HQQ 4-bit attention, 2-bit experts; LRU cache of k experts per layer, loads stall"),
    Setup("mixtral-offloading RTX 3060, k=2 LRU", "mixtral-8x7b", HW["rtx3060-pcie3"], "tok_s", 2.051, _MO,
          dense_bits=_MO_DENSE_BITS, expert_bits=_MO_EXPERT_BITS, cached_experts=2,
          notes="HQQ 4-bit attention, 2-bit experts; LRU cache of k experts per layer, loads stall"),
)


def setup_model(s: Setup) -> ModelDesc:
    return known_model(s.model, dtype_bytes=None if s.dense_bits is None else s.dense_bits / 8,
                       expert_bits=s.expert_bits)


def _experts_only(m: ModelDesc, layers: int) -> ModelDesc:
    """`layers` MoE layers holding nothing but their routed experts (no attention, KV, router or head)."""
    return replace(m, layers=layers, moe_layers=layers, full_attn_layers=layers, attn_params=0, moe_dense_params=0,
                   mlp_params=0, embed_params=0, head_params=0, kv_values=0, attn_pair_flops=0)


def setup_offload(s: Setup, m: ModelDesc) -> Offload | None:
    if s.cached_experts is not None:
        return Offload(float(s.cached_experts), overlap=s.overlap)
    if s.memory_bytes is not None:
        return offload_for(memory_plan(m, s.memory_bytes, s.batch, s.context), m, s.overlap)
    return None


def predict_tpot(s: Setup) -> float:
    """Predicted seconds per decode step of `s` (one token per row)."""
    m = setup_model(s)
    if s.cpu is None:
        return decode_tpot(m, s.hardware, s.batch, s.context, offload=setup_offload(s, m))
    n = min(s.cpu_moe_layers, m.moe_layers)
    quiet = replace(s.hardware, layer_overhead_s=0.0, step_overhead_s=0.0)   # counted once, by the dense part
    t = decode_tpot(replace(m, expert_params=0), s.hardware, s.batch, s.context)
    if m.moe_layers - n:
        t += decode_tpot(_experts_only(m, m.moe_layers - n), quiet, s.batch, s.context)
    return t + (decode_tpot(_experts_only(m, n), s.cpu, s.batch, s.context) if n else 0.0)


def predict(s: Setup, tpot: float | None = None) -> float:
    """The predicted value of the reported metric (from `tpot`, the predicted step seconds, when given)."""
    t = predict_tpot(s) if tpot is None else tpot
    return s.batch / t if s.metric == "tok_s" else t


def compare(setups=SETUPS) -> list[dict]:
    """One row per setup: predicted, reported, unit, relative error (predicted - reported) / reported, source."""
    rows = []
    for s in setups:
        t = predict_tpot(s)
        p = predict(s, t)
        rows.append({"setup": s.name, "model": s.model, "hardware": s.hardware.name + (f" + {s.cpu.name}" if s.cpu
                     else ""), "metric": s.metric, "unit": "tok/s" if s.metric == "tok_s" else "s/token",
                     "batch": s.batch, "context": s.context, "reported": s.reported, "predicted": p,
                     "error": (p - s.reported) / s.reported, "predicted_tpot_s": t,
                     "source": s.source, "notes": s.notes,
                     "hardware_sources": list(s.hardware.sources) + (list(s.cpu.sources) if s.cpu else [])})
    return rows


def mean_abs_error(rows: list[dict]) -> float:
    return sum(abs(r["error"]) for r in rows) / len(rows) if rows else math.nan


def print_published(rows: list[dict], file=None) -> None:
    """The comparison as a table (rich)."""
    from rich.console import Console
    from rich.table import Table
    t = Table(title="published setups: predicted vs reported (issue 7)")
    for c in ("setup", "hardware", "reported", "predicted", "error", "source"):
        t.add_column(c, justify="right" if c in ("reported", "predicted", "error") else "left")
    for r in rows:
        t.add_row(r["setup"], r["hardware"], f"{r['reported']:.3g} {r['unit']}", f"{r['predicted']:.3g} {r['unit']}",
                  f"{r['error']:+.0%}", r["source"])
    con = Console(file=file or sys.stdout, width=200)
    con.print(t)
    con.print(f"mean absolute error: {mean_abs_error(rows):.0%} over {len(rows)} setups "
              "(error = (predicted - reported) / reported)")


__all__ = ["HW", "SETUPS", "Setup", "compare", "mean_abs_error", "predict", "predict_tpot",
           "print_published", "setup_model", "setup_offload"]
