"""Model cards (README.md) and loss curves for the exported reference models, from measured numbers only."""
from __future__ import annotations

import json
import re
from pathlib import Path

MAX_POS = 4096  # export.MAX_POSITIONS
TITLES = {"moe": "moespec reference MoE", "draft": "moespec reference draft"}
SETS = {"stdlib_val": "stdlib (held out)", "site_val": "site-packages (held out)", "chat_val": "chat (held out)"}


def read_log(path: Path) -> dict:
    """Train and eval records of log.jsonl; a resumed run re-logs steps, so the last record of a step wins.

    A run that continued earlier ones (`train_reference.py --init-from`, recorded in prior.json beside the
    log) gets the earlier stages' records first and its own offset by their steps and tokens, so curves and
    tables count from the start; `prior` keeps each earlier stage's config and length, and their sums."""
    def records(lines, step0=0, tok0=0):
        train, val = {}, {}
        for r in lines:
            r = dict(r, step=r["step"] + step0, tokens=r["tokens"] + tok0)
            (train if "ce" in r else val)[r["step"]] = r
        return [train[k] for k in sorted(train)], [val[k] for k in sorted(val)]
    own = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    prior_file = path.parent / "prior.json"
    if not prior_file.exists():
        train, val = records(own)
        return {"train": train, "val": val, "prior": None}
    prior = json.loads(prior_file.read_text())
    stages = prior.get("stages") or [prior]          # runs before multi-stage prior.json recorded one stage
    train, val, done, step0, tok0 = [], [], [], 0, 0
    for st in stages:
        t, v = records(st["log"], step0, tok0)
        train, val = train + t, val + v
        tokens = st["step"] * st["cfg"]["ctx"] * st["cfg"]["batch"]
        done.append({"cfg": st["cfg"], "step": st["step"], "tokens": tokens})
        step0, tok0 = step0 + st["step"], tok0 + tokens
    t, v = records(own, step0, tok0)
    return {"train": train + t, "val": val + v, "prior": {"stages": done, "step": step0, "tokens": tok0}}


def seen_tokens(cfg: dict, step: int, log: dict) -> int:
    """Tokens the exported weights were trained on, earlier stages included."""
    return step * cfg["ctx"] * cfg["batch"] + (log["prior"]["tokens"] if log.get("prior") else 0)


def train_hours(log: dict) -> float:
    """Compute time from the logged throughput (excludes evaluation, sampling and time between resumes)."""
    secs, prev = 0.0, 0
    for r in log["train"]:
        if r.get("tok_s"):
            secs += (r["tokens"] - prev) / r["tok_s"]
        prev = r["tokens"]
    return secs / 3600


