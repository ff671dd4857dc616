"""A load run against `moespec serve`, as many careless clients would make it: USERS threads for DURATION seconds,
each request picked at random among
  streaming greedy completions (45%), non-streaming ones (35%), streams the client drops after two chunks (10%),
  requests the client abandons after 0.2 s (5%) and bad requests (5%, must be a 400).
Every completed greedy reply must equal the same request run alone (asked one at a time first, which is also the
warm-up); one that does not is mixed up if it is closer to another request's reply than to its own. Reports: replies
by status, 5xx (must be 0), lost or mixed-up replies (must be 0), p50/p99 TTFT of the streams, output tokens/s, the
server's RSS after warm-up and at the end, /health after.

    python tools/load_serve.py [--users 64] [--duration 600] [--server-args "--dtype float32 ..."] [--output docs/bench/load-serve.json]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time

from moespec.bench.machine import machine
from moespec.bench.workloads import humaneval_prompts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def post(port: int, body: dict, timeout: float = 120.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    return c, c.getresponse()


def complete(port: int, prompt: str, n: int) -> tuple[int, str]:
    c, r = post(port, {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True})
    body = json.loads(r.read())
    c.close()
    return r.status, (body["choices"][0]["text"] if r.status == 200 else json.dumps(body))


def stream(port: int, prompt: str, n: int, drop_after: int | None = None) -> tuple[int, str, float | None]:
    t0 = time.perf_counter()
    c, r = post(port, {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True})
    if r.status != 200:
        r.read()
        c.close()
        return r.status, "", None
    text, ttft, chunks = [], None, 0
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            break
        ev = json.loads(data)
        if "error" in ev:
            c.close()
            return ev["error"].get("code", 500), "", ttft
        piece = ev["choices"][0]["text"] if ev["choices"] else ""
        if piece and ttft is None:
            ttft = time.perf_counter() - t0
        text.append(piece)
        chunks += 1
        if drop_after is not None and chunks >= drop_after:
            c.close()                                   # the client goes away mid-stream
            return -1, "", ttft
    c.close()
    return 200, "".join(text), ttft


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--duration", type=float, default=600)
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--server-args", default="--max-num-seqs 16 --max-waiting 128 --request-timeout 60")
    p.add_argument("--output", default=None)
    a = p.parse_args()
    port = free_port()
    srv = subprocess.Popen([sys.executable, "-m", "moespec.cli", "serve", "--port", str(port), "--log-level",
                            "warning", *a.server_args.split()], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(120):
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        rng = random.Random(0)
        cases = [(pr[-300:], rng.choice([8, 16, 32])) for pr in humaneval_prompts()[:a.prompts]]
        ref = {}
        for pr, n in cases:                                 # each request alone: the reference, and the warm-up
            status, text = complete(port, pr, n)
            assert status == 200, text
            ref[(pr, n)] = text
        fresh = lambda: {"status": {}, "mismatch": 0, "mixed": 0, "diverged_at": [], "ttft": [], "tokens": 0,  # noqa: E731
                         "errors": []}
        stats = fresh()
        mu = threading.Lock()
        stop = 0.0

        def note(key, n_tokens=0, ttft=None):
            with mu:
                stats["status"][str(key)] = stats["status"].get(str(key), 0) + 1
                stats["tokens"] += n_tokens
                if ttft is not None:
                    stats["ttft"].append(ttft)

        def check(pr: str, n: int, text: str) -> None:
            """A reply that differs from its request run alone is mixed up when it is closer (a longer common prefix)
            to another request's reply; else it diverged from its own (a near-tie decided differently in bf16)."""
            own = ref[(pr, n)]
            if text == own:
                return
            common = len(os.path.commonprefix([text, own]))
            mixed = any(len(os.path.commonprefix([text, other])) > common for key, other in ref.items()
                        if key != (pr, n))
            with mu:
                stats["mismatch"] += 1
                stats["mixed"] += mixed
                stats["diverged_at"].append(common / max(len(own), 1))

        def user(seed: int) -> None:
            r = random.Random(seed)
            while time.monotonic() < stop:
                pr, n = r.choice(cases)
                roll = r.random()
                try:
                    if roll < 0.45:
                        status, text, ttft = stream(port, pr, n)
                        note(status, n if status == 200 else 0, ttft)
                        if status == 200:
                            check(pr, n, text)
                    elif roll < 0.80:
                        status, text = complete(port, pr, n)
                        note(status, n if status == 200 else 0)
                        if status == 200:
                            check(pr, n, text)
                    elif roll < 0.90:
                        status, _, _ = stream(port, pr, n, drop_after=2)
                        note("dropped" if status == -1 else status)
                    elif roll < 0.95:
                        try:
                            c, _ = post(port, {"prompt": pr, "max_tokens": 64, "ignore_eos": True}, timeout=0.2)
                            c.close()
                            note("abandoned-late")
                        except (TimeoutError, socket.timeout):
                            note("abandoned")
                    else:
                        bad = r.choice([{"temperature": -1}, {"top_p": 7}, {"n": 999}, {"max_tokens": 0},
                                        {"stop": ["x"] * 100}])
                        c, resp = post(port, {"prompt": pr, **bad})
                        resp.read()
                        c.close()
                        note(f"bad-{resp.status}")
                except Exception as e:                      # a transport failure is a lost reply
                    note("lost")
                    with mu:
                        stats["errors"].append(f"{type(e).__name__}: {e}"[:200])
        def run(seconds: float, seed: int) -> float:
            nonlocal stop
            stop = time.monotonic() + seconds
            t0 = time.perf_counter()
            threads = [threading.Thread(target=user, args=(seed + i,)) for i in range(a.users)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return time.perf_counter() - t0
        # Warm-up under the same load (batches of every size, so the allocator has seen them), then measure.
        run(min(60.0, a.duration / 5), 10_000)
        warm = {k: v for k, v in stats.items()}
        stats.update(fresh())
        rss_warm = rss(srv.pid)
        wall = run(a.duration, 0)
        rss_end = rss(srv.pid)
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", "/health")
        health = c.getresponse().status
        tt = sorted(stats["ttft"])
        report = {"machine": machine(), "users": a.users, "duration_s": wall, "server_args": a.server_args,
                  "replies": stats["status"], "mismatched_replies": stats["mismatch"],
                  # of those, replies closer to another request's than to their own (must be 0), and where the
                  # others left their own reply (fraction of its text in common)
                  "mixed_up_replies": stats["mixed"],
                  "diverged_at_fraction": sorted(round(f, 2) for f in stats["diverged_at"])[:50],
                  "server_errors_5xx": sum(v for k, v in stats["status"].items() if k[:1] == "5" or k[:5] == "bad-5"),
                  "lost": stats["status"].get("lost", 0), "transport_errors": stats["errors"][:10],
                  "output_tokens_per_s": stats["tokens"] / wall,
                  "ttft_p50_s": statistics.median(tt) if tt else None,
                  "ttft_p99_s": tt[int(0.99 * (len(tt) - 1))] if tt else None,
                  "rss_after_warmup_bytes": rss_warm, "rss_end_bytes": rss_end,
                  "rss_growth": rss_end / rss_warm - 1 if rss_warm else None, "health_after": health,
                  "warmup": {"replies": warm["status"], "mismatched_replies": warm["mismatch"]}}
        text = json.dumps(report, indent=1)
        print(text)
        if a.output:
            open(a.output, "w").write(text)
    finally:
        srv.terminate()
        try:
            srv.wait(30)
        except subprocess.TimeoutExpired:
            srv.kill()


if __name__ == "__main__":
    main()
