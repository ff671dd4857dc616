"""`python -m moespec.bench.peer`: llama.cpp on a prompt file in a process of its own, for capped benchmarks
(bench/capped.py runs it inside a memory cgroup). Imports no torch: a llama.cpp user's process does not hold it."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moespec.bench.peer")
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--prompts-file", required=True, help="JSON list of token-id lists")
    ap.add_argument("--batch-size", type=int, nargs="+", default=[1])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--output", required=True)
    a = ap.parse_args(argv)
    from ..errors import MoespecError
    from .llamacpp import LlamaCppRunner
    from .loop import run_interleaved
    try:
        prompts = json.loads(Path(a.prompts_file).read_text())
        ctx = max(map(len, prompts)) + a.max_new_tokens + 8
        runner = LlamaCppRunner(a.gguf, a.threads, max(a.batch_size), ctx)
        runs = []
        for b in a.batch_size:
            for r in run_interleaved([runner], prompts, b, a.max_new_tokens, a.repetitions, a.warmup):
                r["test"] = f"tg{a.max_new_tokens}"
                runs.append(r)
        runner.close()
    except MoespecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .machine import peak_rss_bytes
    Path(a.output).write_text(json.dumps({"runs": runs, "peak_rss_bytes": peak_rss_bytes()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