def plot(log: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    t = [r["tokens"] / 1e6 for r in log["train"]]
    ce = [r["ce"] for r in log["train"]]
    ax.plot(t, ce, color="0.75", lw=0.8, label="train CE (per logged step)")
    if len(ce) > 5:
        ema, sm = ce[0], []
        for v in ce:
            ema = 0.9 * ema + 0.1 * v
            sm.append(ema)
        ax.plot(t, sm, color="0.2", lw=1.4, label="train CE (EMA)")
    for key, style in (("val_stdlib", "o-"), ("val_site", "s-"), ("val_chat", "^-")):
        pts = [(r["tokens"] / 1e6, r[key]) for r in log["val"] if key in r]
        if pts:
            ax.plot(*zip(*pts), style, ms=3.5, lw=1.2, label=key.replace("val_", "held-out ") + " (fixed windows)")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def curve_table(log: dict, rows: int = 8) -> str:
    val = log["val"]
    if not val:
        return "(no validation records in the log)"
    if len(val) > rows:
        val = [val[round(i * (len(val) - 1) / (rows - 1))] for i in range(rows)]
    out = ["| step | tokens | train CE (mean of last 5 logs) | val stdlib | val site | val chat |", "|---|---|---|---|---|---|"]
    for r in val:
        tr = [x["ce"] for x in log["train"] if x["step"] <= r["step"]][-5:]
        cells = [f"{r[k]:.3f}" if k in r else "–" for k in ("val_stdlib", "val_site", "val_chat")]
        out.append(f"| {r['step']} | {r['tokens'] / 1e6:.2f}M | {sum(tr) / max(1, len(tr)):.3f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _n(x: float) -> str:
    """31.7M / 540k / 96: counts for prose."""
    return f"{x / 1e6:.1f}M" if x >= 1e6 else f"{x / 1e3:.0f}k" if x >= 1e4 else f"{x:,.0f}"


def _arch(folder: Path, ctx: int) -> tuple[str, dict]:
    from moespec.config import ModelConfig
    from moespec.model_info import describe
    c = ModelConfig.from_folder(folder)
    d = describe(c, 2)
    rows = [("family (model_type)", c.model_type), ("layers", c.num_layers), ("hidden size", c.hidden_size),
            ("attention", f"{c.num_heads} query heads, {c.num_kv_heads} KV heads (GQA), head_dim {c.head_dim}, "
                          "RMSNorm on q and k per head, RoPE θ = " + f"{c.rope['rope_theta']:g}")]
    if c.is_moe:
        rows += [("MoE", f"{c.num_experts} experts per layer, top-{c.top_k}, renormalised top-k weights "
                         f"(norm_topk_prob={str(c.norm_topk_prob).lower()}), every layer sparse, no shared expert"),
                 ("expert", f"SwiGLU, width {c.moe_intermediate_size} ({d['params_per_expert']:,} params, "
                            f"{d['bytes_per_expert'] / 1024:.0f} KiB in bf16)")]
    else:
        rows.append(("MLP", f"SwiGLU, width {c.intermediate_size}"))
    rows += [("vocabulary", f"{c.vocab_size:,} (byte-level BPE), embeddings tied to the output head"),
             ("parameters", f"{d['params_total']:,} total" + (f"; {d['params_experts']:,} in experts; "
                            f"{d['params_active_per_token']:,} active per token (excluding the embedding lookup)"
                            if c.is_moe else "")),
             ("weights", f"bfloat16 safetensors, {(folder / 'model.safetensors').stat().st_size / 2**20:.1f} MiB"),
             ("context", f"trained on {ctx}-token windows; config allows {c.max_position_embeddings} positions")]
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows), d


def _data(stats: dict, corpus: dict) -> str:
    files = ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in sorted(corpus.items()))
    rows = [f"Files in this run's manifest: {files}. Counts below are of the encoded streams (unreadable, "
            "minified or data-only files are dropped; chat streams count exchanges).\n","| stream | documents | tokens | UTF-8 bytes | bytes/token |", "|---|---|---|---|---|"]
    for n, s in stats.items():
        rows.append(f"| {n} | {s['docs']:,} | {s['tokens']:,} | {s['bytes']:,} | {s['bytes'] / max(1, s['tokens']):.2f} |")
    return "\n".join(rows)


