"""`moespec bench`: prefill (TTFT) and decode (TPOT, tokens/s) over a prompt set, optionally side by side
with transformers' `generate` on the same checkpoint, plus the cost curve of one forward over n tokens."""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

from ..errors import MoespecError
from .machine import machine, peak_rss_bytes


def add_bench_parser(sub, model_args, offload_args, spec_args) -> None:
    b = sub.add_parser("bench", help="time prefill and decode; compare with transformers")
    model_args(b)
    offload_args(b)
    spec_args(b)
    b.add_argument("--synthetic", choices=["small", "large"], default=None,
                   help="benchmark a random Mixtral of this preset (written once under --synthetic-dir)")
    b.add_argument("--synthetic-dir", default=str(Path.home() / ".cache" / "moespec" / "synthetic"))
    b.add_argument("--synthetic-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="dtype the synthetic checkpoint is written in (default bfloat16, as checkpoints ship)")
    b.add_argument("--prompts", default="random", help="prompt set: random (token ids), humaneval (code) or prose (installed packages' descriptions)")
    b.add_argument("--num-prompts", type=int, default=16)
    b.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt (real prompts are cut to it)")
    b.add_argument("--max-new-tokens", type=int, default=128)
    b.add_argument("--batch-size", type=int, nargs="+", default=[1])
    b.add_argument("--repetitions", type=int, default=3)
    b.add_argument("--warmup", type=int, default=1)
    b.add_argument("--prefill-len", type=int, default=512, help="prompt length of the prefill test (0 = skip)")
    b.add_argument("--peer", choices=["none", "transformers", "llama.cpp"], default="none",
                   help="run a peer engine on the same prompts, greedy, side by side: transformers' generate on the "
                        "same checkpoint, or llama.cpp (llama-cpp-python) on --peer-model")
    b.add_argument("--peer-model", nargs="+", default=None, metavar="GGUF",
                   help="llama.cpp: the GGUF file(s) of the same checkpoint (tools/make_gguf.py makes bf16, q8_0, "
                        "q4_0); each is run in turn beside moespec")
    b.add_argument("--threads", type=int, default=None,
                   help="threads for moespec and the peer (default: torch's, i.e. the cores)")
    b.add_argument("--curve", action="store_true", help="also time one forward over n = 1..9, 16, 32, 64 tokens (verification of k = n - 1 drafts)")
    b.add_argument("--output", default=None, help="write the JSON report here")
    b.add_argument("--memory-cap", nargs="+", default=None, metavar="LIMIT",
                   help="run moespec (with --memory LIMIT, unless --expert-cache sizes the cache) and each peer in a "
                        "fresh memory cgroup of each size, from a cold page cache, and report peak usage and failcnt "
                        "(Linux, root or a delegated cgroup)")
    b.add_argument("--read-limit", default=None, metavar="RATE",
                   help="with --memory-cap: throttle reads from the model's disk to RATE bytes/s (e.g. 200MB), "
                        "O_DIRECT included, to emulate a slower tier")
    b.add_argument("--prompts-file", default=None, help="a JSON list of token-id lists to use as the prompts")
    b.add_argument("--variant", action="append", default=None, metavar="NAME=FLAGS",
                   help="compare settings side by side in one run: each variant is this command's flags plus FLAGS "
                        "(repeat it; e.g. --variant plain= --variant 'shadow=--spec self --draft-experts shadow-int4'); "
                        "the variants take turns on the same batches, each reports its ratio to the first and whether "
                        "its tokens are identical")
    b.set_defaults(bench_parser=b)


def run_bench(a) -> None:
    import torch

    from .workloads import load_prompts

    path = _model_path(a)
    _check_flags(a)
    if a.memory_cap:
        from ..config import ModelConfig
        from ..tokenizer import Tokenizer
        from .capped import run_capped
        tok = Tokenizer.from_folder(path) if (path / "tokenizer.json").is_file() else None
        prompts = load_prompts(a.prompts, a.num_prompts, a.prompt_len, ModelConfig.from_folder(path).vocab_size, tok)
        return _emit(a, run_capped(a, path, prompts, sys.argv[1:] if a.argv is None else a.argv))
    prompts_file = None
    if a.prompts_file:
        prompts_file = json.loads(Path(a.prompts_file).read_text())
        a.prompt_len = max(map(len, prompts_file))
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    from .variants import parse_variants, read_throttle
    t0 = time.perf_counter()
    variants = [(name, _build(a, path, ns)) for name, ns in parse_variants(a)] if a.variant else \
        [(None, _build(a, path, a))]
    llm = variants[0][1]
    load_s = time.perf_counter() - t0
    load_rss = peak_rss_bytes()           # before any peer is loaded: what loading moespec took
    throttle = read_throttle(a, [v.offload for _, v in variants])
    prompts = prompts_file or load_prompts(a.prompts, a.num_prompts, a.prompt_len, llm.config.vocab_size,
                                           llm.tokenizer)
    report = _report_head(a, path, variants, load_s, load_rss)
    if throttle is not None:
        report["read_limit_bps"] = throttle.read_bps
    jobs = [("tg", b, prompts, a.max_new_tokens) for b in a.batch_size]
    if a.prefill_len:
        jobs.append(("pp", 1, load_prompts("random", 4, a.prefill_len, llm.config.vocab_size, None), 1))
    peers = _peers(a, path, llm)
    try:
        for job in jobs:
            report["runs"].extend(_run_job(a, variants, peers, job))
    finally:
        if throttle is not None:
            throttle.leave()
            throttle.__exit__()
    if a.curve:
        from .runners import forward_curve
        report["forward_curve"] = forward_curve(llm.model)
        for row in report["forward_curve"]:
            print(f"  forward n={row['n']:>2}: {row['ms']:7.2f} ms ({row['x_one_token']:.2f}x), distinct experts "
                  f"per layer {row['distinct_experts_per_layer']}", file=sys.stderr)
    if llm.offload is not None:
        report["experts"] = llm.expert_stats()
    report["peak_rss_bytes"] = peak_rss_bytes()
    _emit(a, report)


def _report_head(a, path: Path, variants: list, load_s: float, load_rss: int) -> dict:
    """What the report says before any run: the model, its settings (each variant's), the machine, the load."""
    llm = variants[0][1]
    report = {"model": str(path), "dtype": llm.dtype, "quantize": llm.quant.tag if llm.quant else "none",
              "quantize_dense": bool(llm.quant and llm.quant.dense),
              "memory_plan": llm.memory_plan.describe() if llm.memory_plan is not None else None,
              "prompts": a.prompts, "prompt_len": a.prompt_len,
              "max_new_tokens": a.max_new_tokens, "repetitions": a.repetitions, "warmup": a.warmup,
              "machine": machine(), "load_s": load_s, "load_peak_rss_bytes": load_rss,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "runs": []}
    if a.variant:
        flags = dict(x.split("=", 1) for x in a.variant)        # parse_variants checked the NAME=FLAGS form
        report["variants"] = {name: {"flags": flags[name], "quantize": v.quant.tag if v.quant else "none",
                                     "speculative": v.spec.__dict__ if v.spec else None,
                                     "offload": v.offload.__dict__ if v.offload else None}
                              for name, v in variants}
    return report


def _model_path(a) -> Path:
    if not a.synthetic:
        from ..assets import resolve_model
        return resolve_model(a.model)
    import torch

    from .synthetic import make_synthetic
    return make_synthetic(Path(a.synthetic_dir) / f"{a.synthetic}-{a.synthetic_dtype}", a.synthetic,
                          dtype=getattr(torch, a.synthetic_dtype))


def _check_flags(a) -> None:
    """Combinations of bench flags that cannot work, refused before anything loads."""
    for name in ("repetitions", "num_prompts", "max_new_tokens"):
        if getattr(a, name) < 1:
            raise MoespecError(f"--{name.replace('_', '-')} must be at least 1")
    if a.memory_cap and a.variant:
        raise MoespecError("--variant compares settings in one process; --memory-cap runs each in its own: use one")
    if a.memory_cap and a.peer == "transformers":
        raise MoespecError("--memory-cap compares with --peer llama.cpp (transformers has no memory budget)")
    if a.peer == "llama.cpp" and not a.peer_model:
        raise MoespecError("--peer llama.cpp needs --peer-model FILE.gguf (tools/make_gguf.py makes them)")
    if a.peer_model and a.peer != "llama.cpp" and not a.memory_cap:
        raise MoespecError("--peer-model is the GGUF file of --peer llama.cpp")
    if a.threads is not None and a.threads < 1:
        raise MoespecError(f"--threads {a.threads} is out of range (at least 1)")


def _build(a, path: Path, ns):
    """The LLM of one variant (ns: its flags)."""
    from ..engine import LLM
    from ..flags import offload_config, quant_config, spec_config
    llm = LLM(path, dtype=ns.dtype, offload=offload_config(ns), speculative=spec_config(ns),
              quantize=quant_config(ns), show_progress=False, memory=ns.memory, max_batch=max(a.batch_size),
              max_model_len=(max(a.prompt_len, a.prefill_len) + a.max_new_tokens + 16) if ns.memory else None,
              expert_parallel=getattr(ns, "expert_parallel", None))
    if llm.memory_plan is not None:
        print(llm.memory_plan.summary(), file=sys.stderr)
    return llm


def _peers(a, path: Path, llm) -> list:
    import torch

    from .runners import TransformersRunner
    if a.peer == "transformers":
        return [TransformersRunner(path, llm.model.dtype)]
    if a.peer == "llama.cpp":
        from .llamacpp import LlamaCppRunner
        ctx = max(a.prompt_len, a.prefill_len) + a.max_new_tokens + 8
        return [LlamaCppRunner(f, torch.get_num_threads(), max(a.batch_size), ctx) for f in a.peer_model]
    return []


def _run_job(a, variants: list, peers: list, job: tuple) -> list[dict]:
    """One test (kind "tg" or "pp", batch, prompts, new tokens) over every variant and peer, taking turns; each
    variant compared with the first, the first with each peer."""
    from .loop import run_interleaved
    from .runners import MoespecRunner
    kind, batch, ps, new = job
    before: list[dict] = [{} for _ in variants]

    def snap():
        for b, (_, v) in zip(before, variants):
            if v.offload is not None:
                b.update(v.expert_stats())
    runners = [MoespecRunner(v) for _, v in variants]
    results = run_interleaved([*runners, *peers], ps, batch, new, a.repetitions, a.warmup, snap)
    for r, b, (name, v) in zip(results, before, variants):
        if b:
            r["experts"] = expert_delta(b, v.expert_stats(), r)
        if name is not None:
            r["engine"], r["variant"] = f"moespec[{name}]", name
    for r in results:
        r["test"] = f"pp{len(ps[0])}" if kind == "pp" else f"tg{new}"
        _log(r)
    n = len(variants)
    for mine in results[1:n]:           # each variant against the first
        compare(mine, results[0], kind)
    for theirs in results[n:]:          # the first against each peer
        compare(results[0], theirs, kind)
    for r in results:
        r.pop("_tokens")
    return results


def _emit(a, report: dict) -> None:
    text = json.dumps(report, indent=1)
    if a.output:
        Path(a.output).write_text(text)
    print(text)


def compare(mine: dict, theirs: dict, kind: str) -> None:
    """Speed ratio (decode tokens/s, or prefill speed) and identical greedy tokens of moespec against a peer run,
    stored in moespec's run under vs_<peer> (vs_llama.cpp:<file> for each GGUF)."""
    pairs = [(sm, sp) for bm, bp in zip(mine["_tokens"], theirs["_tokens"]) for sm, sp in zip(bm, bp)]
    same_seq = sum(list(sm) == list(sp) for sm, sp in pairs)
    same = sum(x == y for sm, sp in pairs for x, y in zip(sm, sp))
    total = sum(len(sm) for sm, _ in pairs)
    key = "decode_tok_s" if kind == "tg" else "ttft_s"
    ratio = (mine[key]["mean"] / theirs[key]["mean"]) if kind == "tg" else (theirs[key]["mean"] / mine[key]["mean"])
    name = theirs["engine"] + (f":{Path(theirs['peer_model']).name}" if "peer_model" in theirs else "")
    mine[f"vs_{name}"] = {"speedup": ratio, "identical_sequences": f"{same_seq}/{len(pairs)}",
                          "identical_tokens": f"{same}/{total}"}
    paired = paired_speedup(mine[key], theirs[key]) if kind == "tg" else None
    if paired is not None:
        mine[f"vs_{name}"]["paired_speedup"] = paired
    print(f"  {mine['engine']} / {name} ({'decode tok/s' if kind == 'tg' else 'prefill speed'}): {ratio:.2f}x"
          + (f" (paired by batch: {paired['geomean']:.2f}x, {paired['min']:.2f}-{paired['max']:.2f})" if paired else "")
          + f"; identical sequences {same_seq}/{len(pairs)}, tokens {same}/{total}", file=sys.stderr)


def paired_speedup(mine: dict, theirs: dict) -> dict | None:
    """Ratios of the two runs' tokens/s batch by batch (they take turns on the same batches, so a slow spell of the
    machine hits a pair alike): their geometric mean, smallest and largest; None without per-batch figures."""
    a, b = mine.get("values"), theirs.get("values")
    if not a or not b or len(a) != len(b) or min(b) <= 0:
        return None
    r = [x / y for x, y in zip(a, b)]
    return {"geomean": math.exp(statistics.fmean(math.log(x) for x in r)), "min": min(r), "max": max(r), "n": len(r)}


def expert_delta(before: dict, after: dict, run: dict) -> dict:
    """Expert-cache figures of one job's measured batches: hit rate, bytes read per generated token
    (prefill reads included), the share of generate time (TTFT + decode) the compute waited on loads,
    and the loader's achieved read bandwidth."""
    d = {k: after[k] - before[k] for k in ("hits", "misses", "bytes_read", "stall_s", "prefetch_issued",
                                           "prefetch_used", "prefetch_wasted", "evictions")}
    reps = run["ttft_s"]["n"]                  # measured batches (the snapshot is taken after the warm-up)
    tokens = max(1, run["batch"] * run["new_tokens"] * reps)
    seen = d["hits"] + d["misses"]
    # stall happens in prefill too: share of the whole generate time (TTFT + decode) of the measured batches
    decode = ((run["tpot_s"]["mean"] * (run["new_tokens"] - 1) if run.get("tpot_s") else 0.0)
              + run["ttft_s"]["mean"]) * reps
    per = after.get("load_s_per_expert")
    return {**d, "hit_rate": d["hits"] / seen if seen else 0.0, "bytes_read_per_token": d["bytes_read"] / tokens,
            "stall_share": min(1.0, d["stall_s"] / decode) if decode else 0.0,
            "loader_read_gbs": after["expert_bytes"] / per / 1e9 if per else None,
            "capacity": after["capacity"], "policy": after["policy"], "prefetch": after["prefetch"]}


def _log(r: dict) -> None:
    tps = r["decode_tok_s"]
    msg = f"{r['engine']:>12} {r['test']:>6} batch {r['batch']:>2}: TTFT {1000 * r['ttft_s']['mean']:8.1f} ms"
    if tps:
        msg += (f"  TPOT {1000 * r['tpot_s']['mean']:6.2f} ± {1000 * r['tpot_s']['std']:.2f} ms"
                f"  decode {tps['mean']:7.1f} ± {tps['std']:.1f} tok/s")
    print(msg, file=sys.stderr)
