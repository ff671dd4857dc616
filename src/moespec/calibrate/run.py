"""`calibrate()`: every measurement of `moespec calibrate` in order, into one hardware profile (measure.py has the
microbenchmarks, costs.py the engine-level overheads built on them)."""
from __future__ import annotations

import socket
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import MoespecError
from ..perf.hardware import Hardware
from .costs import miss_overhead, overheads, spec_overhead
from .measure import MiB, Knobs, cpu_model, matmul_tflops, memory_gbs, rows_tables, ssd, total_ram


def calibrate(offload_dir: str | Path, knobs: Knobs = Knobs(), log=None) -> tuple[Hardware, dict]:
    """Measure this machine; returns the profile and every raw measurement."""
    folder = Path(offload_dir)
    if not folder.is_dir():
        raise MoespecError(f"offload folder {folder} does not exist (create it or pass --offload-dir DIR)")
    say = log or (lambda msg: None)
    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    k, threads = knobs, torch.get_num_threads()
    say("matmul throughput")
    fp32 = matmul_tflops(torch.float32, k.fp32_sizes, k.reps)
    bf16 = matmul_tflops(torch.bfloat16, k.bf16_sizes, k.reps)
    say("memory bandwidth")
    mem = memory_gbs(k.mem_mib, k.reps, k.rows)
    say("products of M rows with weights from memory")
    small = rows_tables(k.rows_sizes_mib, k.rows_pool_mib, k.rows, k.reps)
    big = {"fp32": [(mem["weight_bytes"], m, tf) for m, tf in mem["rows_fp32_tflops"].items()],
           "bf16": [(mem["weight_bytes"] // 2, m, tf) for m, tf in mem["rows_bf16_tflops"].items()]}
    tables = {key: tuple(small[key] + big[key]) for key in ("fp32", "bf16")}
    say(f"SSD reads ({k.ssd_mib} MiB in {folder})")
    disk = ssd(folder, k.ssd_mib, k.latency_reads)
    cpu = cpu_model()
    hw = Hardware(
        name=f"calibrated: {socket.gethostname()} ({cpu})", mem_bw_gbs=mem["gemv_gbs"], peak_fp32_tflops=fp32,
        peak_bf16_tflops=bf16, slow_bw_gbs=disk["read_gbs"], slow_latency_s=disk["latency_s"],
        layer_overhead_s=0.0, fast_mem_bytes=total_ram(), slow_kind="ssd",
        slow_read_gbs=tuple((int(b), g) for b, g in disk["random_read_gbs"].items()) or None,
        rows_fp32_tflops=tables["fp32"], rows_bf16_tflops=tables["bf16"])
    say("per-layer and per-step overhead (reference model forwards and generation, batch 1)")
    ov = overheads(hw, k)
    sources = _sources(when, threads, k, mem, disk, folder, ov)
    hw = replace(hw, layer_overhead_s=ov["overhead_s"], step_overhead_s=ov["step_overhead_s"])
    say("speculative step overhead (prompt lookup, k = 4, batch 1)")
    sov = spec_overhead(hw, k)
    sources += (_spec_source(sov),)
    say("expert miss costs (25% expert cache over the SSD tier, batch 1 and 8)")
    mov = miss_overhead(replace(hw, spec_step_overhead_s=sov["spec_step_overhead_s"]), k, folder)
    sources += (_miss_source(mov, folder),)
    hw = replace(hw, spec_step_overhead_s=sov["spec_step_overhead_s"], miss_overhead_s=mov["miss_overhead_s"],
                 miss_read_gbs=mov["miss_read_gbs"],
                 sources=sources,
                 notes=f"measured on {cpu} with {threads} torch threads; rates are achieved rates (efficiencies "
                       "1.0); valid for this thread count and a machine otherwise idle")
    return hw, {"time": when, "threads": threads, "fp32_tflops": fp32, "bf16_tflops": bf16, "memory": mem,
                "rows_tables": {key: [list(r) for r in t] for key, t in tables.items()},
                "ssd": disk, "overhead": ov, "spec_overhead": sov, "miss_overhead": mov, "offload_dir": str(folder)}


def _sources(when: str, threads: int, k: Knobs, mem: dict, disk: dict, folder: Path, ov: dict) -> tuple[str, ...]:
    """How each figure of the profile was measured (Hardware.sources)."""
    io = "O_DIRECT" if disk["direct"] else "buffered reads (O_DIRECT refused by the filesystem; page cache dropped)"
    return (
        f"moespec calibrate {when}, torch {torch.__version__}, {threads} threads",
        (f"matmul: square products via models.layers.linear, best of {k.reps}, fp32 sizes "
         f"{list(k.fp32_sizes)}, bf16 sizes {list(k.bf16_sizes)}"),
        (f"memory: fp32 GEMV over {k.mem_mib} MiB, faster storage order (sum {mem['sum_gbs']:.1f} GB/s, "
         f"copy {mem['copy_gbs']:.1f} GB/s read+write)"),
        (f"M-rows tables: products of M = {'/'.join(map(str, k.rows))} rows via models.layers.linear, best of "
         f"{k.reps}, with the {k.mem_mib} MiB weight and with pools of {k.rows_pool_mib} MiB of "
         f"{'/'.join(f'{v:g}' for v in k.rows_sizes_mib)} MiB matrices taken in turn (fp32; bf16 casts of them); "
         f"the {k.mem_mib} MiB fp32 weight: " + " / ".join(f"{v:.1f}" for v in mem["rows_gbs"].values())
         + " GB/s"),
        (f"SSD: {disk['file_bytes'] // MiB} MiB sequential read in 4 MiB chunks with {io} in {folder}; "
         f"latency = median of {k.latency_reads} random 4 KiB reads; single reads at random aligned offsets: "
         + ", ".join(f"{int(b) // 1024} KiB {g:.2f} GB/s" for b, g in disk["random_read_gbs"].items())),
        (f"layer overhead: median of {k.step_runs} medians of {max(3, k.forwards // k.step_runs)} one-token "
         f"forwards of the reference model (float32, batch 1, context {k.context}): {ov['forward_s'] * 1e3:.2f} "
         f"ms, minus {ov['rate_bound_s'] * 1e3:.2f} ms of rate-bound time, over {ov['calls']} layer calls"),
        (f"step overhead: median over {k.step_runs} greedy generations of {k.step_tokens} tokens at batch 1 "
         f"(median TPOT {ov['tpot_s'] * 1e3:.2f} ms) of TPOT minus the forwards timed right after it"),
    )


def _spec_source(sov: dict) -> str:
    return (f"speculative step overhead: median over {sov['runs']} prompt-lookup generations (k = 4, batch 1, "
            f"mean verify width {sov['mean_width']:.2f}) of decode time per step minus the predicted "
            f"verification forward and drafting: {sov['spec_step_overhead_s'] * 1e6:.0f} us")


def _miss_source(mov: dict, folder: Path) -> str:
    rate = f"{mov['miss_read_gbs']:.2f} GB/s" if mov["miss_read_gbs"] else "not fitted (single random reads used)"
    return ("miss costs: decoding with a 25% expert cache in " + str(folder) + ", per batch (measured step "
            "- the model's resident step) / layers against misses per layer: "
            + "; ".join(f"batch {p['batch']}: {p['misses_per_layer']:.2f} misses, {p['extra_per_layer_s'] * 1e6:.0f} us"
                        for p in mov["batches"])
            + f"; fitted wait per layer that misses {mov['miss_overhead_s'] * 1e6:.0f} us, engine read rate {rate}")
