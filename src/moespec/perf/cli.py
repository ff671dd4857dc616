"""`moespec plan`: will it fit, how fast, which settings; from a config.json alone (no weights needed).

Wire into the main parser with `add_plan_parser(sub, model_args)` and dispatch `plan` to `run_plan(args)`.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..assets import REFERENCE_MODEL
from .errors import PerfError
from .hardware import PROFILES, get_profile
from .model import DTYPE_BYTES, ModelDesc, known_model, known_names
from .units import format_bytes, parse_size

REFERENCE_CONFIG = REFERENCE_MODEL / "config.json"


def add_plan_parser(sub, model_args) -> None:
    p = sub.add_parser("plan", help="predict fit, TTFT / TPOT / tokens/s and the best settings (no weights needed)",
                       description="Predict whether a model fits, how fast it decodes with and without "
                       "speculation, and which drafter, draft length, expert cache, prefetch cutoff and budget to "
                       "use. MODEL is a checkpoint folder, a config.json, or a bundled name: "
                       + ", ".join(known_names()) + ".")
    model_args(p)
    # Planning defaults to the checkpoint's own precision (config.json torch_dtype), as the engine's --dtype auto.
    p.set_defaults(dtype=os.environ.get("MOESPEC_DTYPE"))
    p.add_argument("--hardware", default=os.environ.get("MOESPEC_HARDWARE", "this-machine"),
                   help=f"profile name ({', '.join(PROFILES)}) or a JSON profile file; default: this-machine")
    p.add_argument("--memory", default=None,
                   help="fast memory moespec may use, e.g. 24GiB, 512MB, 2e9 (default: the profile's capacity)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=1024, help="tokens of context per sequence (KV budget, decode)")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens for the TTFT estimate")
    p.add_argument("--acceptance", type=float, default=None,
                   help="measured per-token draft acceptance in [0, 1] (default: per-drafter assumptions)")
    p.add_argument("--draft-model", default=None, help="also consider this draft model (folder, config.json "
                   "or bundled name, e.g. qwen3-0.6b)")
    p.add_argument("--prefetch-recall", type=float, default=None,
                   help="measured draft-guided prefetch recall in [0, 1] (predictor_recall in a run's stats; default: "
                        "what this engine measured per drafter)")
    p.add_argument("--expert-bits", type=float, default=None,
                   help="bits per expert parameter, for quantised experts (e.g. 4.5 for Q4_K, 8.5 for Q8_0)")
    p.add_argument("--overlap", action="store_true", help="assume expert loads overlap compute")
    p.add_argument("--nodes", type=int, default=None, help="also predict expert parallelism over 1..N machines of "
                   "this profile, each with --memory (docs/parallel.md), and pick N")
    p.add_argument("--network", default="10Gbit,50us", help="the link between them: RATE,LATENCY (10Gbit,50us; "
                   "100Gbit,5us; 25GB/s,2us)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.add_argument("--plot", metavar="DIR", default=None, help="write speedup_vs_batch.png and speedup_vs_k.png")
    p.add_argument("--published", action="store_true", help="instead of planning, compare predictions with "
                   "published figures (llama.cpp, MoE-Infinity, mixtral-offloading); ignores MODEL and settings")


def load_model_desc(spec: str | None, dtype: str | None = None, expert_bits: float | None = None) -> ModelDesc:
    """A ModelDesc from a folder, a config.json, a bundled name, or (None) the bundled reference model."""
    kw = {"dtype_bytes": DTYPE_BYTES[dtype] if dtype and dtype != "auto" else None, "expert_bits": expert_bits}
    if spec is None:
        if not REFERENCE_CONFIG.is_file():
            raise PerfError(f"no MODEL given and the bundled reference model ({REFERENCE_CONFIG}) is not installed "
                            f"yet; pass a checkpoint folder, a config.json or one of: {', '.join(known_names())}")
        return ModelDesc.from_file(REFERENCE_CONFIG, name="reference-moe", **kw)
    if Path(spec).exists():
        return ModelDesc.from_file(spec, **kw)
    return known_model(spec, **kw)


def run_plan(args, runtime_plan: dict | None = None) -> dict:
    """runtime_plan: what `--memory` would make a run choose (moespec.memory, computed by the CLI, which may import
    torch), shown beside the prediction."""
    if getattr(args, "published", False):
        return run_published(args.json)
    if args.batch < 1 or args.context < 0 or args.prompt_len < 1:
        raise PerfError("--batch and --prompt-len must be at least 1 and --context at least 0")
    if args.acceptance is not None and not 0 <= args.acceptance <= 1:
        raise PerfError(f"--acceptance must be in [0, 1], got {args.acceptance}")
    if args.expert_bits is not None and not 0 < args.expert_bits <= 32:
        raise PerfError(f"--expert-bits must be in (0, 32], got {args.expert_bits}")
    from .planner import plan
    bits = args.expert_bits
    if bits is None and getattr(args, "quantize", "none") != "none":     # scales and zeros included
        bits = 8.0 if args.quantize == "int8" else 4 + 32 / args.quantize_group_size
    model = load_model_desc(args.model, args.dtype, bits)
    hw = get_profile(args.hardware)
    memory = parse_size(args.memory, "--memory") if args.memory is not None else hw.fast_mem_bytes
    draft = load_model_desc(args.draft_model, args.dtype) if args.draft_model else None
    result = plan(model, hw, memory, args.batch, args.acceptance, context=args.context, prompt_len=args.prompt_len,
                  draft=draft, overlap=args.overlap, prefetch_recall=args.prefetch_recall)
    if runtime_plan is not None:
        result["runtime_memory_plan"] = runtime_plan
    if getattr(args, "nodes", None):
        from .parallel import Network, plan_nodes
        result["expert_parallel"] = plan_nodes(model, hw, args.nodes, Network.parse(args.network), args.batch,
                                               args.context, memory)
    if args.plot and "error" not in result:
        from .plots import write_plots
        result["plots"] = [str(p) for p in write_plots(model, hw, memory, args.batch, args.plot,
                                                       context=args.context, acceptance=args.acceptance,
                                                       draft=draft, overlap=args.overlap)]
    if args.json:
        print(json.dumps(result, default=_jsonable))
    else:
        print_plan(result)
        if "expert_parallel" in result:
            print_nodes(result["expert_parallel"])
    return result


def print_nodes(ep: dict) -> None:
    """The expert-parallel rows of a plan: decode tokens/s by machine count, the exchange's share."""
    net = ep["network"]
    print(f"\nexpert parallelism over {net['rate_bytes_s'] * 8 / 1e9:g} Gbit/s, {net['latency_s'] * 1e6:g} us:")
    for r in ep["rows"]:
        cached = "" if r["cached_per_rank"] is None else f", {r['cached_per_rank']:.1f} experts/layer cached per rank"
        print(f"  {r['nodes']} node(s): {r['tokens_per_s']:.2f} tok/s, exchange {r['dispatch_share']:.1%} of a step"
              + cached + ("   <- best" if r["nodes"] == ep["best_nodes"] else ""))


