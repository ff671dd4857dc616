"""Export trained runs to Hugging Face folders: `<out>/reference-moe/` and `<out>/reference-draft/`.

Each folder is a standard checkpoint (bf16 safetensors with the names real Qwen3-MoE / Qwen3 checkpoints
use, config.json from transformers' config class, generation_config.json, tokenizer files), plus a model
card with measured numbers, its loss curve and the training log. A folder is built in a staging
directory, checked (transformers and moespec must both reproduce TrainLM's logits on the bf16 weights),
evaluated, and only then moved into place, so a failed export never leaves a half-written model.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import card
import evaluate
from chat_data import CHAT_TEMPLATE, render
from data import SPECIAL_TOKENS
from train import TrainConfig

FOLDERS = {"moe": "reference-moe", "draft": "reference-draft"}
MAX_POSITIONS = 4096
TRAINING_ONLY = {"model_type", "output_router_logits"}
PARITY_ATOL = 1e-4


class ExportError(RuntimeError):
    pass


def load_trained(run: Path, name: str, spec: dict, build_model, vocab: int, allow_unfinished: bool):
    """TrainLM with the checkpoint's weights rounded to bf16 (what the export stores), its state, its cfg."""
    state = torch.load(run / name / "ckpt.pt", weights_only=False, map_location="cpu")
    cfg = TrainConfig(**state["cfg"])
    if state["step"] < cfg.steps and not allow_unfinished:
        raise ExportError(f"{run / name} is at step {state['step']} of {cfg.steps}; finish training first "
                          "(or pass --allow-unfinished to export a preview)")
    model = build_model(spec, vocab)
    model.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in state["model"].items()})
    return model.eval(), state, cfg


def hf_config(spec: dict, vocab: int, ids: dict):
    from transformers import AutoConfig
    fields = {k: v for k, v in spec.items() if k not in TRAINING_ONLY}
    return AutoConfig.for_model(spec["model_type"], vocab_size=vocab, max_position_embeddings=MAX_POSITIONS,
                                dtype="bfloat16", use_cache=True, **ids, **fields)


def write_folder(folder: Path, model, spec: dict, vocab: int, ids: dict, tokenizer_file: Path) -> None:
    folder.mkdir(parents=True)
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.hf_state_dict().items()}
    assert not any(k.startswith("lm_head") for k in sd), "embeddings are tied: no lm_head tensor"
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "model.safetensors").chmod(0o644)  # save_file creates it owner-only; it ships in the package
    hf_config(spec, vocab, ids).save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    # transformers 5 writes `num_local_experts` and `rope_parameters`; Qwen3-MoE checkpoints (and readers
    # built on transformers 4.x, vLLM included) use `num_experts` and `rope_theta`. Write both spellings.
    if "num_local_experts" in raw:
        raw["num_experts"] = raw["num_local_experts"]
    raw["rope_theta"] = spec["rope_theta"]
    (folder / "config.json").write_text(json.dumps(dict(sorted(raw.items())), indent=2) + "\n")
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokenizer_file))
    eos, im_end = ids["eos_token_id"], tok.token_to_id("<|im_end|>")
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": None, "eos_token_id": [eos, im_end], "pad_token_id": ids["pad_token_id"],
         "do_sample": False, "transformers_version": raw.get("transformers_version")}, indent=2) + "\n")
    shutil.copyfile(tokenizer_file, folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok), indent=2) + "\n")


def tokenizer_config(tok) -> dict:
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                        "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>", "unk_token": None, "model_max_length": MAX_POSITIONS,
            "clean_up_tokenization_spaces": False, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "added_tokens_decoder": added, "chat_template": CHAT_TEMPLATE}


