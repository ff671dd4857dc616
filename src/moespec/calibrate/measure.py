"""Microbenchmarks that turn this machine into a `Hardware` profile of achieved rates (efficiencies 1.0).

- fp32 / bf16 matmul: square products of a few sizes through moespec's own `models.layers.linear` (weights
  [out, in], as the engine stores them; on CPUs without fast bf16 GEMM it runs multi-row bf16 in fp32), best
  of n, the best size's TFLOPS. (On the development CPU a bf16 `torch.mm(a, b)` runs several times slower
  than F.linear.)
- memory: a `sum` and a `copy_` of a large fp32 tensor (reported), and fp32 GEMV over a matrix of the same
  size in both storage orders (the faster is kept, as `models/layout.py` does). The profile's `mem_bw_gbs` is
  the GEMV rate: the step model divides *weight bytes streamed by matmuls* by it, which is what decode does,
  and GEMV and a plain `sum` can differ widely on CPUs.
- M-rows tables: products of M = 1, 2, 4, ..., 64 rows through `models.layers.linear` with the same weight
  (faster storage order) and with pools of smaller square matrices (0.25 / 1 / 4 / 16 MiB by default, 128 MiB
  of each, multiplied in turn so that each comes from memory as in a decode forward, in the storage order
  whose one-row product is faster, as `models/layout.py` does), in fp32 and cast to bf16. Achieved TFLOPS by
  (matrix bytes, M) go into the profile's `rows_fp32_tflops` / `rows_bf16_tflops` (`rows_gbs` reports the
  large fp32 weight as weight bytes per second). On the development CPU a product of a few rows costs nearly
  M GEMVs and a small matrix read cold streams well below the large-weight rate, which one bandwidth and one
  peak cannot express; the step model prices each weight product by its rows and matrix size from these tables.
  Synthetic weights only: nothing here is fitted to the model that `--validate` checks.
- SSD: a temporary file written to the offload folder, read back sequentially with O_DIRECT in 4 MiB chunks
  into page-aligned buffers (buffered, page cache dropped, when the filesystem refuses O_DIRECT), plus the
  median of random 4 KiB reads as the latency of one batch of loads; the file is deleted afterwards.
- per-layer overhead: one-token forwards of the bundled reference model (float32, batch 1, KV cache of a
  short context); overhead = (median forward - the step model's rate-bound terms for that forward) /
  (layers + 1), since the step model charges one overhead per layer and one for the head.
- per-step overhead: moespec's own plain greedy decoding of the reference model at batch 1 (random-token
  prompt, context centred on the same length); overhead = median TPOT - the median bare forward above: the
  generation loop's sampling and bookkeeping per step.

Rates come from synthetic weights; the two overheads from batch-1 runs of the reference model, so `moespec
calibrate --validate` checks the resulting profile out of sample at the other batch sizes.
"""
from __future__ import annotations

import errno
import math
import mmap
import os
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MoespecError

MiB = 1024 ** 2
CHUNK = 4 * MiB


@dataclass(frozen=True)
class Knobs:
    """Sizes of each measurement; `quick` trades accuracy for a run of a few seconds."""
    fp32_sizes: tuple[int, ...] = (512, 1024, 2048)
    bf16_sizes: tuple[int, ...] = (256, 512, 1024)   # bf16 GEMM can be far slower than fp32 (no AVX512-BF16)
    reps: int = 5
    mem_mib: int = 256
    ssd_mib: int = 256
    latency_reads: int = 128
    forwards: int = 60
    context: int = 32
    rows: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    rows_sizes_mib: tuple[float, ...] = (0.25, 1, 4, 16)   # fp32 matrix sizes besides the mem_mib weight
    rows_pool_mib: int = 128     # weights multiplied in turn per size: more than the caches hold
    step_tokens: int = 32        # tokens per generation run for the per-step overhead
    step_runs: int = 5


QUICK = Knobs(fp32_sizes=(256, 512), bf16_sizes=(256,), reps=3, mem_mib=64, ssd_mib=64, latency_reads=32,
              forwards=20, step_tokens=12, step_runs=2, rows_sizes_mib=(0.25, 4), rows_pool_mib=64)


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


