"""`moespec bench MODEL --memory-cap LIMIT [LIMIT ...] [--read-limit RATE] [--peer llama.cpp --peer-model F ...]`.

For each cap, moespec (with `--memory` equal to the cap) and then each peer run in a process of their own inside a
fresh memory cgroup of that size (bench/cgroup.py), each after the model files were dropped from the page cache
(a cold start, as after a reboot). The prompts are fixed token ids written once, so every engine decodes the same
ones. Each run reports its decode speed, the group's peak usage (page cache included) and failcnt, the process's own
peak RSS, and whether the limit killed it.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import MoespecError
from .cgroup import Group, device_of, drop_page_cache, version
from .machine import machine

CAP_FLAGS = {"--memory-cap": "+", "--read-limit": 1, "--peer": 1, "--peer-model": "+", "--output": 1, "--memory": 1,
             "--prompts": 1, "--num-prompts": 1, "--prompt-len": 1}


def strip_flags(argv: list[str], flags: dict) -> list[str]:
    """argv without the given options and their values (1 value, or "+": every value up to the next option)."""
    out, i = [], 0
    while i < len(argv):
        name = argv[i].split("=", 1)[0]
        if name in flags:
            if "=" in argv[i]:
                i += 1
            elif flags[name] == "+":
                i += 1
                while i < len(argv) and not argv[i].startswith("--"):
                    i += 1
            else:
                i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def run_capped(a, path: Path, prompts: list[list[int]], argv: list[str]) -> dict:
    from ..perf.units import parse_size
    try:
        caps = [parse_size(c, "--memory-cap") for c in a.memory_cap]
        rate = parse_size(a.read_limit, "--read-limit") if a.read_limit else None
    except Exception as e:
        raise MoespecError(str(e)) from None
    if version() == 0:
        raise MoespecError("--memory-cap needs cgroups (v1 memory controller or v2), and none is mounted under "
                           "/sys/fs/cgroup: run on Linux as root, or in a container with a delegated cgroup")
    files = [p for p in path.iterdir() if p.suffix == ".safetensors"] + [Path(f) for f in a.peer_model or []]
    if a.offload_dir:
        files += list(Path(a.offload_dir).glob("*.experts"))
    else:
        from ..config import OffloadConfig
        files += list(OffloadConfig().resolved_dir().glob(f"{path.name}-*.experts"))
    device = device_of(files[0]) if rate else None
    work = Path(tempfile.mkdtemp(prefix="moespec-capped-"))
    (work / "prompts.json").write_text(json.dumps(prompts))
    base = strip_flags(argv, CAP_FLAGS)
    report = {"model": str(path), "memory_caps": caps, "read_limit_bps": rate, "cgroup_version": version(),
              "machine": machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "runs": []}
    engines = [("moespec", None)] + [("llama.cpp", f) for f in (a.peer_model or [])]
    for cap in caps:
        for n, (engine, gguf) in enumerate(engines):
            out = work / f"{engine}-{cap}-{n}.json"
            if engine == "moespec":
                # --expert-cache given: the cache is the user's, the cap only limits the group (e.g. to throttle
                # reads with --read-limit); else moespec plans with --memory equal to the cap
                budget = [] if any(x.split("=")[0] == "--expert-cache" for x in base) else ["--memory", str(cap)]
                cmd = [sys.executable, "-m", "moespec.cli", *base, *budget, "--prompts-file",
                       str(work / "prompts.json"), "--output", str(out)]
            else:
                cmd = [sys.executable, "-m", "moespec.bench.peer", "--gguf", gguf, "--prompts-file",
                       str(work / "prompts.json"), "--batch-size", *map(str, a.batch_size), "--max-new-tokens",
                       str(a.max_new_tokens), "--repetitions", str(a.repetitions), "--warmup", str(a.warmup),
                       "--output", str(out)] + (["--threads", str(a.threads)] if a.threads else [])
            drop_page_cache(files)
            name = f"moespec-bench-{abs(hash((str(work), cap, n))) % 10**8}"
            with Group(name, memory=cap, read_bps=rate, device=device) as g:
                t0 = time.perf_counter()
                r = subprocess.run(cmd, preexec_fn=g.join, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                cg = g.stats()
            row = {"engine": engine, "memory_cap": cap, "peer_model": gguf, "exit_code": r.returncode,
                   "killed": r.returncode < 0 or cg.get("oom_kill", 0) > 0, "cgroup": cg, "wall_s": wall}
            if r.returncode == 0 and out.is_file():
                res = json.loads(out.read_text())
                row["peak_rss_bytes"] = res.get("peak_rss_bytes")
                row["memory_plan"] = res.get("memory_plan")
                row.update({k: res[k] for k in ("dtype", "quantize", "quantize_dense") if k in res})
                row["runs"] = [x for x in res["runs"] if x["engine"] == engine]
            else:
                row["error"] = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
            report["runs"].append(row)
            _log(row)
    return report


def _log(row: dict) -> None:
    cap = f"{row['memory_cap'] / 1e9:.2f} GB"
    name = row["engine"] + (f" {Path(row['peer_model']).name}" if row["peer_model"] else "")
    if "runs" not in row:
        print(f"  cap {cap} {name:>30}: failed ({'killed by the limit' if row['killed'] else row['error']})",
              file=sys.stderr)
        return
    cg = row["cgroup"]
    for x in row["runs"]:
        tps = x["decode_tok_s"]
        if tps is None:
            continue
        print(f"  cap {cap} {name:>30} batch {x['batch']:>2}: {tps['mean']:7.1f} tok/s  TPOT "
              f"{1000 * x['tpot_s']['mean']:6.1f} ms  group peak {cg['peak_bytes'] / 1e9:.2f} GB failcnt "
              f"{cg['failcnt']}", file=sys.stderr)
