#!/usr/bin/env python
"""Train moespec's bundled reference MoE (and its dense draft model) from offline Python sources.

    python tools/train_reference.py --run runs/reference            # the full recipe (~2 h on 2 cores)
    python tools/train_reference.py --run /tmp/r --tiny              # a one-minute smoke run
    python tools/train_reference.py --run runs/reference --export src/moespec/assets   # train, then export
    python tools/train_reference.py --run runs/reference --stage export --export src/moespec/assets

Stages (each skipped when its output exists, so an interrupted run resumes): corpus manifest,
tokenizer, encoded token streams, MoE training (checkpointed), draft training, export to Hugging
Face folders `<export>/reference-moe` and `<export>/reference-draft` (bf16 safetensors, tokenizer,
generation config, model card with measured numbers, loss curve, training log; see reference/export.py).
Training uses tools/reference/moe_train.py (the same function as transformers' Qwen3-MoE,
laid out for fast CPU training); transformers is needed only to check the export.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "reference"))

import torch  # noqa: E402

import corpus  # noqa: E402
import data  # noqa: E402
import export  # noqa: E402
from moe_train import TrainLM  # noqa: E402
from train import TrainConfig, Windows, fixed_eval_windows, train  # noqa: E402

MOE = dict(model_type="qwen3_moe", hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
           num_key_value_heads=2, head_dim=64, moe_intermediate_size=384, intermediate_size=1024,
           num_experts=16, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
           mlp_only_layers=[], rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
           router_aux_loss_coef=0.01, output_router_logits=True, initializer_range=0.02)
DRAFT = dict(model_type="qwen3", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, intermediate_size=512, rms_norm_eps=1e-6,
             rope_theta=10000.0, tie_word_embeddings=True, initializer_range=0.02)
TINY_MOE = dict(MOE, hidden_size=64, num_hidden_layers=2, head_dim=16, moe_intermediate_size=32, num_experts=4)
TINY_DRAFT = dict(DRAFT, hidden_size=32, head_dim=8, intermediate_size=64, num_hidden_layers=1)

SAMPLE_PROMPTS = ["def fibonacci(n):", "class Stack:", "import os\n\n\ndef list_files(path):"]


def build_model(spec: dict, vocab: int):
    torch.manual_seed(0)
    return TrainLM(spec, vocab)


def make_sampler(tok, run: Path):
    def sample(model, step):
        model.eval()
        with open(run / "samples.txt", "a") as f:
            for p in SAMPLE_PROMPTS:
                ids = torch.tensor([tok.encode(p).ids])
                with torch.no_grad():
                    for _ in range(80):  # greedy, no cache: only a progress check
                        ids = torch.cat([ids, model(ids)[0][:, -1:].argmax(-1)], 1)
                f.write(f"--- step {step} ---\n{tok.decode(ids[0].tolist())}\n")
        model.train()
    return sample



def prior_stages(init_from: Path, ckpt: dict) -> dict:
    """prior.json of a continued run: every earlier stage (config, steps, log), earliest first, so the model
    card tells the whole recipe; the run continued from may itself have continued another (its prior.json)."""
    folder = init_from.parent
    earlier = json.loads((folder / "prior.json").read_text()) if (folder / "prior.json").exists() else {}
    stages = earlier.get("stages") or ([{"ckpt": earlier["init_from"], "cfg": earlier["cfg"], "step": earlier["step"],
                                         "log": earlier["log"]}] if "cfg" in earlier else [])  # one-stage format
    log = folder / "log.jsonl"
    stages.append({"ckpt": str(init_from), "cfg": ckpt["cfg"], "step": ckpt["step"],
                   "log": [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []})
    return {"stages": stages}

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="minutes-scale smoke run (tests)")
    ap.add_argument("--tokens", type=float, default=26e6, help="MoE training tokens")
    ap.add_argument("--draft-tokens", type=float, default=12e6)
    ap.add_argument("--time-limit", type=float, default=None, help="stop (checkpointed) after this many seconds")
    ap.add_argument("--stage", choices=["all", "data", "moe", "draft", "export"], default="all")
    ap.add_argument("--export", type=Path, default=None, help="write the HF folders under this directory")
    ap.add_argument("--allow-unfinished", action="store_true", help="export checkpoints that have not finished training")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="reuse this tokenizer.json instead of training one (keeps an earlier release's ids)")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="start the MoE from this earlier run's ckpt.pt (weights only: fresh optimizer and LR "
                         "schedule), i.e. continue pre-training a released model with --tokens more tokens")
    ap.add_argument("--lr", type=float, default=None, help="MoE peak learning rate (default 1.5e-3)")
    ap.add_argument("--warmup", type=int, default=None, help="MoE warm-up steps (default 200)")
    ap.add_argument("--draft-init-from", type=Path, default=None,
                    help="start the draft from this earlier run's draft ckpt.pt (weights only), like --init-from")
    ap.add_argument("--distill-from", type=Path, default=None,
                    help="train the draft against this MoE ckpt.pt's next-token distribution (knowledge "
                         "distillation) as well as the data")
    ap.add_argument("--distill-weight", type=float, default=0.7, help="share of the distillation loss (default 0.7)")
    ap.add_argument("--draft-lr", type=float, default=None, help="draft peak learning rate (default 2e-3)")
    ap.add_argument("--bf16", action="store_true",
                    help="bf16 autocast (about 1.2x faster on CPUs with AVX512-BF16; far slower without)")
    ap.add_argument("--eval-tokens", type=int, default=None, help="cap held-out tokens scored per set at export")
    a = ap.parse_args()
    if a.stage == "export" and a.export is None:
        ap.error("--stage export needs --export DIR")
    torch.set_num_threads(a.threads)
    run: Path = a.run
    dd = run / "data"
    if a.stage == "export":  # works on an already-trained run: never rebuilds data or trains
        missing = [p for p in (dd / "tokenizer.json", dd / "data_stats.json", run / "manifest.tsv",
                               run / "moe" / "ckpt.pt", run / "draft" / "ckpt.pt") if not p.exists()]
        if missing:
            ap.error(f"{run} is not a trained run; missing {', '.join(map(str, missing))}")
        files = []
    else:
        files = corpus.collect(include_site=not a.tiny)
    dd.mkdir(parents=True, exist_ok=True)
    if a.tiny and files:  # a handful of stdlib files keeps the smoke run under a minute
        files = [f for f in files if f.rel.startswith("stdlib/json/") or f.rel.startswith("stdlib/email/")
                 or f.split == "val"][:80]
    if files and not (run / "manifest.tsv").exists():
        (run / "manifest.tsv").write_text("".join(f"{f.rel}\t{f.split}\n" for f in files))
    if a.tokenizer is not None and not (dd / "tokenizer.json").exists():
        shutil.copyfile(a.tokenizer, dd / "tokenizer.json")
    if not (dd / "tokenizer.json").exists():
        t = time.time()
        data.train_tokenizer(files, 512 if a.tiny else 8192, dd, max_bytes=2_000_000 if a.tiny else 40_000_000)
        print(f"tokenizer trained in {time.time() - t:.1f}s", flush=True)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(dd / "tokenizer.json"))
    if not (dd / "data_stats.json").exists():
        t = time.time()
        print(json.dumps(data.encode_files(tok, files, dd)), f"encoded in {time.time() - t:.1f}s", flush=True)
    if a.stage == "data":
        return
    eos = tok.token_to_id(data.EOS)
    ids = dict(eos_token_id=eos, pad_token_id=eos, bos_token_id=None)
    vocab = tok.get_vocab_size()
    streams = {n: data.load_stream(dd, n) for n in ("stdlib_train", "site_train", "chat_train",
                                                     "stdlib_val", "site_val", "chat_val")
               if (dd / f"{n}.bin").exists()}
    train_names = [n for n in ("stdlib_train", "site_train", "chat_train") if n in streams]
    weights = {"stdlib_train": 2.0, "site_train": 1.0, "chat_train": 1.0}

    def evals(ctx):
        return {n.replace("_val", ""): fixed_eval_windows(streams[n], ctx, 4 if a.tiny else 32)
                for n in ("stdlib_val", "site_val", "chat_val") if n in streams and streams[n].size > ctx + 2}

    specs = [("moe", TINY_MOE if a.tiny else MOE, a.tokens), ("draft", TINY_DRAFT if a.tiny else DRAFT, a.draft_tokens)]
    for name, spec, tokens in specs:
        if a.stage not in ("all", name):
            continue
        cfg = TrainConfig(total_tokens=int(20_000 if a.tiny else tokens), ctx=64 if a.tiny else 512,
                          batch=4 if a.tiny else 8, warmup_steps=5 if a.tiny else 200,
                          eval_every=40 if a.tiny else 500, save_every=40 if a.tiny else 100,
                          sample_every=10**9 if a.tiny else 1000, lr=1.5e-3 if name == "moe" else 2e-3,
                          bf16_autocast=a.bf16)
        model, teacher = build_model(spec, vocab), None
        if name == "moe":
            cfg.lr = a.lr or cfg.lr
            cfg.warmup_steps = a.warmup if a.warmup is not None else cfg.warmup_steps
        else:
            cfg.lr = a.draft_lr or cfg.lr
            if a.distill_from is not None:
                teacher = build_model(TINY_MOE if a.tiny else MOE, vocab)
                teacher.load_state_dict(torch.load(a.distill_from, weights_only=False)["model"])
                teacher.eval().requires_grad_(False)
                cfg.distill = a.distill_weight
        init = a.init_from if name == "moe" else a.draft_init_from
        if init is not None and not (run / name / "ckpt.pt").exists():
            # Continued training: the released weights, a new optimizer and a new cosine cycle.
            prior = torch.load(init, weights_only=False)
            model.load_state_dict(prior["model"])
            (run / name).mkdir(parents=True, exist_ok=True)
            (run / name / "prior.json").write_text(json.dumps(prior_stages(init, prior)))
            print(f"{name}: initialised from {init}", flush=True)
        data_w = Windows([streams[n] for n in train_names], [weights[n] for n in train_names], cfg.ctx)
        res = train(model, cfg, data_w, evals(cfg.ctx), run / name, make_sampler(tok, run / name), a.time_limit,
                    teacher=teacher)
        print(name, res, flush=True)
        if not res["done"]:
            return
    if a.export is not None and a.stage in ("all", "export"):
        export.export_all(run, a.export, {"moe": TINY_MOE if a.tiny else MOE, "draft": TINY_DRAFT if a.tiny else DRAFT},
                          build_model, vocab, ids, streams, tiny=a.tiny, allow_unfinished=a.allow_unfinished,
                          eval_tokens=a.eval_tokens)


if __name__ == "__main__":
    main()
