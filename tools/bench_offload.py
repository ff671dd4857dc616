"""The expert-offloading sweep: cache size x policy x prefetch on the SSD tier, batch 1 and 8, each
configuration in its own `moespec bench` process (so peak RSS is its own), plus the raw sequential
O_DIRECT read bandwidth of the packed expert file (the physical limit the loader is compared with).

    python tools/bench_offload.py --output docs/bench/offload-sweep-ref.json --markdown docs/bench/offload-sweep-ref.md
    python tools/bench_offload.py --synthetic large --caches 25% --batch-size 1 --prompts random ...

Rows: TPOT, decode tokens/s, expert hit rate, bytes read per token, stall share of decode time, the
loader's achieved read bandwidth, peak RSS. "on-demand" is a cache of top-k slots per layer: every
expert a token needs that the previous token did not use is read again.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def raw_direct_read_gbs(path: Path, chunk: int = 8 << 20, limit: int = 1 << 30) -> float:
    """Sequential O_DIRECT read of the file (up to `limit` bytes) in `chunk`-byte reads: GB/s."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    buf = mmap.mmap(-1, chunk)                 # anonymous maps are page-aligned, as O_DIRECT needs
    try:
        size = min(os.fstat(fd).st_size // chunk * chunk, limit)
        t, done = time.perf_counter(), 0
        while done < size:
            n = os.preadv(fd, [buf], done)
            if n <= 0:
                break
            done += n
        return done / (time.perf_counter() - t) / 1e9
    finally:
        os.close(fd)
        buf.close()


def bench(model: list[str], extra: list[str], common: list[str], out: Path, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "moespec.cli", "bench", *model, *common, *extra, "--output", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"bench failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--synthetic", default=None, help="a `moespec bench --synthetic` preset instead of MODEL")
    ap.add_argument("--caches", default="50%,25%,12.5%")
    ap.add_argument("--modes", default="lru,lfu,next-layer")
    ap.add_argument("--batch-size", default="1,8")
    ap.add_argument("--prompts", default="humaneval")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repetitions", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--offload-dir", default=str(Path(tempfile.gettempdir()) / "moespec-sweep-experts"))
    ap.add_argument("--output", default=None)
    ap.add_argument("--markdown", default=None)
    a = ap.parse_args()

    model = ["--synthetic", a.synthetic] if a.synthetic else ([a.model] if a.model else [])
    common = ["--dtype", a.dtype, "--prompts", a.prompts, "--num-prompts", str(a.num_prompts),
              "--prompt-len", str(a.prompt_len), "--max-new-tokens", str(a.max_new_tokens),
              "--batch-size", *a.batch_size.split(","), "--repetitions", str(a.repetitions), "--warmup", "1",
              "--prefill-len", "0"]
    disk = ["--offload", "disk", "--offload-dir", a.offload_dir]
    configs = {"resident": []}
    configs["on-demand"] = [*disk, "--expert-cache", "TOPK"]
    for c in a.caches.split(","):
        for m in a.modes.split(","):
            pol, pre = ("lru", "next-layer") if m == "next-layer" else (m, "none")
            configs[f"{c} {m}"] = [*disk, "--expert-cache", c, "--expert-policy", pol, "--prefetch", pre]
    tmp = Path(tempfile.mkdtemp(prefix="moespec-sweep-"))
    rows, raw = {}, None
    for name, extra in configs.items():
        if "TOPK" in extra:                   # the model's top-k, read from the resident run's report
            cfg = json.loads((Path(rows["resident"]["model"]) / "config.json").read_text())
            k = cfg.get("num_experts_per_tok", 2)
            extra = [x if x != "TOPK" else str(k) for x in extra]
        rep = bench(model, extra, common, tmp / f"{len(rows)}.json", a.threads)
        rows[name] = rep
        if raw is None and "experts" in rep and rep["experts"].get("pack_file"):
            raw = raw_direct_read_gbs(Path(rep["experts"]["pack_file"]))
        print(f"{name}: " + ", ".join(f"b{r['batch']} {1e3 * r['tpot_s']['mean']:.1f} ms" for r in rep["runs"]),
              file=sys.stderr, flush=True)
    table = summarize(rows, raw)
    if a.output:
        Path(a.output).write_text(json.dumps({"settings": vars(a), "raw_direct_read_gbs": raw, "rows": table},
                                             indent=1) + "\n")
    md = markdown(table, raw)
    if a.markdown:
        Path(a.markdown).write_text(md)
    print(md)


def summarize(rows: dict, raw: float | None) -> list[dict]:
    out = []
    res = rows["resident"]
    for name, rep in rows.items():
        for r in rep["runs"]:
            e = r.get("experts", {})
            base = next(x for x in res["runs"] if x["batch"] == r["batch"])
            out.append({"config": name, "batch": r["batch"], "tpot_ms": 1e3 * r["tpot_s"]["mean"],
                        "tpot_std_ms": 1e3 * r["tpot_s"]["std"], "tok_s": r["decode_tok_s"]["mean"],
                        "vs_resident": base["tpot_s"]["mean"] / r["tpot_s"]["mean"],
                        "hit_rate": e.get("hit_rate"), "bytes_read_per_token": e.get("bytes_read_per_token"),
                        "stall_share": e.get("stall_share"), "loader_read_gbs": e.get("loader_read_gbs"),
                        "loader_vs_raw": (e["loader_read_gbs"] / raw) if raw and e.get("loader_read_gbs") else None,
                        "capacity": e.get("capacity"), "peak_rss_mib": rep["peak_rss_bytes"] / 2**20,
                        "expert_bytes_total": (rep["experts"]["expert_bytes"] * rep["experts"]["num_experts"]
                                               * len(rep["experts"]["per_layer"])) if "experts" in rep else None})
    return out


def markdown(table: list[dict], raw: float | None) -> str:
    def f(x, spec):
        return "-" if x is None else format(x, spec)
    lines = [f"Raw sequential O_DIRECT read of the packed expert file: {f(raw, '.2f')} GB/s", "",
             "| config | batch | slots | TPOT ms | tok/s | vs resident | hit rate | MB read/token | stall share |"
             " loader GB/s (vs raw) | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        mb = None if r["bytes_read_per_token"] is None else r["bytes_read_per_token"] / 1e6
        lv = f"{f(r['loader_read_gbs'], '.2f')} ({f(r['loader_vs_raw'], '.0%')})"
        lines.append(f"| {r['config']} | {r['batch']} | {f(r['capacity'], 'd')} | {r['tpot_ms']:.2f} ± "
                     f"{r['tpot_std_ms']:.2f} | {r['tok_s']:.1f} | {r['vs_resident']:.2f}x | {f(r['hit_rate'], '.3f')} | "
                     f"{f(mb, '.2f')} | {f(r['stall_share'], '.0%')} | {lv} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
