"""Expert parallelism under a memory cap, measured as a user would see it: one process in a memory cgroup of CAP against
N expert-parallel processes (torchrun) each in a cgroup of CAP of its own, on the same model, prompts and greedy
settings, every expert over the disk tier, page cache dropped before each run (a cold start). Needs root (cgroups).

    python tools/ep_capped.py MODEL --cap 0.8GB --ranks 2 --single-memory 0.8GB --rank-cache 10 24 \\
        --output docs/bench/ep-capped.json

The single process sizes itself with --memory (moespec's planner); rank r of the expert-parallel run keeps
--rank-cache[r] experts per MoE layer (rank 0 also holds the dense weights, the others only experts). Reports decode
tokens/s, rank 0's dispatch time share, cache hit rates, each group's peak memory, and whether the outputs agree.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNNER = r'''
import json, os, sys, time
rank = int(os.environ.get("RANK", "0"))
with open(f"/sys/fs/cgroup/memory/{os.environ['EPC_GROUP']}-{rank}/cgroup.procs", "w") as f:
    f.write(str(os.getpid()))                                   # before torch: every page is charged to the group
from moespec import LLM, SamplingParams
from moespec.config import OffloadConfig
a = json.loads(os.environ["EPC_ARGS"])
n = a["ranks"] if os.environ.get("WORLD_SIZE") else None
off = OffloadConfig(expert_cache=a["rank_cache"][rank], offload="disk", offload_dir=a["offload_dir"]) if n else None
llm = LLM(a["model"], dtype=a["dtype"], offload=off, expert_parallel=n,
          memory=None if n else a["single_memory"], max_batch=a["batch"], show_progress=False)
prompts = json.loads(open(a["prompts"]).read())
params = SamplingParams(max_new_tokens=a["new_tokens"], temperature=0, ignore_eos=True)
llm.generate(prompts[:a["batch"]], SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True))  # warm-up
rows = []
for i in range(0, len(prompts), a["batch"]):
    t = time.perf_counter()
    outs = llm.generate(prompts[i:i + a["batch"]], params)
    rows.append({"s": time.perf_counter() - t, "tokens": [o.token_ids for o in outs],
                 "ttft_s": max(o.stats["ttft_s"] for o in outs)})
st = llm.expert_stats()
decode_s = sum(r["s"] - r["ttft_s"] for r in rows)
n_tok = sum(len(t) - 1 for r in rows for t in r["tokens"])
print(json.dumps({"decode_tok_s": n_tok / decode_s, "decode_s": decode_s, "tokens": [t for r in rows for t in r["tokens"]],
                  "expert_stats": {k: v for k, v in st.items() if k != "per_layer"},
                  "memory_plan": llm.memory_plan.summary() if llm.memory_plan else None}))
llm.close()
'''


def parse_size(s: str) -> int:
    from moespec.perf.units import parse_size as parse
    return parse(s, "--cap")


def run(args: argparse.Namespace) -> dict:
    from moespec.bench.cgroup import Group, drop_page_cache
    work = Path(tempfile.mkdtemp(prefix="ep-capped-"))
    runner = work / "runner.py"
    runner.write_text(RUNNER)
    import random
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 8000) for _ in range(args.prompt_len)] for _ in range(args.num_prompts)]
    (work / "prompts.json").write_text(json.dumps(prompts))
    a = {"model": args.model, "dtype": args.dtype, "ranks": args.ranks, "rank_cache": args.rank_cache,
         "offload_dir": str(work / "offload"), "single_memory": args.single_memory, "batch": args.batch,
         "prompts": str(work / "prompts.json"), "new_tokens": args.max_new_tokens}
    files = sorted(Path(args.model).glob("*.safetensors"))
    out = {"model": args.model, "cap": args.cap, "args": a}
    for name, n in (("single", 1), ("expert_parallel", args.ranks)):
        group = f"epc-{os.getpid()}-{name}"
        groups = [Group(f"{group}-{r}", memory=parse_size(args.cap)).__enter__() for r in range(n)]
        try:
            drop_page_cache(files + sorted((work / "offload").glob("*.experts")))
            env = {**os.environ, "EPC_ARGS": json.dumps(a), "EPC_GROUP": group, "OMP_NUM_THREADS": str(args.threads)}
            cmd = [sys.executable, str(runner)] if n == 1 else \
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), str(runner)]
            t = time.perf_counter()
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            row = {"exit_code": r.returncode, "wall_s": time.perf_counter() - t,
                   "cgroups": [g.stats() for g in groups]}
            if r.returncode == 0:
                row.update(json.loads(r.stdout.strip().splitlines()[-1]))
            else:
                row["stderr"] = r.stderr[-2000:]
            out[name] = row
        finally:
            for g in groups:
                g.__exit__()
    s, e = out["single"], out["expert_parallel"]
    if "decode_tok_s" in s and "decode_tok_s" in e:
        out["speedup"] = e["decode_tok_s"] / s["decode_tok_s"]
        out["dispatch_share"] = e["expert_stats"]["dispatch_s"] / e["decode_s"]
        out["same_tokens"] = s["tokens"] == e["tokens"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--cap", default="0.8GB")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--single-memory", default="0.8GB", help="--memory of the single process (its planner)")
    p.add_argument("--rank-cache", type=int, nargs="+", required=True, help="experts per layer each rank caches")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--output", default=None)
    args = p.parse_args()
    if len(args.rank_cache) != args.ranks:
        p.error("--rank-cache needs one value per rank")
    from moespec.bench.machine import machine
    out = {**run(args), "machine": machine()}
    text = json.dumps(out, indent=1)
    if args.output:
        Path(args.output).write_text(text)
    print(json.dumps({k: out.get(k) for k in ("speedup", "dispatch_share", "same_tokens")}))
    for name in ("single", "expert_parallel"):
        r = out[name]
        print(name, {k: r.get(k) for k in ("exit_code", "decode_tok_s", "wall_s")},
              {k: r.get("expert_stats", {}).get(k) for k in ("hit_rate", "misses", "capacity", "dispatch_s")},
              [c.get("peak_bytes") for c in r["cgroups"]], r.get("stderr", "")[-500:])


if __name__ == "__main__":
    main()
