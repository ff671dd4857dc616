"""Predicted speedup curves (data as plain lists) and PNGs of them (matplotlib, Agg backend, optional extra)."""
from __future__ import annotations

from pathlib import Path

from .errors import PerfError
from .hardware import Hardware
from .model import ModelDesc
from .planner import drafters_for, memory_plan, offload_for
from .spec import best_spec, spec_decode

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def speedup_vs_batch(model: ModelDesc, hw: Hardware, memory_bytes: float, *, batches=BATCHES, context: int = 1024,
                     acceptance: float | None = None, draft: ModelDesc | None = None, profile=None,
                     k_max: int = 16, overlap: bool = False) -> dict[str, list[dict]]:
    """Per drafter: [{batch, k, speedup, tokens_per_s}] at the best draft length for each batch size
    (batches whose weights + KV do not fit are left out; no prefetch)."""
    out: dict[str, list[dict]] = {}
    for b in batches:
        mem = memory_plan(model, memory_bytes, b, context)
        if not mem["runnable"]:
            continue
        for d, m, _ in drafters_for(model, mem, b, context, acceptance, draft, profile):
            r = best_spec(model, hw, d, b, context, k_max=k_max, offload=offload_for(m, model, overlap),
                          profile=profile)
            out.setdefault(d.kind, []).append({"batch": b, "k": r["k"], "speedup": r["speedup"],
                                               "tokens_per_s": r["tokens_per_s"]})
    return out


def speedup_vs_k(model: ModelDesc, hw: Hardware, memory_bytes: float, batch: int, *, context: int = 1024,
                 acceptance: float | None = None, draft: ModelDesc | None = None, profile=None,
                 k_max: int = 16, overlap: bool = False) -> dict[str, list[dict]]:
    """Per drafter: [{k, speedup, target_efficiency}] for k = 1..k_max at one batch size (no prefetch)."""
    mem = memory_plan(model, memory_bytes, batch, context)
    if not mem["runnable"]:
        raise PerfError("the model's non-expert weights and KV cache do not fit the memory budget")
    out: dict[str, list[dict]] = {}
    for d, m, _ in drafters_for(model, mem, batch, context, acceptance, draft, profile):
        off = offload_for(m, model, overlap)
        out[d.kind] = [{"k": k, **{x: r[x] for x in ("speedup", "target_efficiency", "tokens_per_s")}}
                       for k in range(1, k_max + 1)
                       for r in [spec_decode(model, hw, d, batch, context, k, offload=off, profile=profile)]]
    return out


def write_plots(model: ModelDesc, hw: Hardware, memory_bytes: float, batch: int, out_dir: str | Path,
                **kw) -> list[Path]:
    """Write speedup_vs_batch.png and speedup_vs_k.png into out_dir; returns their paths."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PerfError("plots need matplotlib: pip install 'moespec[plot]'") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{model.name} on {hw.name}, {memory_bytes / 2**30:.1f} GiB"
    paths = []
    by_b = speedup_vs_batch(model, hw, memory_bytes, **kw)   # kw: batches, context, acceptance, draft, ...
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, rows in by_b.items():
        ax.plot([r["batch"] for r in rows], [r["speedup"] for r in rows], marker="o", label=kind)
        for r in rows:
            ax.annotate(f"k={r['k']}", (r["batch"], r["speedup"]), fontsize=7, xytext=(2, 4),
                        textcoords="offset points")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="batch size", ylabel="predicted speedup over plain decoding (best k)", title=title)
    ax.set_xscale("log", base=2)
    shown = sorted({r["batch"] for rows in by_b.values() for r in rows})
    ax.set_xticks(shown, [str(b) for b in shown])
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "speedup_vs_batch.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    kw.pop("batches", None)
    by_k = speedup_vs_k(model, hw, memory_bytes, batch, **kw)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, rows in by_k.items():
        line, = ax.plot([r["k"] for r in rows], [r["speedup"] for r in rows], marker="o", label=f"{kind}: speedup")
        ax.plot([r["k"] for r in rows], [r["target_efficiency"] for r in rows], ls=":", color=line.get_color(),
                label=f"{kind}: target efficiency T(1)/T(k+1)")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="draft length k", ylabel="predicted", title=f"{title}, batch {batch}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "speedup_vs_k.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
