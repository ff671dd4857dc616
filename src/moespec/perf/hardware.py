"""Hardware profiles: the rates the step model divides by, with a source for every published figure.

Published figures are peaks (datasheet numbers). What a real engine reaches is a fraction of them: the `*_eff`
fields hold that fraction (our assumption until `moespec calibrate` measures the machine; measured profiles use
1.0 because their numbers are already achieved rates). `fit.py` turns measured runs into a profile and
`Hardware.to_json` / `from_json` store it.

Two optional measured refinements (calibrated CPU profiles have them; the published GPU profiles do not, and
then the step model is max(bytes / bw, flops / peak) per layer as before):

- `rows_fp32_tflops` / `rows_bf16_tflops`: achieved TFLOPS of a product of M rows with a weight matrix of S
  bytes read from memory (not from cache), as (S, M, TFLOPS) triples over a grid of S and M. Some BLAS builds
  run a product of 2-16 rows at nearly the cost of M matrix-vector products, and a small matrix read cold
  streams at a fraction of `mem_bw` (well below a large one's rate on the development CPU); one bandwidth and
  one peak express neither. A product of M rows with P parameters in matrices of S bytes costs 2 P x c(S, M)
  seconds. For each measured S, c(M) = M / rate(M) is interpolated linearly in M between measured rows (so
  time is piecewise linear in M), scales with M below the first row, and above the last row each further row
  costs 1 / peak; between measured sizes c is interpolated linearly in log S, and outside them the nearest
  size is used. Example: the table ((2**20, 1, 0.012), (2**20, 2, 0.0105), (2**20, 4, 0.0104)) prices 3 rows
  of a 1 M-parameter fp32 weight at 2e6 x (2 / 10.5e9 + 4 / 10.4e9) / 2 = 0.575 ms, against 0.17 ms for one row.
- `step_overhead_s`: fixed seconds per forward outside the model (sampling, bookkeeping of the generation
  loop), so decode TPOT = forward + step overhead.
"""
from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

from .errors import PerfError

GiB = 1024 ** 3


