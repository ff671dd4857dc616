"""Side-by-side benchmark of speculation over offloaded experts: plain decoding (on demand, next-layer
prefetch), self-speculation without and with draft-guided prefetch (every cutoff and auto), and the
verification budget. One process, every configuration loaded once, prompts interleaved across
configurations so machine noise hits them alike.

    python tools/bench_offload_spec.py --expert-cache 25% --prompts humaneval --num-prompts 8 \\
        --max-new-tokens 128 --output docs/bench/offload-spec.json --plot docs/bench/offload-spec-cutoff.png

Output JSON: per configuration tokens/s (total new tokens / total decode time), TPOT, stall seconds per
token, expert misses and bytes per token, acceptance, predictor recall per layer, and agreement with the
lossless output (fraction of identical tokens, mean first-divergence position) for lossy modes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from moespec import LLM, SamplingParams
from moespec.bench.workloads import load_prompts
from moespec.config import OffloadConfig
from moespec.spec_config import SpecConfig


def configs(a, n_moe: int, slots: int) -> dict[str, tuple[dict, dict | None]]:
    """name -> (OffloadConfig fields, SpecConfig fields or None for plain decoding)."""
    off = dict(expert_cache=a.expert_cache, offload=a.offload, offload_dir=a.offload_dir)
    spec = dict(method="self", num_speculative_tokens=a.draft_len)
    half = dict(spec, draft_experts=a.draft_experts or max(1, slots // 2))   # the prefetch modes' draft set
    out = {"plain": (dict(off, prefetch="none"), None),
           "plain-next-layer": (dict(off, prefetch="next-layer"), None),
           "self": (dict(off, prefetch="none"), spec),                          # draft set = whole cache
           "self-draft-set": (dict(off, prefetch="none"), half),                # same set, no prefetch
           "self-k-auto": (dict(off, prefetch="none"), dict(spec, num_speculative_tokens="auto")),
           "ngram": (dict(off, prefetch="none"), dict(method="ngram", num_speculative_tokens=a.draft_len)),
           "ngram-k-auto": (dict(off, prefetch="none"), dict(method="ngram", num_speculative_tokens="auto"))}
    K, L = a.model_top_k, a.model_layers
    for name, extra in (("self-substitute", dict(draft_routing="substitute")),
                        ("self-top1", dict(draft_top_k=1)), (f"self-L{L - 2}", dict(draft_layers=L - 2)),
                        (f"self-top1-L{L - 2}", dict(draft_top_k=1, draft_layers=L - 2))):
        if K > 1 or "top1" not in name:      # cheaper self drafts (fewer experts per token, fewer layers)
            out[name] = (dict(off, prefetch="none"), dict(spec, **extra))
    for k in (1, 2, 8):                     # fixed draft lengths the controller is compared with
        out[f"ngram-k{k}"] = (dict(off, prefetch="none"), dict(method="ngram", num_speculative_tokens=k))
    if a.draft_model:
        dm = dict(method="draft_model", model=a.draft_model)
        out["draft-model"] = (dict(off, prefetch="none"), dict(dm, num_speculative_tokens=a.draft_len))
        out["draft-model-k-auto"] = (dict(off, prefetch="none"), dict(dm, num_speculative_tokens="auto"))
    if a.expert_cache == "none":             # every expert resident: no prefetch or offload rows
        out = {k: v for k, v in out.items() if "prefetch" not in k and k not in ("plain-next-layer", "self-draft-set")}
    cuts = [] if a.expert_cache == "none" else \
        (range(0, n_moe + 1) if a.cutoffs == "all" else [int(c) for c in a.cutoffs.split(",") if c])
    for c in cuts:
        out[f"self-prefetch-L{c}"] = (dict(off, prefetch="draft", prefetch_cutoff=c), half)
    if a.expert_cache == "none":
        for b in a.budgets:
            out[f"self-B{b}"] = (off, dict(spec, verify_budget=b))
        return out
    out["self-prefetch-auto"] = (dict(off, prefetch="draft", prefetch_cutoff="auto"), half)
    for b in a.budgets:
        out[f"self-prefetch-auto-B{b}"] = (dict(off, prefetch="draft", prefetch_cutoff="auto"),
                                           dict(half, verify_budget=b))
    return out


def budget_loss(llm: LLM, texts: list[list[int]], width: int, budget) -> float:
    """Mean next-token loss (nats) of the target when it scores text in verification-sized windows of
    `width` tokens (pending + k drafts) with the verify budget applied to each window (None: exact)."""
    import torch
    import torch.nn.functional as F
    from moespec.models.decoder import ForwardPlan
    model, total, count = llm.model, 0.0, 0
    for ids in texts:
        kv = model.new_cache(1, len(ids) + width)
        for s in range(0, len(ids) - 1, width):
            chunk = ids[s:s + width]
            plan = ForwardPlan(budget=budget, depth=torch.arange(len(chunk))) if budget is not None else None
            logits = model.forward(torch.tensor([chunk]), kv, plan=plan).logits[0]
            kv.advance(len(chunk))
            target = torch.tensor(ids[s + 1:s + 1 + len(chunk)])
            n = target.numel()
            total += float(F.cross_entropy(logits[:n].float(), target, reduction="sum"))
            count += n
    return total / count


def agreement(ref: list[int], got: list[int]) -> tuple[float, int]:
    same = sum(x == y for x, y in zip(ref, got)) / max(1, len(ref))
    first = next((i for i, (x, y) in enumerate(zip(ref, got)) if x != y), len(ref))
    return same, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--expert-cache", default="25%", help="slots per layer, or none (every expert resident)")
    ap.add_argument("--offload", default="disk")
    ap.add_argument("--offload-dir", default=str(Path(tempfile.gettempdir()) / "moespec-bench-experts"))
    ap.add_argument("--draft-len", type=int, default=4)
    ap.add_argument("--draft-model", default=None, help="also run this draft model (fixed k and auto)")
    ap.add_argument("--draft-experts", type=int, default=None, help="draft set of the prefetch modes (default S/2)")
    ap.add_argument("--cutoffs", default="all", help="'all' or a comma list of MoE-layer cutoffs")
    ap.add_argument("--budgets", type=int, nargs="*", default=[])
    ap.add_argument("--prompts", default="humaneval")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--only", default=None, help="comma list of configuration names to run")
    ap.add_argument("--output", default=None)
    ap.add_argument("--plot", default=None, help="PNG of TPOT against the prefetch cutoff")
    a = ap.parse_args()

    resident = a.expert_cache == "none"
    probe = LLM(a.model, offload=None if resident else OffloadConfig(expert_cache=a.expert_cache, offload="ram"))
    n_moe = len(probe.config.moe_layer_ids)
    a.model_top_k, a.model_layers = probe.config.top_k, probe.config.num_layers
    slots = probe.config.num_experts if resident else probe.model.experts.S
    prompts = load_prompts(a.prompts, a.num_prompts, a.prompt_len, probe.config.vocab_size, probe.tokenizer)
    probe.close()
    del probe
    todo = configs(a, n_moe, slots)
    if a.only:
        keep = a.only.split(",")
        todo = {k: v for k, v in todo.items() if k in keep or k == "plain"}
    llms = {name: LLM(a.model, offload=None if resident else OffloadConfig(**off),
                      speculative=SpecConfig(**spec) if spec else None)
            for name, (off, spec) in todo.items()}
    params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=0, ignore_eos=True)
    for llm in llms.values():                  # warm-up: builds the pack file, fills caches, JIT paths
        llm.generate(prompts[0][:16], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))
    runs = {name: [] for name in llms}
    for i, p in enumerate(prompts):
        for name, llm in llms.items():
            o = llm.generate(p, params)[0]
            runs[name].append({"tokens": o.token_ids, **{k: v for k, v in o.stats.items()
                                                         if not isinstance(v, (dict, list))},
                               "per_layer": o.stats.get("predictor_per_layer"),
                               "controller": o.stats.get("controller")})
            print(f"prompt {i} {name}: {o.stats['tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
    ref = runs["plain"]
    report = {"settings": {k: v for k, v in vars(a).items() if k not in ("output", "plot")},
              "machine_note": "one process, configurations interleaved per prompt", "configs": {}}
    for name, rs in runs.items():
        new = sum(r["new_tokens"] - 1 for r in rs)
        dec = sum(r["decode_s"] for r in rs)
        row = {"tokens_per_s": new / dec, "tpot_s": dec / new,
               "tpot_s_per_prompt": [r["tpot_s"] for r in rs],
               "stall_s_per_token": sum(r.get("stall_s", 0.0) for r in rs) / new,
               "misses_per_token": sum(r.get("expert_misses", 0) for r in rs) / new,
               "bytes_read_per_token": sum(r.get("expert_bytes_read", 0) for r in rs) / new,
               "lossless_vs_plain": all(r["tokens"] == q["tokens"] for r, q in zip(rs, ref))}
        if "acceptance_rate" in rs[0]:
            drafted = sum(r["draft_tokens"] for r in rs)
            row["acceptance_rate"] = sum(r["accepted_tokens"] for r in rs) / drafted if drafted else 0.0
            row["mean_accepted_len"] = statistics.fmean(r["mean_accepted_len"] for r in rs)
            row["draft_s_per_token"] = sum(r["draft_s"] for r in rs) / new
            row["verify_s_per_token"] = sum(r["verify_s"] for r in rs) / new
            row["distinct_experts_per_verify"] = statistics.fmean(r["distinct_experts_per_verify"] for r in rs)
            row["lossy"] = rs[0].get("lossy", False)
            if rs[-1].get("controller"):       # draft length "auto": how often it decoded plainly, what it learned
                plain = sum(r.get("plain_steps", 0) for r in rs)
                row["plain_step_fraction"] = plain / max(1, plain + sum(r["draft_steps"] for r in rs))
                row["controller_last_prompt"] = rs[-1]["controller"]
        for key in ("prefetch_issued", "prefetch_used", "prefetch_wasted"):
            if key in rs[0]:
                row[key] = sum(r[key] for r in rs)
        if rs[-1].get("per_layer"):
            row["predictor_recall"] = rs[-1]["predictor_recall"]
            row["predictor_precision"] = rs[-1]["predictor_precision"]
            row["predictor_per_layer"] = rs[-1]["per_layer"]
            row["prefetch_cutoff_final"] = rs[-1]["prefetch_cutoff"]
        same = [agreement(q["tokens"], r["tokens"]) for r, q in zip(rs, ref)]
        row["identical_token_fraction"] = statistics.fmean(s for s, _ in same)
        row["mean_first_divergence"] = statistics.fmean(f for _, f in same)
        report["configs"][name] = row
    # Held-out loss of the budgeted verifier: the prompts plus the lossless continuations, scored in
    # windows of k + 1 tokens as verification sees them.
    texts = [list(p) + r["tokens"] for p, r in zip(prompts, ref)]
    for name in [n for n in report["configs"] if "-B" in n or n == "self"]:
        spec = llms[name].spec
        report["configs"][name]["heldout_loss"] = budget_loss(llms[name], texts, a.draft_len + 1,
                                                              spec.budget() if spec is not None else None)
    base = report["configs"]["plain"]["tokens_per_s"]
    for row in report["configs"].values():
        row["speedup_vs_plain"] = row["tokens_per_s"] / base
    text = json.dumps(report, indent=1)
    if a.output:
        Path(a.output).write_text(text + "\n")
    print(json.dumps({k: {m: round(v[m], 4) for m in ("tokens_per_s", "speedup_vs_plain", "stall_s_per_token")}
                      for k, v in report["configs"].items()}, indent=1))
    if a.plot:
        plot(report, a.plot)


def plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = {int(k.rsplit("L", 1)[1]): v for k, v in report["configs"].items() if k.startswith("self-prefetch-L")}
    if not rows:
        return
    xs = sorted(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [rows[x]["tpot_s"] * 1e3 for x in xs], "o-", label="draft-guided prefetch, cutoff L")
    for name, style in (("self", "--"), ("plain", ":")):
        if name in report["configs"]:
            ax.axhline(report["configs"][name]["tpot_s"] * 1e3, ls=style, color="gray", label=name)
    auto = report["configs"].get("self-prefetch-auto")
    if auto:
        ax.axhline(auto["tpot_s"] * 1e3, ls="-.", color="C1", label=f"auto (final L={auto.get('prefetch_cutoff_final')})")
    ax.set_xlabel("prefetch cutoff (MoE layers)")
    ax.set_ylabel("TPOT (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    t = time.time()
    main()
    print(f"done in {time.time() - t:.0f}s", file=sys.stderr)