def run_published(as_json: bool = False) -> dict:
    """`moespec plan --published`: predicted vs reported for the published setups (perf/published.py)."""
    from .published import compare, mean_abs_error, print_published
    rows = compare()
    result = {"setups": rows, "mean_abs_error": mean_abs_error(rows)}
    if as_json:
        print(json.dumps(result))
    else:
        print_published(rows)
    return result


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _ms(s: float) -> str:
    return f"{s * 1e3:,.1f} ms" if s < 10 else f"{s:,.1f} s"


def print_plan(r: dict, file=None) -> None:
    """A readable summary of a plan() result (rich tables)."""
    from rich.console import Console
    from rich.table import Table
    con = Console(file=file or sys.stdout)
    m, mem, st = r["model"], r["memory"], r["settings"]
    con.print(f"[bold]{m['name']}[/] ({m['family']}): {m['params_total'] / 1e9:.2f} B params, "
              f"{m['params_active_per_token'] / 1e9:.2f} B active, {format_bytes(m['bytes_total'])} "
              f"({m['dtype_bytes']:g} bytes/param" + (f", experts {m['expert_bits']:g} bits" if m["expert_bits"]
                                                       else "") + f") on [bold]{r['hardware']['name']}[/]")
    t = Table(title=f"memory: budget {format_bytes(mem['budget_bytes'])}, batch {st['batch']}, "
                    f"context {st['context']}", show_header=False)
    for k, v in [("non-expert weights", format_bytes(mem["nonexpert_bytes"])),
                 ("KV cache", format_bytes(mem["kv_bytes"])),
                 ("runtime reserve", format_bytes(mem["reserve_bytes"])),
                 ("all experts", format_bytes(mem["experts_bytes"])),
                 ("fits entirely", "yes" if mem["fits"] else "no"),
                 ("experts cached per MoE layer", f"{mem['cached_experts_per_layer']:.2f} of {m['experts']}"
                  if m["experts"] else "n/a")]:
        t.add_row(k, v)
    con.print(t)
    rp = r.get("runtime_memory_plan")
    if rp is not None:
        con.print(f"a run with this --memory chooses: {rp['summary']}" if "summary" in rp else
                  f"[red]a run with this --memory would stop:[/] {rp['error']}")
    if "error" in r:
        con.print(f"[red]cannot run:[/] {r['error']}")
        return
    p = r["plain"]
    t = Table(title="predicted decoding")
    for c in ("mode", "k", "acceptance", "TTFT", "TPOT", "tokens/s", "speedup"):
        t.add_column(c, justify="right" if c != "mode" else "left")
    t.add_row("plain", "0", "-", _ms(p["ttft_s"]), _ms(p["tpot_s"]), f"{p['tokens_per_s']:,.2f}", "1.00x")
    for c in r["speculative"]["candidates"]:
        t.add_row(f"spec: {c['drafter']}", str(c["k"]), f"{c['acceptance']:.2f}", _ms(p["ttft_s"]), _ms(c["tpot_s"]),
                  f"{c['tokens_per_s']:,.2f}", f"{c['speedup']:.2f}x")
    con.print(t)
    t = Table(title="recommended settings")
    for c in ("setting", "value", "predicted gain", "why"):
        t.add_column(c)
    for k, v in r["recommend"].items():
        t.add_row(k.replace("_", " "), "-" if v.get("value") is None else str(v["value"]), f"{v['gain']:.2f}x",
                  v.get("why", ""))
    con.print(t)
    for w in r["warnings"]:
        con.print(f"[yellow]warning:[/] {w}")
    con.print("assumptions: " + "; ".join(r["assumptions"]), style="dim")
    for path in r.get("plots", []):
        con.print(f"wrote {path}")