@dataclass(frozen=True)
class Hardware:
    name: str
    mem_bw_gbs: float            # fast tier bandwidth, GB/s (1e9 bytes/s): GPU HBM/GDDR, or RAM for CPU / Apple
    peak_fp32_tflops: float
    peak_bf16_tflops: float      # bf16/fp16 matmul (tensor cores where present)
    slow_bw_gbs: float           # slow link: PCIe host->device, or SSD->RAM when the fast tier is RAM
    slow_latency_s: float        # fixed cost of one batch of loads over the slow link
    layer_overhead_s: float      # fixed cost per layer per forward (kernel launches, Python dispatch)
    fast_mem_bytes: int          # capacity of the fast tier
    slow_kind: str = "pcie"      # "pcie" (RAM -> GPU) or "ssd" (SSD -> RAM)
    mem_eff: float = 1.0         # reachable fraction of the peak figures above
    flops_eff: float = 1.0
    slow_eff: float = 1.0
    notes: str = ""
    sources: tuple[str, ...] = field(default_factory=tuple)
    # (matrix bytes, M rows, achieved TFLOPS) of products read from memory; None: no table
    rows_fp32_tflops: tuple[tuple[float, float, float], ...] | None = None
    rows_bf16_tflops: tuple[tuple[float, float, float], ...] | None = None
    step_overhead_s: float = 0.0  # fixed cost per forward outside the model: sampling, loop bookkeeping
    # (read bytes, GB/s) of single reads at random offsets of the slow tier (calibrated SSDs): an expert
    # miss is one such read, far slower than the sequential rate when blobs are small; None: use
    # slow_bw_gbs and slow_latency_s
    slow_read_gbs: tuple[tuple[float, float], ...] | None = None
    spec_step_overhead_s: float = 0.0  # extra fixed cost of a speculative step (drafting bookkeeping,
                                       # acceptance, KV rollback) over a plain one
    miss_overhead_s: float = 0.0  # fixed cost of each layer that waits for loads (queueing, loader thread
                                  # wake-up, slot bookkeeping), beyond the reads themselves
    # GB/s at which the engine's loader brings in missed experts, measured in decoding (several misses of
    # a layer coalesce into larger reads and overlap): overrides slow_read_gbs for expert misses; None: not
    # measured
    miss_read_gbs: float | None = None

    @property
    def mem_bw(self) -> float:
        """Reachable fast-tier bandwidth in bytes/s."""
        return self.mem_bw_gbs * 1e9 * self.mem_eff

    @property
    def slow_bw(self) -> float:
        return self.slow_bw_gbs * 1e9 * self.slow_eff

    def miss_read_s(self, nbytes: float) -> float:
        """Seconds one missed expert blob of `nbytes` adds to a layer's wait: the engine's measured miss
        rate when calibrated, else one random read (slow_read_s)."""
        if self.miss_read_gbs:
            return nbytes / (self.miss_read_gbs * 1e9 * self.slow_eff)
        return self.slow_read_s(nbytes)

    def slow_read_s(self, nbytes: float) -> float:
        """Seconds to read one blob of `nbytes` from the slow tier at a random offset (latency included):
        the random-read table interpolated in log size, else slow_latency_s + nbytes / slow_bw."""
        t = self.slow_read_gbs
        if not t:
            return self.slow_latency_s + nbytes / self.slow_bw
        pts = sorted(t)
        if nbytes <= pts[0][0] or len(pts) == 1:
            g = pts[0][1]
        elif nbytes >= pts[-1][0]:
            g = pts[-1][1]
        else:
            i = next(i for i in range(1, len(pts)) if pts[i][0] >= nbytes)
            (b0, g0), (b1, g1) = pts[i - 1], pts[i]
            f = math.log(nbytes / b0) / math.log(b1 / b0)
            g = g0 + f * (g1 - g0)
        return nbytes / (g * 1e9 * self.slow_eff)

    def peak_flops(self, dtype_bytes: float) -> float:
        """Reachable flop/s for weights of this width: fp32 for 4-byte weights, bf16/fp16 below."""
        tf = self.peak_fp32_tflops if dtype_bytes >= 4 else self.peak_bf16_tflops
        return tf * 1e12 * self.flops_eff

    def rows_table(self, dtype_bytes: float) -> tuple[tuple[float, float, float], ...] | None:
        """The measured (matrix bytes, M rows, TFLOPS) table for weights of this width (fp32 for 4-byte
        weights), or None."""
        return (self.rows_fp32_tflops if dtype_bytes >= 4 else self.rows_bf16_tflops) or None

    def matmul_time(self, params: float, rows: float, dtype_bytes: float, matrix_bytes: float | None = None
                    ) -> float:
        """Seconds of a product of `rows` rows (may be fractional: a mean) with `params` parameters held in
        matrices of `matrix_bytes` bytes each (default: one matrix of params x dtype_bytes), from the M-rows
        table: 2 x params x c(matrix_bytes, rows) (see the module docstring). Within one matrix size a
        measured row cheaper per weight pass than a smaller one (noise) is raised to it, so time never falls
        as rows grow. Without a table: 2 x params x rows / peak."""
        peak = self.peak_flops(dtype_bytes)
        table = self.rows_table(dtype_bytes)
        if rows <= 0 or params <= 0:
            return 0.0
        if table is None:
            return 2.0 * params * rows / peak
        size = params * dtype_bytes if matrix_bytes is None else matrix_bytes
        by_size: dict[float, list] = {}
        for s, m, tf in table:
            by_size.setdefault(s, []).append((m, tf))
        sizes = sorted(by_size)

        def c_at(s):                                  # seconds per parameter pair at `rows` rows, size s
            pts, c_prev = [], 0.0
            for m, tf in sorted(by_size[s]):
                c_prev = max(c_prev, m / (tf * 1e12 * self.flops_eff))
                pts.append((m, c_prev))
            m0, c0 = pts[0]
            if rows <= m0:
                return c0 * rows / m0
            if rows >= pts[-1][0]:
                return pts[-1][1] + (rows - pts[-1][0]) / peak
            for (ma, ca), (mb, cb) in zip(pts, pts[1:]):
                if rows <= mb:
                    return cb if rows == mb else ca + (cb - ca) * (rows - ma) / (mb - ma)

        if size <= sizes[0]:
            c = c_at(sizes[0])
        elif size >= sizes[-1]:
            c = c_at(sizes[-1])
        else:
            for sa, sb in zip(sizes, sizes[1:]):
                if size <= sb:
                    f = math.log(size / sa) / math.log(sb / sa)
                    c = c_at(sb) if size == sb else (1 - f) * c_at(sa) + f * c_at(sb)
                    break
        return 2.0 * params * c

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps({**asdict(self), "sources": list(self.sources)}, indent=1)   # tables: [[bytes, M, TFLOPS], ...]
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @staticmethod
    def from_json(text_or_path: str | Path) -> "Hardware":
        """From JSON text or a file holding it (as written by `to_json`, e.g. by a calibration run)."""
        s = str(text_or_path)
        if not s.lstrip().startswith("{"):
            p = Path(s)
            if not p.is_file():
                raise PerfError(f"no hardware profile file {s}")
            s = p.read_text()
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise PerfError(f"hardware profile is not valid JSON: {e}") from None
        known = {f.name for f in fields(Hardware)}
        missing = [f.name for f in fields(Hardware)
                   if f.default is MISSING and f.default_factory is MISSING and f.name not in d]
        if missing:
            raise PerfError(f"hardware profile lacks {', '.join(missing)}")
        d = {k: v for k, v in d.items() if k in known}
        d["sources"] = tuple(d.get("sources") or ())
        for k in ("rows_fp32_tflops", "rows_bf16_tflops"):
            if d.get(k) is not None:
                d[k] = _rows(d[k], k)
        if d.get("slow_read_gbs") is not None:
            d["slow_read_gbs"] = _reads(d["slow_read_gbs"])
        return Hardware(**d)

    def with_rates(self, **kw) -> "Hardware":
        return replace(self, **kw)


