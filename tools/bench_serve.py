"""Serving benchmark in the spirit of `vllm bench serve`: start `moespec serve`, send requests from real prompts
at a fixed concurrency over HTTP (streaming), and report request throughput, output tokens/s, TTFT, TPOT and
ITL (mean and p50/p90), for each server setting given, one after the other on the same prompts.

    python tools/bench_serve.py --num-prompts 32 --max-tokens 128 --concurrency 1 4 16 \\
        --setting "--max-num-seqs 1" --setting "--max-num-seqs 16" --output docs/bench/serve.json

`--max-num-seqs 1` is a server that decodes one request at a time; 16 batches up to 16 continuously.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

from moespec.bench.workloads import humaneval_prompts, prose_prompts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_request(base: str, prompt: str, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    times, usage = [], None
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
    end = time.perf_counter()
    n = usage["completion_tokens"]
    return {"ttft": times[0] - t0, "e2e": end - t0, "tokens": n,
            "tpot": (times[-1] - times[0]) / (n - 1) if n > 1 else 0.0,
            "itl": [b - a for a, b in zip(times, times[1:])]}


def run_load(base: str, prompts: list[str], max_tokens: int, concurrency: int) -> dict:
    todo, results, lock = list(prompts), [], threading.Lock()

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                p = todo.pop(0)
            r = one_request(base, p, max_tokens)
            with lock:
                results.append(r)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0

    def stats(xs):
        xs = sorted(xs)
        return {"mean_ms": 1000 * statistics.fmean(xs), "p50_ms": 1000 * xs[len(xs) // 2],
                "p90_ms": 1000 * xs[min(len(xs) - 1, int(0.9 * len(xs)))]}
    return {"concurrency": concurrency, "requests": len(results), "wall_s": wall,
            "request_per_s": len(results) / wall, "output_tok_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft": stats([r["ttft"] for r in results]), "tpot": stats([r["tpot"] for r in results]),
            "itl": stats([x for r in results for x in r["itl"]]), "e2e": stats([r["e2e"] for r in results])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--prompts", choices=["humaneval", "prose"], default="humaneval")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--setting", action="append", default=None,
                    help="extra `moespec serve` flags of one server setting (repeatable; default: none)")
    ap.add_argument("--output", default=None)
    a = ap.parse_args()
    prompts = humaneval_prompts()[:a.num_prompts] if a.prompts == "humaneval" else prose_prompts(a.num_prompts)
    report = {"model": a.model or "bundled reference", "prompts": a.prompts, "num_prompts": len(prompts),
              "max_tokens": a.max_tokens, "greedy": True, "runs": []}
    for setting in a.setting or [""]:
        port = free_port()
        cmd = [sys.executable, "-m", "moespec.cli", "serve", *([a.model] if a.model else []), "--port", str(port),
               "--log-level", "warning", *shlex.split(setting)]
        server = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, env=dict(os.environ))
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    urllib.request.urlopen(base + "/health", timeout=1)
                    break
                except OSError:
                    if server.poll() is not None:
                        sys.exit(f"moespec serve {setting} exited with code {server.returncode}")
                    time.sleep(0.1)
            one_request(base, prompts[0], 8)                        # warm-up
            for c in a.concurrency:
                r = run_load(base, prompts, a.max_tokens, c)
                r["setting"] = setting
                report["runs"].append(r)
                print(f"[{setting or 'default'}] concurrency {c:3d}: {r['request_per_s']:.2f} req/s, "
                      f"{r['output_tok_per_s']:.1f} tok/s, TTFT {r['ttft']['mean_ms']:.0f} ms (p90 "
                      f"{r['ttft']['p90_ms']:.0f}), TPOT {r['tpot']['mean_ms']:.1f} ms, ITL p90 {r['itl']['p90_ms']:.1f} ms",
                      flush=True)
        finally:
            server.terminate()
            server.wait(timeout=60)
    if a.output:
        with open(a.output, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
