"""`moespec calibrate`: measure this machine into a hardware profile for `moespec plan --hardware PATH`, and
optionally (`--validate`) compare the performance model's decode TPOT with moespec's measured one.

Wire into the main parser with `add_calibrate_parser(sub)` and dispatch `calibrate` to `run_calibrate(args)`.
Importing this module does not import torch.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import MoespecError


def add_calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="measure this machine into a hardware profile for `moespec plan`",
                       description="Measure matmul throughput, memory and SSD bandwidth, SSD latency and moespec's "
                       "per-layer overhead, and write a hardware profile JSON (use it with `moespec plan "
                       "--hardware PATH`). Run it on an otherwise idle machine.")
    p.add_argument("--output", default=None, help="profile file to write (default: $XDG_CACHE_HOME/moespec/"
                   "hardware.json or ~/.cache/moespec/hardware.json)")
    p.add_argument("--quick", action="store_true", help="small sizes: a few seconds, rougher numbers")
    p.add_argument("--offload-dir", default=os.environ.get("MOESPEC_OFFLOAD_DIR"),
                   help="folder on the drive that will hold offloaded experts; a temporary file is written and "
                        "read there (default: the profile's cache folder)")
    p.add_argument("--validate", action="store_true",
                   help="also compare predicted and measured decode TPOT on the reference model")
    p.add_argument("--hardware", default=None, help="with --validate: check this profile (name or JSON file) "
                   "instead of measuring a new one")
    p.add_argument("--model", default=None, help="with --validate: checkpoint folder (default: the reference model)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 4], help="with --validate (default: 1 4)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="with --validate: tokens per run (default 32)")
    p.add_argument("--repetitions", type=int, default=3, help="with --validate: runs per batch size (median)")
    p.add_argument("--draft-len", type=int, nargs="+", default=[0], help="with --validate: draft lengths to "
                   "check, 0 = plain decoding, k > 0 = prompt-lookup speculation on HumanEval prompts (default: 0)")
    p.add_argument("--prompts", choices=["random", "humaneval", "prose"], default=None,
                   help="with --validate: prompt set (default: humaneval when a draft length is > 0, else random)")
    p.add_argument("--validate-cache", nargs="+", default=["none"], metavar="CACHE",
                   help="with --validate: expert caches to check, 'none' (every expert resident) or a size "
                        "such as 25%% over the SSD tier in --offload-dir (default: none)")
    p.add_argument("--validate-drafter", default="ngram", metavar="DRAFTER",
                   help="with --validate and a draft length > 0: ngram (default), self (the cached set), shadow-int4, "
                        "shadow-int8, draft_model (the bundled model's draft, or --speculative model) or oracle:A "
                        "(free drafts of acceptance A: the verification economics alone); speedups are reported "
                        "against the plain point of each batch (add draft length 0)")
    p.add_argument("--quantize", choices=["none", "int8", "int4"], default="none",
                   help="with --validate: run the model with quantized experts (priced by their bytes)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")


def check_writable(path: Path) -> None:
    """Fail before measuring when the profile could not be written."""
    why = "it is a directory" if path.is_dir() else None
    if why is None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            why = e.strerror or str(e)
    if why is None and (not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK))):
        why = "permission denied"
    if why is not None:
        raise MoespecError(f"cannot write the hardware profile to {path}: {why}")


def run_calibrate(a) -> dict:
    from ..perf.hardware import get_profile
    say = (lambda msg: None) if a.json else (lambda msg: print(f"measuring {msg} ...", file=sys.stderr))
    if a.hardware is not None and not a.validate:
        raise MoespecError("--hardware only applies with --validate (it checks an existing profile)")
    if a.validate and (min(a.batch_size) < 1 or a.max_new_tokens < 2 or a.repetitions < 1 or min(a.draft_len) < 0):
        raise MoespecError("--batch-size and --repetitions must be at least 1, --max-new-tokens at least 2 and "
                           "--draft-len at least 0")
    caches = tuple(None if c.lower() == "none" else c for c in a.validate_cache)
    out: dict = {}
    if a.hardware is not None:
        hw = get_profile(a.hardware)
    else:
        from .measure import QUICK, Knobs, default_output
        from .run import calibrate
        path = Path(a.output).expanduser() if a.output else default_output()
        check_writable(path)
        if a.offload_dir is not None:
            folder = Path(a.offload_dir).expanduser()
        else:
            folder = path.parent
        hw, raw = calibrate(folder, QUICK if a.quick else Knobs(), log=say)
        try:
            hw.to_json(path)
        except OSError as e:
            raise MoespecError(f"cannot write the hardware profile to {path}: {e.strerror or e}") from None
        out.update(path=str(path), measurements=raw)
    out["profile"] = json.loads(hw.to_json())
    if a.validate:
        from .validate import validate
        out["validation"] = validate(hw, a.model, tuple(a.batch_size), a.max_new_tokens,
                                     repetitions=a.repetitions, log=say, draft_lens=tuple(a.draft_len),
                                     caches=caches, offload_dir=a.offload_dir,
                                     prompt_set=a.prompts, quantize=None if a.quantize == "none" else a.quantize,
                                     drafter=a.validate_drafter)
    if a.json:
        print(json.dumps(out))
    else:
        print_summary(out)
    return out


def print_summary(r: dict, file=None) -> None:
    from rich.console import Console
    from rich.table import Table
    con = Console(file=file or sys.stdout)
    p = r["profile"]
    t = Table(title=p["name"], show_header=False)
    rows = [("fp32 matmul", f"{p['peak_fp32_tflops'] * 1e3:,.1f} GFLOPS"),
            ("bf16 matmul", f"{p['peak_bf16_tflops'] * 1e3:,.1f} GFLOPS"),
            ("memory (GEMV weight streaming)", f"{p['mem_bw_gbs']:,.1f} GB/s")]
    m = r.get("measurements")
    if m:
        rows += [("memory (sum / copy)", f"{m['memory']['sum_gbs']:,.1f} / {m['memory']['copy_gbs']:,.1f} GB/s")]
    for key, kind in (("rows_fp32_tflops", "fp32"), ("rows_bf16_tflops", "bf16")):
        by_size: dict = {}
        for size, n, tf in p.get(key) or ():
            by_size.setdefault(size, []).append((n, tf))
        for size, pts in sorted(by_size.items()):
            rows.append((f"{kind} {size / 2 ** 20:g} MiB matrix x M = {'/'.join(f'{n:g}' for n, _ in pts)} rows",
                         " / ".join(f"{tf * 1e3:,.1f}" for _, tf in pts) + " GFLOPS"))
    rows += [("SSD read", f"{p['slow_bw_gbs']:,.2f} GB/s" + ("" if not m else " (O_DIRECT)" if m["ssd"]["direct"]
                                                            else " (buffered: O_DIRECT refused)")),
             ("SSD 4 KiB read latency", f"{p['slow_latency_s'] * 1e6:,.0f} us"),
             ("per-layer overhead", f"{p['layer_overhead_s'] * 1e6:,.0f} us"),
             ("per-step overhead (generation loop)", f"{p.get('step_overhead_s', 0.0) * 1e6:,.0f} us"),
             ("fast memory (RAM)", f"{p['fast_mem_bytes'] / 2 ** 30:,.1f} GiB")]
    for k, v in rows:
        t.add_row(k, v)
    con.print(t)
    if "path" in r:
        con.print(f"wrote {r['path']}  (use: moespec plan MODEL --hardware {r['path']})")
    v = r.get("validation")
    if v:
        t = Table(title=f"decode TPOT, predicted vs measured ({Path(v['model']).name}, float32, "
                        f"{v['new_tokens']} tokens, context ~{v['context']})")
        for c in ("experts", "batch", "k", "predicted", "measured", "error", "tokens/step", "hit rate",
                  "bare forward", "error vs forward"):
            t.add_column(c, justify="right")
        for pt in v["points"]:
            fwd = "forward_s" in pt
            t.add_row(pt["cache"] or "resident", str(pt["batch"]), str(pt["k"]), f"{pt['predicted_s'] * 1e3:.2f} ms",
                      f"{pt['measured_s'] * 1e3:.2f} ms", f"{pt['rel_error']:+.1%}",
                      f"{pt.get('tokens_per_step', 1.0):.2f}",
                      "" if pt["hit_rate"] is None else f"{pt['hit_rate']:.3f}",
                      f"{pt['forward_s'] * 1e3:.2f} ms" if fwd else "", f"{pt['forward_error']:+.1%}" if fwd else "")
        con.print(t)
        by = ", ".join(f"{g} {m:.1%}" for g, m in v["mape_by"].items() if m is not None)
        con.print(f"mean absolute percentage error of TPOT: {v['mape']:.1%} ({by})"
                  + (f"; of the bare forward: {v['forward_mape']:.1%}" if v.get("forward_mape") is not None else "")
                  + f". The model's per-step overhead: {p.get('step_overhead_s', 0.0) * 1e3:.2f} ms")
        if v.get("speedups"):
            t = Table(title=f"speedup of speculation ({v['drafter']}) over plain decoding, predicted vs measured")
            for c in ("experts", "batch", "k", "acceptance", "predicted", "measured", "error"):
                t.add_column(c, justify="right")
            for sp in v["speedups"]:
                t.add_row(sp["cache"] or "resident", str(sp["batch"]), str(sp["k"]), f"{sp['acceptance']:.2f}",
                          f"{sp['predicted_speedup']:.2f}x", f"{sp['measured_speedup']:.2f}x", f"{sp['rel_error']:+.1%}")
            con.print(t)