def _reads(table) -> tuple[tuple[float, float], ...] | None:
    """A JSON random-read table ([[read bytes, GB/s], ...]) as a tuple of pairs; an empty one means none."""
    try:
        rows = tuple((float(b), float(g)) for b, g in table)
        ok = all(0 < v < math.inf for r in rows for v in r) and len({r[0] for r in rows}) == len(rows)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise PerfError("hardware profile: slow_read_gbs must be a list of [read bytes, GB/s] pairs with positive "
                        "finite values and no repeated size")
    return rows or None


def _rows(table, key: str) -> tuple[tuple[float, float, float], ...] | None:
    """A JSON M-rows table ([[matrix bytes, M, TFLOPS], ...]) as a tuple of triples; an empty one means none."""
    def num(v):
        return v if type(v) is int else float(v)
    try:
        rows = tuple((num(s), num(m), float(tf)) for s, m, tf in table)
        ok = all(0 < float(v) < math.inf for r in rows for v in r)
    except (TypeError, ValueError):
        ok = False
    if not ok or len({r[:2] for r in rows}) != len(rows):
        raise PerfError(f"hardware profile: {key} must be a list of [matrix bytes, rows, TFLOPS] triples with "
                        "positive finite values and no repeated (bytes, rows)")
    return rows or None


_PCIE5 = "PCI-SIG PCI Express Base Specification 5.0: 32 GT/s per lane, x16 = 63 GB/s per direction"
_PCIE4 = "PCI-SIG PCI Express Base Specification 4.0: 16 GT/s per lane, x16 = 31.5 GB/s per direction"
_GPU_EFF = ("(ours) reachable fractions assumed until calibrated: 0.8 of peak memory bandwidth for weight "
            "streaming, 0.7 of tensor peak for GEMM, 0.8 of PCIe for pinned host->device copies")

