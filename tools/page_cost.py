"""What the web page costs the decode loop: decode tokens/s of `moespec serve` with the page open in Chromium (its engine
view polling once a second) against closed, rounds taking turns, on the same requests.

    python tools/page_cost.py [MODEL] --rounds 6 --max-tokens 1500 [--poller http] --output docs/bench/page-cost.json

--poller browser (default) opens the page in Chromium on this machine, which also spends its own CPU there; --poller
http polls /v1/engine once a second from a thread, as the page does, to isolate what the server pays.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from servers import free_port, running_server  # noqa: E402


def decode_rate(base: str, max_tokens: int) -> float:
    """One greedy completion; generated tokens over the time after the first one arrived (streamed)."""
    body = json.dumps({"prompt": "def fibonacci(n):", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                       "stream": True}).encode()
    req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
    first, n = None, 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
                n += 1
                first = first or time.perf_counter()
    return (n - 1) / (time.perf_counter() - first)


def polled(base: str, max_tokens: int) -> tuple[float, int]:
    """decode_rate while a thread fetches /v1/engine once a second (what the page does)."""
    import threading
    stop, n = threading.Event(), [0]

    def poll():
        while not stop.wait(1.0):
            urllib.request.urlopen(base + "/v1/engine", timeout=10).read()
            n[0] += 1
    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        return decode_rate(base, max_tokens), n[0]
    finally:
        stop.set()
        t.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--poller", choices=["browser", "http"], default="browser")
    p.add_argument("--output", default=None)
    a = p.parse_args()
    from playwright.sync_api import sync_playwright
    port = free_port()
    args = ([a.model] if a.model else []) + ["--dtype", a.dtype, "--port", str(port)]
    rows = []
    with running_server(args, port) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        decode_rate(base, 16)                                                   # warm-up
        for i in range(a.rounds):
            closed = decode_rate(base, a.max_tokens)
            if a.poller == "http":
                opened, polls = polled(base, a.max_tokens)
            else:
                page = browser.new_page()
                page.goto(base + "/")
                page.wait_for_function("document.getElementById('heat').dataset.resident !== undefined")
                opened = decode_rate(base, a.max_tokens)
                polls = page.evaluate("performance.getEntriesByType('resource')"
                                      ".filter(e => e.name.endsWith('/v1/engine')).length")
                page.close()
            rows.append({"closed_tok_s": closed, "open_tok_s": opened, "ratio": opened / closed, "polls": polls})
            print(rows[-1], flush=True)
        browser.close()
    ratios = sorted(r["ratio"] for r in rows)
    from moespec.bench.machine import machine
    out = {"rounds": rows, "median_ratio": ratios[len(ratios) // 2], "machine": machine(), "max_tokens": a.max_tokens,
           "model": a.model or "bundled reference model", "dtype": a.dtype, "poller": a.poller}
    print(json.dumps({"median_ratio": out["median_ratio"], "min": ratios[0], "max": ratios[-1]}))
    if a.output:
        Path(a.output).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