def _recipe(cfg: dict, step: int, log: dict) -> str:
    steps = max(1, cfg["total_tokens"] // (cfg["ctx"] * cfg["batch"]))
    seen = step * cfg["ctx"] * cfg["batch"]
    prior = log.get("prior")

    def lr(c, n):
        return (f"peak {c['lr']:g}, linear warmup {c['warmup_steps']} steps, cosine decay to "
                f"{c['min_lr_ratio']:g} × peak at step {n}")

    def precision(c):
        kd = (f"; loss {c['distill']:g} × cross-entropy against the MoE's next-token distribution (knowledge "
              f"distillation) + {1 - c['distill']:g} × the data's next token") if c.get("distill") else ""
        return ("bf16 autocast (float32 master weights)" if c.get("bf16_autocast") else
                "float32 weights and activations") + kd
    rows = [("optimizer", f"AdamW, β = (0.9, 0.95), weight decay {cfg['weight_decay']} on matrices (not norms), "
                          f"gradient clipping {cfg['grad_clip']}")]
    if prior:
        for n, st in enumerate(prior["stages"], 1):
            pc = st["cfg"]
            how = "from scratch" if n == 1 else f"continued from the stage-{n - 1} weights with a new optimizer"
            rows.append((f"stage {n}", f"{how}: {st['step']:,} steps, {_n(st['tokens'])} tokens; learning rate "
                                       f"{lr(pc, max(1, pc['total_tokens'] // (pc['ctx'] * pc['batch'])))}; {precision(pc)}"))
        n = len(prior["stages"]) + 1
        rows += [(f"stage {n}", f"continued training from the stage-{n - 1} weights with a new optimizer: {step:,} "
                                f"of {steps:,} steps, {_n(seen)} tokens; learning rate {lr(cfg, steps)}; {precision(cfg)}"),
                 ("tokens seen", f"{_n(prior['tokens'] + seen)} in all")]
    else:
        rows += [("learning rate", lr(cfg, steps)),
                 ("steps / tokens seen", f"{step:,} of {steps:,} steps; {_n(seen)} tokens"),
                 ("precision", precision(cfg))]
    rows += [("batch", f"{cfg['batch']} windows × {cfg['ctx']} tokens = {cfg['batch'] * cfg['ctx']:,} tokens/step"),
             ("data mixture", f"random windows; stdlib sampled {cfg.get('stdlib_weight', 2.0):g}× per token relative "
                              "to site-packages and chat"),
             ("hardware", f"2 CPU cores; ≈{_hours(train_hours(log))} of training compute"
                          f" (median {_median([r['tok_s'] for r in log['train'] if r.get('tok_s')]):,.0f} tokens/s)")]
    if cfg.get("aux_coef") and any(r.get("aux") is not None for r in log["train"]):     # routers only
        rows.insert(1, ("load balancing", f"Switch-style auxiliary loss, coefficient {cfg['aux_coef']} (see tools/reference/moe_train.py)"))
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _hours(h: float) -> str:
    return f"{h:.1f} h" if h >= 1 else f"{h * 60:.0f} min" if h * 60 >= 1 else f"{h * 3600:.0f} s"


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else 0.0


def _losses(r: dict) -> str:
    rows = ["| set | tokens scored | nats/token | bits/byte | top-1 accuracy |", "|---|---|---|---|---|"]
    for n, v in r["heldout"].items():
        rows.append(f"| {SETS.get(n, n)} | {v['tokens']:,} | {v['nats_per_token']:.3f} | {v['bits_per_byte']:.3f} | "
                    f"{v['top1_accuracy']:.1%} |")
    for n, v in r["unseen_code"].items():
        rows.append(f"| unseen: `{n}` {v['version']} ({v['files']} files) | {v['tokens']:,} | {v['nats_per_token']:.3f} | "
                    f"{v['bits_per_byte']:.3f} | {v['top1_accuracy']:.1%} |")
    return "\n".join(rows)


def _routing(rt: dict) -> str:
    rows = ["| layer | min share | max share | dead experts (< 1%) | consecutive tokens share ≥ 1 expert | "
            "same expert pair | shuffled-token baseline |", "|---|---|---|---|---|---|---|"]
    for L in rt["layers"]:
        rows.append(f"| {L['layer']} | {L['min_share']:.1%} | {L['max_share']:.1%} | {L['dead_experts']} | "
                    f"{L['reuse_any']:.1%} | {L['reuse_same_set']:.1%} | {L['reuse_any_shuffled']:.1%} |")
    return "\n".join(rows)


def quantization_section(q: dict) -> str:
    """The card's quantization section from tools/eval_quant.py's report (eval.json "quantization")."""
    rows = ["| weights | bytes per expert | held-out stdlib loss (nats/token) | vs bf16 | greedy agreement | "
            "mean first divergence (tokens) | identical sequences |", "|---|---|---|---|---|---|---|"]
    for r in q["settings"]:
        rows.append(f"| {r['setting']} | {r['expert_bytes']:,} | {r['heldout_nats_per_token']:.4f} | "
                    f"{r['delta_vs_bf16']:+.4f} | {r['greedy_agreement']:.1%} | {r['mean_first_divergence']:.1f} | "
                    f"{r['identical_sequences']} |")
    return ("## Quantization\n\n`--quantize int8` (per output channel) and `--quantize int4` (groups of 64 or 32 "
            "inputs) quantize the experts at load; `--quantize-dense` also the attention projections and the tied LM "
            "head. Measured with `tools/eval_quant.py`, in float32 so that only the weights differ: held-out loss "
            f"over every token of the stdlib set ({q['heldout_tokens']:,} tokens, the Evaluation section's set), and "
            f"greedy agreement with the unquantized weights over {q['new_tokens']} new tokens of "
            f"{q['prompts']} prompts, one prompt at a time (share of positions with the same token; a sequence that "
            "diverged once rarely agrees again, so the share falls with the first divergence).\n\n"
            + "\n".join(rows) + "\n")


def write_card(folder: Path, name: str, specs: dict, info: dict, ev: dict, stats: dict, vocab: int) -> None:
    log, cfg, step = info[name]["log"], info[name]["cfg"], info[name]["step"]
    plot(log, folder / "loss_curve.png", TITLES[name])
    arch, d = _arch(folder, cfg["ctx"])
    r = ev[name]
    unfinished = step < max(1, cfg["total_tokens"] // (cfg["ctx"] * cfg["batch"]))
    other = "reference-draft" if name == "moe" else "reference-moe"
    kind = (f"A small Qwen3-MoE ({_n(d['params_total'])} parameters, {d['experts']} experts per layer, top-{d['top_k']})"
            if name == "moe" else f"A small dense Qwen3 ({_n(d['params_total'])} parameters), the draft model for `{other}`")
    real = ("whose routing and next-token statistics look like a language model's, not random weights" if name == "moe"
            else "whose guesses agree with the MoE's as a real draft's would, not random weights")
    unseen = ", ".join(f"`{k}`" for k in r["unseen_code"])
    s = [f"---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags: [moespec, {specs[name]['model_type']}, "
         "python, code, test-model]\n---\n", f"# {TITLES[name]}\n"]
    if unfinished:
        s.append(f"> **Preview export of an unfinished run (step {step}).** Numbers below describe this checkpoint.\n")
    how = "trained from scratch" + (", then distilled from `reference-moe`," if cfg.get("distill") else "")
    s.append(f"{kind}, {how} by `tools/train_reference.py` on Python source code. It ships inside "
             "moespec so that speculative decoding, expert offloading and benchmarks run against a real, trained "
             f"model {real}. "
             "It writes plausible-looking Python; it is **not a useful assistant** and knows nothing beyond the "
             "code it saw. Use it for testing and benchmarking inference engines; do not use it for anything that "
             f"needs correct code or facts. Its companion is `{other}` (same tokenizer).\n")
    s.append("```python\nfrom moespec import LLM, SamplingParams\nllm = LLM()   # the bundled reference model\n"
             "print(llm.generate(\"def fibonacci(n):\", SamplingParams(max_new_tokens=64, temperature=0))[0].text)\n"
             "```\n\nIt is a standard checkpoint: `transformers.AutoModelForCausalLM.from_pretrained(folder)` loads it "
             "and gives the same logits as moespec in float32.\n")
    s.append(f"## Architecture\n\n{arch}\n")
    s.append("## Data\n\nThe corpus is every `.py` file of the Python standard library (tests included; `idlelib` and "
             "`lib2to3` left out) and of the packages installed in the base interpreter's site-packages (`pip` and "
             "`setuptools` left out), skipping files over 400 kB and minified or data-only files. The held-out split "
             "is by file: a file is held out when the SHA-1 of its relative path mod 100 is below 2, so the split is "
             "the same on every machine. Chat exchanges (ChatML, the folder's chat template) are mined from the "
             "corpus: every public top-level function with a docstring becomes *user asks for a function doing what "
             "the docstring says → assistant answers with its source*; held-out files give held-out exchanges. "
             "HumanEval, MBPP, EvalPlus and moespec's own benchmark prompt sets are never included. Documents are "
             f"separated by `<|endoftext|>`. The tokenizer is a byte-level BPE ({vocab:,} tokens, GPT-2 split rules, "
             "specials `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`) trained on training files only.\n\n"
             f"{_data(stats, ev.get('corpus', {}))}\n")
    s.append(f"## Training\n\n{_recipe(cfg, step, log)}\n\nPrecision: on CPUs without AVX512-BF16 bf16 "
             "matmuls take a slow path (about 8× slower than float32 on the Zen 3 machine the recipe was first run "
             "on), so the recipe trains in float32 by default; `--bf16` (autocast) trained about 1.2× faster than "
             "float32 on a Zen 5 CPU with AVX512-BF16. The weights were rounded to bfloat16 only for export. The "
             "held-out numbers below are measured on those rounded weights.\n\n"
             "![loss curve](loss_curve.png)\n\nValidation during training used a fixed subset of held-out windows:\n\n"
             f"{curve_table(log)}\n")
    s.append("## Evaluation\n\nMeasured with moespec on the exported bf16 weights upcast to float32, over **every** "
             f"held-out token in non-overlapping {ev['ctx']}-token windows"
             + (f" (capped at {ev['max_tokens_per_set']:,} tokens per set)"
                if ev.get("max_tokens_per_set") else "")
             + ". Bits/byte = nats/token × (tokens ÷ UTF-8 bytes of the set) ÷ ln 2 (document separators count as "
             f"tokens). *Unseen* rows are the sources of {unseen}, installed only in moespec's virtualenv: "
             "neither in the manifest nor under the base interpreter's site-packages, and files byte-identical to a "
             f"corpus file are skipped.\n\n{_losses(r)}\n")
    if "draft_agreement" in ev:
        s.append("Greedy agreement of draft and MoE (share of held-out positions where the draft's top token equals "
                 "the MoE's; the per-token acceptance rate of greedy speculative decoding): "
                 + ", ".join(f"{SETS.get(k, k)} {v:.1%}" for k, v in ev["draft_agreement"].items()) + ".\n")
    if "routing" in r:
        rt = r["routing"]
        s.append(f"## Routing\n\nOn the held-out text ({rt['tokens']:,} tokens). *Share* is the fraction of a layer's "
                 f"top-{d['top_k']} assignments that go to an expert (uniform: {rt['uniform_share']:.2%}); an expert "
                 "is *dead* below 1%. Reuse compares each token's expert set with the previous token's in the same "
                 f"window; for uniformly random routing it would share at least one expert {rt['reuse_uniform_random']:.1%} "
                 "of the time, and the shuffled baseline pairs tokens at random under the measured shares. Full "
                 f"per-expert shares are in `eval.json`.\n\n{_routing(rt)}\n")
    if "quantization" in ev:
        s.append(quantization_section(ev["quantization"]))
    s.append("## Samples\n\nGreedy, up to 96 new tokens, generated with `moespec.LLM` in float32. End prompts "
             "where a line ends, not after its newline: the tokenizer merges a newline with the next line's "
             "indentation, so a prompt ending in a bare newline tells the model that the next line starts at "
             "column 0 (after `def f(n):\\n` it writes a new top-level statement instead of the body). Greedy "
             "decoding of a model this small also falls into repetition after a few lines; a repetition penalty "
             "(second set below) or sampling (`temperature` 0.7-0.8, `top_p` 0.95) reads better.\n")
    for n, x in enumerate(r["samples"]):
        rp = x.get("repetition_penalty", 1.0)
        if rp != 1.0 and (n == 0 or r["samples"][n - 1].get("repetition_penalty", 1.0) == 1.0):
            s.append(f"Greedy with `repetition_penalty={rp:g}` (`--repetition-penalty {rp:g}`), same prompts:\n")
        text = x["prompt"] + x["completion"]
        fence = "`" * max(3, 1 + max((len(m) for m in re.findall("`+", text)), default=0))  # the model writes ``` too
        s.append(f"{fence}python\n{text}\n{fence}\n*({x['new_tokens']} tokens, finish: {x['finish_reason']})*\n")
    s.append(f"## Limits\n\n- Tiny and trained on {_n(seen_tokens(cfg, step, log))} tokens: completions "
             "are locally plausible but often wrong, repetitive or unfinished; it cannot follow instructions beyond the "
             "mined docstring format.\n- Python only; other languages and prose are out of distribution.\n"
             f"- Trained on {cfg['ctx']}-token windows; `max_position_embeddings` is {MAX_POS} so longer prompts run, "
             f"but quality beyond {cfg['ctx']} tokens is untested and expected to degrade.\n"
             "- The corpus depends on the interpreter and packages of the training machine; the numbers are for "
             "this export only.\n- The training data is under the licenses of its source files (PSF for the standard "
             "library, each package's own license for site-packages); the model may reproduce fragments of them.\n")
    s.append("## Files\n\n`model.safetensors` (bf16), `config.json`, `generation_config.json` (greedy; stops at "
             "`<|endoftext|>` or `<|im_end|>`), `tokenizer.json`, `tokenizer_config.json` (ChatML template), "
             "`loss_curve.png`, `training_log.jsonl` (every logged training and validation step)"
             + (", `eval.json` (all numbers above, machine-readable)" if name == "moe" else "") + ".\n")
    (folder / "README.md").write_text("\n".join(s))