def verify(folder: Path, model, windows: torch.Tensor) -> dict:
    """transformers and moespec, loading the folder in float32, must give TrainLM's logits (within 1e-4)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moespec.loading import load_model
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ms = load_model(folder, "float32")
    worst = {"transformers": 0.0, "moespec": 0.0}
    with torch.no_grad():
        for w in windows:
            x = w[None]
            ref, _ = model(x)
            got = {"transformers": hf(x).logits, "moespec": ms.forward(x, ms.new_cache(1, x.shape[1])).logits}
            for k, v in got.items():
                worst[k] = max(worst[k], (v - ref).abs().max().item())
    bad = {k: v for k, v in worst.items() if not v <= PARITY_ATOL}
    if bad:
        raise ExportError(f"{folder}: logits differ from TrainLM's by {bad} (> {PARITY_ATOL}); not exporting")
    # The tokenizer as transformers loads it: same ids, same chat prompts as the training data.
    from tokenizers import Tokenizer
    tt = AutoTokenizer.from_pretrained(folder)
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = "def f(x):\n    return 'héllo' + x  # ünïcode\n"
    msgs = [{"role": "user", "content": "Write a function."}]
    if (tt(text)["input_ids"] != raw.encode(text).ids or tt.eos_token_id != raw.token_to_id("<|endoftext|>")
            or tt.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) != render(msgs, True)):
        raise ExportError(f"{folder}: transformers' tokenizer disagrees with tokenizer.json / the chat format")
    return {"max_abs_logit_diff": worst, "windows": int(windows.shape[0]), "window_tokens": int(windows.shape[1])}


def manifest_counts(run: Path) -> dict:
    counts: dict[str, int] = {}
    for line in (run / "manifest.tsv").read_text().splitlines():
        rel, split = line.split("\t")
        key = f"{rel.split('/')[0]}_{split}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def parity_windows(streams: dict, n: int, length: int) -> torch.Tensor:
    out = []
    for name in ("stdlib_val", "chat_val", "site_val"):
        s = streams.get(name)
        if s is not None and s.size > length:
            starts = np.linspace(0, s.size - length - 1, n).astype(np.int64)
            out += [torch.from_numpy(s[i:i + length].astype(np.int64)) for i in starts]
    return torch.stack(out)


def export_all(run: Path, out: Path, specs: dict, build_model, vocab: int, ids: dict, streams: dict,
               tiny: bool = False, allow_unfinished: bool = False, eval_tokens: int | None = None) -> dict:
    """Export, verify and evaluate both models; returns the eval record written to reference-moe/eval.json."""
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    stage = out / f".export-{int(t0)}"
    stage.mkdir()
    try:
        models, info = {}, {}
        for name, spec in specs.items():
            model, state, cfg = load_trained(run, name, spec, build_model, vocab, allow_unfinished)
            folder = stage / FOLDERS[name]
            write_folder(folder, model, spec, vocab, ids, run / "data" / "tokenizer.json")
            v = verify(folder, model, parity_windows(streams, 2, 64 if tiny else 256))
            print(f"{name}: exported and verified {v}", flush=True)
            models[name] = model
            info[name] = {"step": state["step"], "cfg": state["cfg"], "verify": v,
                          "log": card.read_log(run / name / "log.jsonl")}
        stats = json.loads((run / "data" / "data_stats.json").read_text())
        ev = evaluate.evaluate_all({n: stage / FOLDERS[n] for n in specs}, run, streams, stats,
                                   max_tokens=4096 if tiny else eval_tokens)
        ev["corpus"] = manifest_counts(run)
        ev["export"] = {n: {"step": info[n]["step"], "verify": info[n]["verify"]} for n in info}
        for name in specs:
            folder = stage / FOLDERS[name]
            log = info[name]["log"]
            if log["prior"] is None:
                shutil.copyfile(run / name / "log.jsonl", folder / "training_log.jsonl")
            else:                                           # a continued run: earlier stage first (card.read_log)
                recs = sorted(log["train"] + log["val"], key=lambda r: (r["step"], "ce" not in r))
                (folder / "training_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
            card.write_card(folder, name, specs, info, ev, stats, vocab)
        (stage / FOLDERS["moe"] / "eval.json").write_text(json.dumps(ev, indent=1) + "\n")
        for name in specs:
            dest = out / FOLDERS[name]
            if dest.exists():
                shutil.rmtree(dest)
            (stage / FOLDERS[name]).rename(dest)
        print(f"exported to {out} in {time.time() - t0:.0f}s", flush=True)
        return ev
    finally:
        shutil.rmtree(stage, ignore_errors=True)