PROFILES: dict[str, Hardware] = {p.name: p for p in [
    Hardware("h100-sxm-pcie5", 3350, 67, 989, 63, 10e-6, 50e-6, 80 * 10 ** 9, "pcie", 0.8, 0.7, 0.8,
             "H100 SXM5 80 GB; experts offloaded to host RAM over PCIe 5.0 x16. bf16 is the dense (non-sparse) "
             "tensor figure. Per-layer overhead and link latency are our assumption. " + _GPU_EFF,
             ("NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100): H100 SXM 3.35 TB/s "
              "HBM3, FP32 67 TFLOPS, BF16 1,979 TFLOPS with sparsity (989 dense), 80 GB", _PCIE5)),
    Hardware("a100-80gb-pcie4", 2039, 19.5, 312, 31.5, 10e-6, 50e-6, 80 * 10 ** 9, "pcie", 0.8, 0.7, 0.8,
             "A100 SXM4 80 GB (the PCIe card has 1,935 GB/s); experts offloaded to host RAM over PCIe 4.0 x16. "
             + _GPU_EFF,
             ("NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/a100): 80GB SXM 2,039 GB/s "
              "HBM2e, FP32 19.5 TFLOPS, BF16 Tensor Core 312 TFLOPS (dense)", _PCIE4)),
    Hardware("rtx4090-pcie4", 1008, 82.6, 165.2, 31.5, 10e-6, 50e-6, 24 * GiB, "pcie", 0.8, 0.7, 0.8,
             "GeForce RTX 4090 24 GB on PCIe 4.0 x16; bf16 with fp32 accumulate runs at half the fp16-accumulate "
             "rate on GeForce cards. " + _GPU_EFF,
             ("NVIDIA Ada GPU Architecture whitepaper (images.nvidia.com/aem-dam/Solutions/geforce/ada/"
              "nvidia-ada-gpu-architecture.pdf), RTX 4090: 1,008 GB/s GDDR6X, 82.6 TFLOPS FP32, 165.2 TFLOPS "
              "BF16 tensor with FP32 accumulate (dense), 24 GB", _PCIE4)),
    Hardware("m3-max-laptop", 400, 16.4, 16.4, 5.0, 100e-6, 100e-6, 64 * GiB, "ssd", 0.75, 0.6, 0.9,
             "MacBook Pro with M3 Max (16-core CPU, 40-core GPU), 64 GB unified memory (macOS lets the GPU "
             "wire about 75% of it by default); experts offloaded to the internal SSD. The GPU flops are our "
             "estimate (40 cores x 128 ALUs x 2 x ~1.6 GHz; fp16/bf16 run at the fp32 rate); the SSD figure "
             "is reviewers' sequential-read measurements, not an Apple number. M2 Max: same 400 GB/s, "
             "~13.6 TFLOPS.",
             ("Apple, MacBook Pro (M3 Max) tech specs and 'Apple unveils M3, M3 Pro, and M3 Max' (apple.com "
              "newsroom, 2023-10-30): 400 GB/s memory bandwidth for the 16-core-CPU M3 Max, up to 128 GB",
              "Disk speed reviews of 2023 MacBook Pro M3 Max 1-4 TB (Blackmagic Disk Speed Test): ~5-6 GB/s "
              "sequential read")),
    Hardware("epyc-2s-nvme", 921.6, 14.7, 29.5, 6.9, 80e-6, 50e-6, 768 * GiB, "ssd", 0.6, 0.5, 0.9,
             "2-socket AMD EPYC 9654 (2 x 96 Zen 4 cores, AVX-512 with BF16), 24 x 32 GB DDR5-4800, one PCIe "
             "4.0 NVMe drive for the expert store (RAID several drives to scale the link). Peak flops are "
             "derived: 192 cores x 2.4 GHz base x 32 fp32 flop/cycle = 14.7 TFLOPS, x2 for AVX512_BF16 dot "
             "products. mem_eff 0.6 because cross-socket NUMA traffic and GEMV kernels reach well below STREAM.",
             ("AMD EPYC 9654 product page (amd.com, 4th Gen EPYC 9004 series): 96 cores, 2.4 GHz base, 12 "
              "channels DDR5-4800, 460.8 GB/s per socket",
              "Samsung PM9A3 NVMe SSD datasheet (semiconductor.samsung.com): 6,900 MB/s sequential read, PCIe "
              "4.0 x4")),
    Hardware("this-machine", 15.0, 0.095, 0.012, 3.0, 100e-6, 200e-6, 24684096 * 1024, "ssd", 1.0, 1.0, 1.0,
             "The development VM: 2 vCPU AMD EPYC (Zen 3, AVX2, no AVX-512 / no native bf16), 23.5 GiB RAM. "
             "Measured: fp32 GEMM ~85-105 GFLOPS, bf16 GEMM only ~12 GFLOPS (converted in software), fp32 GEMV "
             "weight streaming 10-20 GB/s (15 used), a plain `sum` reads ~26 GB/s, SSD O_DIRECT ~3 GB/s. The "
             "SSD latency and the per-layer overhead are assumptions until `moespec calibrate` measures them.",
             ("measured on this machine with torch matmul/GEMV/sum microbenchmarks and O_DIRECT reads "
              "(issue 7 notes)",)),
]}


def get_profile(name_or_path: str | Path) -> Hardware:
    """A built-in profile by name, or a JSON profile file (as written by `Hardware.to_json`)."""
    s = str(name_or_path)
    if s in PROFILES:
        return PROFILES[s]
    if s.endswith(".json") or Path(s).is_file():
        return Hardware.from_json(s)
    raise PerfError(f"unknown hardware profile {s!r}; built-in profiles: {', '.join(PROFILES)} "
                    "(or a JSON file written by calibration)")
