"""Microbenchmarks that turn this machine into a `Hardware` profile of achieved rates (efficiencies 1.0).

- fp32 / bf16 matmul: square products of a few sizes through moespec's own `models.layers.linear` (weights
  [out, in], as the engine stores them; on CPUs without fast bf16 GEMM it runs multi-row bf16 in fp32), best
  of n, the best size's TFLOPS. (Here `torch.mm(a, b)` in bf16 reaches ~1 GFLOPS, F.linear ~7 per thread.)
- memory: a `sum` and a `copy_` of a large fp32 tensor (reported), and fp32 GEMV over a matrix of the same
  size in both storage orders (the faster is kept, as `models/layout.py` does). The profile's `mem_bw_gbs` is
  the GEMV rate: the step model divides *weight bytes streamed by matmuls* by it, which is what decode does,
  and GEMV and a plain `sum` can differ widely on CPUs. The same weight multiplied by M = 2..16 rows is also
  timed and reported (`rows_gbs`, not used by the profile): on some BLAS builds small-M GEMM costs nearly M
  GEMVs, which the step model's single bandwidth and peak cannot express.
- SSD: a temporary file written to the offload folder, read back sequentially with O_DIRECT in 4 MiB chunks
  into page-aligned buffers (buffered, page cache dropped, when the filesystem refuses O_DIRECT), plus the
  median of random 4 KiB reads as the latency of one batch of loads; the file is deleted afterwards.
- per-layer overhead: one-token forwards of the bundled reference model (float32, batch 1, KV cache of a
  short context); overhead = (median forward - the step model's max(bytes / bw, flops / peak) terms for that
  forward) / (layers + 1), since the step model charges one overhead per layer and one for the head.
"""
from __future__ import annotations

import errno
import math
import mmap
import os
import random
import socket
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import MoespecError
from ..perf.hardware import Hardware

MiB = 1024 ** 2
CHUNK = 4 * MiB


@dataclass(frozen=True)
class Knobs:
    """Sizes of each measurement; `quick` trades accuracy for a run of a few seconds."""
    fp32_sizes: tuple[int, ...] = (512, 1024, 2048)
    bf16_sizes: tuple[int, ...] = (256, 512, 1024)   # bf16 GEMM can be ~10x slower than fp32 (no AVX512-BF16)
    reps: int = 5
    mem_mib: int = 256
    ssd_mib: int = 256
    latency_reads: int = 128
    forwards: int = 60
    context: int = 32


QUICK = Knobs(fp32_sizes=(256, 512), bf16_sizes=(256,), reps=3, mem_mib=64, ssd_mib=64, latency_reads=32,
              forwards=20)