def memory_gbs(mib: int, reps: int, rows=(1, 2, 4, 8, 16, 32, 64)) -> dict:
    """GB/s of a sum (read), a copy (read + write, both counted) and fp32 GEMV weight streaming; the same weight
    (faster storage order) times M rows: TFLOPS by M in fp32 and bf16 (`rows_*_tflops`, the largest size of
    the M-rows tables) and, for fp32, as weight GB/s (`rows_gbs`)."""
    n = int(math.sqrt(mib * MiB / 4))
    x, y, v = torch.rand(n, n), torch.empty(n, n), torch.rand(n)
    nbytes = x.numel() * 4
    out = {"sum_gbs": nbytes / _best(lambda: x.sum(), reps) / 1e9,
           "copy_gbs": 2 * nbytes / _best(lambda: y.copy_(x), reps) / 1e9}
    rows_t = _best(lambda: torch.mv(x, v), reps)           # weight [out, in] row-major
    cols = _best(lambda: v @ x, reps)                      # the transposed storage order
    out["gemv_gbs"] = nbytes / min(rows_t, cols) / 1e9
    w = x if rows_t <= cols else x.t()                     # weight in the faster storage order
    y = None                                               # free the copy target
    out["weight_bytes"] = nbytes
    out["rows_fp32_tflops"] = rows_rates([w], rows, reps)
    out["rows_gbs"] = {m: tf * 1e12 / m / 2 * 4 / 1e9 for m, tf in out["rows_fp32_tflops"].items()}
    out["rows_bf16_tflops"] = rows_rates(faster_order([w.to(torch.bfloat16)], reps), rows, reps)
    return out


def faster_order(ws: list, reps: int) -> list:
    """The weights in the storage order (row- or column-major) whose one-row products run faster, as
    `models/layout.py` stores the engine's weights (it can differ between fp32 and bf16)."""
    from ..models.layout import as_layout
    col = ws[0].stride(0) == 1 and ws[0].shape[1] > 1
    other = [as_layout(w, not col) for w in ws]
    return other if rows_rates(other, (1,), reps)[1] > rows_rates(ws, (1,), reps)[1] else ws


def rows_rates(ws: list, rows, reps: int) -> dict:
    """{M: TFLOPS} of products of M rows with each weight of `ws` in turn (through `models.layers.linear`, as the
    engine computes them; a list larger than the caches makes every weight come from memory, as in decode)."""
    from ..models.layers import linear
    out = {}
    for m in rows:
        a = torch.rand(m, ws[0].shape[1]).to(ws[0].dtype)
        t = _best(lambda a=a: [linear(a, w) for w in ws], reps)
        out[m] = 2 * m * sum(w.numel() for w in ws) / t / 1e12
    return out


def rows_tables(sizes_mib, pool_mib: int, rows, reps: int) -> dict:
    """The M-rows tables at smaller matrix sizes: for each fp32 size, a pool of `pool_mib` MiB of square matrices
    (at least 2), multiplied in turn, in fp32 and cast to bf16, each in the storage order whose one-row product
    is faster (as `models/layout.py` stores the engine's weights). Returns {"fp32" | "bf16": [(bytes, M,
    TFLOPS)]}."""
    out = {"fp32": [], "bf16": []}
    for mib in sizes_mib:
        n = max(8, int(math.sqrt(mib * MiB / 4)))
        base = [torch.rand(n, n) for _ in range(max(2, int(pool_mib * MiB // (n * n * 4))))]
        for key, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            ws = faster_order([w.to(dtype) for w in base], reps)
            size = n * n * ws[0].element_size()
            out[key] += [(size, m, tf) for m, tf in rows_rates(ws, rows, reps).items()]
            del ws
        del base
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


def random_reads(path, size: int, block: int, reads: int, direct: bool = True) -> float:
    """GB/s of `reads` single reads of `block` bytes at random block-aligned offsets: how expert misses
    reach the SSD (one blob, or one run of adjacent blobs, per read), unlike a long sequential read."""
    buf = mmap.mmap(-1, block)
    fd, _ = _open(path, direct)
    rng = random.Random(1)
    spent = 0.0
    try:
        for _ in range(reads):
            off = rng.randrange(size // block) * block
            t = time.perf_counter()
            os.preadv(fd, [buf], off)
            spent += time.perf_counter() - t
    finally:
        os.close(fd)
        buf.close()
    return reads * block / spent / 1e9


READ_BLOCKS = (256 * 1024, 1024 * 1024, 4 * 1024 * 1024)   # random-read sizes: one expert blob is 0.1-20 MB


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
        blocks = {b: random_reads(path, size, b, max(8, min(256, 64 * MiB // b)), r.direct) for b in READ_BLOCKS
                  if b <= size}
    except OSError as e:
        raise MoespecError(f"cannot measure the SSD in {folder}: {e.strerror or e}") from None
    finally:
        path.unlink(missing_ok=True)
    return {"read_gbs": r.gbs, "direct": r.direct, "latency_s": lat, "file_bytes": size,
            "random_read_gbs": {str(b): g for b, g in blocks.items()}}


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


def cpu_model() -> str:
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
