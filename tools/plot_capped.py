"""Decode tokens/s against memory cap, for moespec and llama.cpp, from `moespec bench --memory-cap` reports.

    python tools/plot_capped.py docs/bench/capped-large-*.json --output docs/bench/capped-large.png

Writes the PNG and prints a Markdown table (one row per cap, one column per engine and precision; batch 1).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def label(run: dict) -> str:
    if run["engine"] == "llama.cpp":
        return "llama.cpp " + Path(run["peer_model"]).stem.rsplit("-", 1)[-1]
    q = run.get("quantize") or "none"
    return "moespec " + ("bf16" if q == "none" else q) + (" + dense" if run.get("quantize_dense") else "")


def collect(paths: list[str]) -> dict:
    """{label: {cap bytes: {tok_s (None: failed), group peak, failcnt, killed, expert slots}}}."""
    table: dict[str, dict[int, dict]] = {}
    for p in paths:
        for run in json.loads(Path(p).read_text())["runs"]:
            tg = [x for x in run.get("runs", []) if x.get("decode_tok_s") and x["batch"] == 1]
            table.setdefault(label(run), {})[run["memory_cap"]] = {
                "tok_s": tg[0]["decode_tok_s"]["mean"] if tg else None, "peak": run["cgroup"]["peak_bytes"],
                "failcnt": run["cgroup"]["failcnt"], "killed": run["killed"],
                "slots": (run.get("memory_plan") or {}).get("slots")}
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("reports", nargs="+")
    ap.add_argument("--output", default=None)
    a = ap.parse_args()
    table = collect(a.reports)
    caps = sorted({c for v in table.values() for c in v}, reverse=True)
    names = sorted(table, key=lambda n: (not n.startswith("moespec"), n))
    print("| memory cap | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for c in caps:
        cells = []
        for n in names:
            r = table[n].get(c)
            cells.append("-" if r is None else "killed" if r["killed"] else "failed" if r["tok_s"] is None else
                         f"{r['tok_s']:.1f}" + (f" ({r['slots']} slots)" if r.get("slots") else ""))
        print(f"| {c / 1e9:.1f} GB | " + " | ".join(cells) + " |")
    if a.output:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for n in names:            # one colour per precision: moespec solid, llama.cpp dashed, "+ dense" lighter
            pts = sorted((c / 1e9, r["tok_s"]) for c, r in table[n].items() if r["tok_s"])
            colour = "tab:blue" if "bf16" in n else "tab:red" if ("int8" in n or "q8_0" in n) else "tab:green"
            if pts:
                ax.plot(*zip(*pts), marker="o" if n.startswith("moespec") else "s", color=colour,
                        alpha=0.55 if "dense" in n else 1.0,
                        linestyle="-" if n.startswith("moespec") else "--", label=n)
        ax.set_xlabel("memory cap (GB, cgroup limit; page cache counted)")
        ax.set_ylabel("decode tokens/s (batch 1)")
        ax.set_yscale("log")
        ax.set_title("1.15B random Mixtral: decode speed against memory cap, cold start")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(a.output, dpi=110)
        print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