def default_output() -> Path:
    """$XDG_CACHE_HOME/moespec/hardware.json, or ~/.cache/moespec/hardware.json."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moespec" / "hardware.json"


def _best(fn, reps: int) -> float:
    fn()                                                   # warm-up: allocation, page faults, kernel choice
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_tflops(dtype: torch.dtype, sizes, reps: int) -> float:
    """Best achieved TFLOPS of an n x n x n product over `sizes`, computed as the engine computes them."""
    from ..models.layers import linear
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        best = max(best, 2 * n ** 3 / _best(lambda a=a, b=b: linear(a, b), reps) / 1e12)
    return best


def memory_gbs(mib: int, reps: int) -> dict:
    """GB/s of a sum (read), a copy (read + write, both counted) and fp32 GEMV weight streaming."""
    n = int(math.sqrt(mib * MiB / 4))
    x, y, v = torch.rand(n, n), torch.empty(n, n), torch.rand(n)
    nbytes = x.numel() * 4
    out = {"sum_gbs": nbytes / _best(lambda: x.sum(), reps) / 1e9,
           "copy_gbs": 2 * nbytes / _best(lambda: y.copy_(x), reps) / 1e9}
    rows = _best(lambda: torch.mv(x, v), reps)             # weight [out, in] row-major
    cols = _best(lambda: v @ x, reps)                      # the transposed storage order
    out["gemv_gbs"] = nbytes / min(rows, cols) / 1e9
    w = x if rows <= cols else x.t()                       # weight in the faster storage order
    out["rows_gbs"] = {}
    for m in (2, 4, 8, 16):
        a = torch.rand(m, n)
        out["rows_gbs"][m] = nbytes / _best(lambda a=a: F.linear(a, w), reps) / 1e9
    return out


@dataclass(frozen=True)
class ReadResult:
    nbytes: int
    seconds: float       # time inside the reads only
    direct: bool         # O_DIRECT was used (else buffered, page cache dropped first)

    @property
    def gbs(self) -> float:
        return self.nbytes / self.seconds / 1e9


def _open(path, direct: bool) -> tuple[int, bool]:
    if direct:
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError as e:
            if e.errno != errno.EINVAL:                    # EINVAL: this filesystem has no O_DIRECT
                raise
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)    # drop cached pages: measure the device
    return fd, False


def read_direct(path, chunk: int = CHUNK, direct: bool = True, hasher=None) -> ReadResult:
    """Read a whole file sequentially into one page-aligned buffer of `chunk` bytes (a multiple of 4 KiB),
    with O_DIRECT when the filesystem allows it; `hasher.update` sees every byte, outside the timed reads."""
    buf = mmap.mmap(-1, chunk)                             # anonymous mmap: page-aligned, as O_DIRECT needs
    fd, used = _open(path, direct)
    total, spent, off = 0, 0.0, 0
    try:
        while True:
            t = time.perf_counter()
            try:
                n = os.preadv(fd, [buf], off)
            except OSError as e:                           # O_DIRECT accepted at open but refused at read
                if not (used and e.errno == errno.EINVAL):
                    raise
                os.close(fd)
                fd, used = _open(path, False)
                continue
            spent += time.perf_counter() - t
            if n <= 0:
                break
            if hasher is not None:
                hasher.update(memoryview(buf)[:n])
            total, off = total + n, off + n
            if n < chunk:
                break
    finally:
        os.close(fd)
        buf.close()
    return ReadResult(total, spent, used)


def read_latency(path, size: int, reads: int, direct: bool = True) -> float:
    """Median seconds of one 4 KiB read at a random aligned offset (the per-batch latency of the slow tier)."""
    buf = mmap.mmap(-1, 4096)
    fd, _ = _open(path, direct)
    rng = random.Random(0)
    times = []
    try:
        for _ in range(reads):
            off = rng.randrange(size // 4096) * 4096
            t = time.perf_counter()
            os.preadv(fd, [buf], off)
            times.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        buf.close()
    return statistics.median(times)


def ssd(folder: Path, mib: int, latency_reads: int) -> dict:
    """Write a `mib` MiB temporary file in `folder`, time reading it back, delete it."""
    path = folder / f".moespec-calibrate-{os.getpid()}.bin"
    block = os.urandom(CHUNK)
    try:
        with open(path, "wb") as f:
            f.writelines(block for _ in range(max(1, mib * MiB // CHUNK)))
            f.flush()
            os.fsync(f.fileno())
        size = path.stat().st_size
        r = read_direct(path)
        lat = read_latency(path, size, latency_reads)
    except OSError as e:
        raise MoespecError(f"cannot measure the SSD in {folder}: {e.strerror or e}") from None
    finally:
        path.unlink(missing_ok=True)
    return {"read_gbs": r.gbs, "direct": r.direct, "latency_s": lat, "file_bytes": size}


def time_forwards(model, batch: int, context: int, n: int, warmup: int = 3) -> tuple[float, float]:
    """(median seconds, mean distinct experts per MoE layer) of n one-token forwards of `batch` rows over
    `context` cached random tokens; each forward gets new random tokens (varied experts) and overwrites the
    same KV slot, so the context stays fixed."""
    from ..models import ForwardPlan
    vocab = model.cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    kv = model.new_cache(batch, context + 1)
    model.forward(torch.randint(0, vocab, (batch, context), generator=g), kv)
    kv.advance(context)
    times, union = [], []
    for i, tok in enumerate(torch.randint(0, vocab, (n + warmup, batch, 1), generator=g)):
        t = time.perf_counter()
        out = model.forward(tok, kv, plan=ForwardPlan(record_routing=True))
        if i >= warmup:                                    # the first forwards warm caches and allocators
            times.append(time.perf_counter() - t)
            union.append(statistics.mean(r.unique().numel() for r in out.routing) if out.routing else 0.0)
    return statistics.median(times), statistics.mean(union)


def layer_overhead(hw: Hardware, forwards: int, context: int) -> dict:
    """Per-layer fixed cost from one-token forwards of the reference model (see the module docstring)."""
    from ..assets import REFERENCE_MODEL
    from ..models import load_model
    from ..perf.model import ModelDesc
    from ..perf.step import forward_cost
    if not (REFERENCE_MODEL / "config.json").is_file():
        raise MoespecError(f"the bundled reference model ({REFERENCE_MODEL}) is not installed")
    model = load_model(REFERENCE_MODEL, "float32")
    desc = ModelDesc.from_file(REFERENCE_MODEL, name="reference-moe", dtype_bytes=4.0)
    fwd, _ = time_forwards(model, 1, context, forwards)
    bound = forward_cost(desc, replace(hw, layer_overhead_s=0.0), 1, 1, context).time
    calls = desc.layers + 1
    return {"forward_s": fwd, "rate_bound_s": bound, "calls": calls, "overhead_s": max(0.0, (fwd - bound) / calls)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def total_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


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
    mem = memory_gbs(k.mem_mib, k.reps)
    say(f"SSD reads ({k.ssd_mib} MiB in {folder})")
    disk = ssd(folder, k.ssd_mib, k.latency_reads)
    cpu = _cpu_model()
    hw = Hardware(
        name=f"calibrated: {socket.gethostname()} ({cpu})", mem_bw_gbs=mem["gemv_gbs"], peak_fp32_tflops=fp32,
        peak_bf16_tflops=bf16, slow_bw_gbs=disk["read_gbs"], slow_latency_s=disk["latency_s"],
        layer_overhead_s=0.0, fast_mem_bytes=total_ram(), slow_kind="ssd")
    say("per-layer overhead (reference model forwards)")
    ov = layer_overhead(hw, k.forwards, k.context)
    io = "O_DIRECT" if disk["direct"] else "buffered reads (O_DIRECT refused by the filesystem; page cache dropped)"
    sources = (
        f"moespec calibrate {when}, torch {torch.__version__}, {threads} threads",
        (f"matmul: square products via models.layers.linear, best of {k.reps}, fp32 sizes "
         f"{list(k.fp32_sizes)}, bf16 sizes {list(k.bf16_sizes)}"),
        (f"memory: fp32 GEMV over {k.mem_mib} MiB, faster storage order (sum {mem['sum_gbs']:.1f} GB/s, "
         f"copy {mem['copy_gbs']:.1f} GB/s read+write; the same weight times 2/4/8/16 rows: "
         + " / ".join(f"{v:.1f}" for v in mem["rows_gbs"].values()) + " GB/s, not modelled)"),
        (f"SSD: {disk['file_bytes'] // MiB} MiB sequential read in 4 MiB chunks with {io} in {folder}; "
         f"latency = median of {k.latency_reads} random 4 KiB reads"),
        (f"layer overhead: median of {k.forwards} one-token forwards of the reference model (float32, "
         f"context {k.context}): {ov['forward_s'] * 1e3:.2f} ms, minus {ov['rate_bound_s'] * 1e3:.2f} ms of "
         f"rate-bound time, over {ov['calls']} layer calls"),
    )
    hw = replace(hw, layer_overhead_s=ov["overhead_s"], sources=sources,
                 notes=f"measured on {cpu} with {threads} torch threads; rates are achieved rates (efficiencies "
                       "1.0); valid for this thread count and a machine otherwise idle")
    return hw, {"time": when, "threads": threads, "fp32_tflops": fp32, "bf16_tflops": bf16, "memory": mem,
                "ssd": disk, "overhead": ov, "offload_dir": str(folder)}

