"""Command-line flags shared by the commands (model, precision, memory, offloading, speculation) and the configs
built from them. The commands' modules (cli.py, bench/, serve/, profile_cli.py) import these; nothing here
imports a command."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import MoespecError


def _env(name: str, default=None, kind=str):
    """Flags can be set by environment variables (MOESPEC_<FLAG>), as users of vLLM expect."""
    v = os.environ.get("MOESPEC_" + name.upper())
    return kind(v) if v is not None else default


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=_env("model"),
                   help="Hugging Face checkpoint folder (default: the bundled reference model)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=_env("dtype", "auto"),
                   help="weights and activations: auto = the checkpoint's own (float16 runs as bfloat16 on a CPU); "
                        "float32 for exact comparisons")
    q = p.add_argument_group("quantization (LOSSY: weights are rounded; speculation stays exact for the quantized model)")
    q.add_argument("--quantize", choices=["none", "int8", "int4", "auto"], default=_env("quantize", "none"),
                   help="weight-only quantization of the experts at load: int8 per output channel, int4 in groups "
                        "(in RAM, in expert-cache slots and in the packed disk file); auto (with --memory): the "
                        "most precise that keeps every expert resident, else the fastest predicted")
    q.add_argument("--quantize-group-size", type=int, default=_env("quantize_group_size", 64, int), metavar="G",
                   help="int4: inputs per scale and zero (32, 64, 128 or 256; default 64)")
    q.add_argument("--quantize-dense", action="store_true", default=_env("quantize_dense", False, _flag),
                   help="also quantize attention, dense MLPs, shared experts and the LM head (as llama.cpp's files do)")


def _flag(v: str) -> bool:
    return v.strip().lower() in ("1", "true", "yes", "on")


def quant_config(a):
    """A QuantConfig from --quantize/--quantize-group-size/--quantize-dense, or None."""
    from .quant.scheme import QuantConfig
    if a.quantize == "auto":
        if a.quantize_dense:
            raise MoespecError("--quantize-dense needs --quantize int8 or int4 (auto quantizes experts only)")
        return "auto"
    if a.quantize == "none":
        if a.quantize_dense:
            raise MoespecError("--quantize-dense needs --quantize int8 or int4")
        return None
    return QuantConfig(a.quantize, a.quantize_group_size, a.quantize_dense).validate()


def load_llm(a, **kw):
    """The LLM a command's model, dtype, quantization, memory, offload and speculation flags describe; with
    --memory, prints the plan it chose on stderr (one line)."""
    from .engine import LLM
    kw.setdefault("max_model_len", getattr(a, "max_model_len", None))
    llm = LLM(a.model, dtype=a.dtype, offload=offload_config(a), speculative=spec_config(a), quantize=quant_config(a),
              show_progress=not getattr(a, "json", False), memory=getattr(a, "memory", None),
              expert_parallel=getattr(a, "expert_parallel", None), **kw)
    if llm.memory_plan is not None:
        print(llm.memory_plan.summary(), file=sys.stderr)
    return llm


def _offload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expert-parallel", type=int, default=_env("expert_parallel", None, int), metavar="N",
                   help="share each MoE layer's experts among N processes started by torchrun (`torchrun "
                        "--nproc-per-node N -m moespec.cli ...`); rank 0 runs the rest and answers")
    g = p.add_argument_group("expert offloading (experts beyond fast memory)")
    g.add_argument("--expert-cache", default=_env("expert_cache"),
                   help="experts per MoE layer kept in fast memory: N, N%% or a size like 2GiB (default: all)")
    g.add_argument("--offload", choices=["ram", "disk"], default=_env("offload"),
                   help="where the other experts live (default ram when --expert-cache is given)")
    g.add_argument("--offload-dir", default=_env("offload_dir"), help="folder of the packed expert file (disk)")
    g.add_argument("--expert-policy", choices=["lru", "lfu", "static"], default=_env("expert_policy", "lru"))
    g.add_argument("--hot-profile", default=_env("hot_profile"), help="routing profile JSON for --expert-policy static")
    g.add_argument("--prefetch", choices=["none", "next-layer", "draft", "auto"], default=_env("prefetch", "none"),
                   help="background loading: next-layer (router of the next layer), draft (the self drafter's "
                        "router picks, for verification; needs --spec self), auto (draft when --spec self)")
    g.add_argument("--prefetch-cutoff", default=_env("prefetch_cutoff", "auto"),
                   help="draft prefetch covers the first L MoE layers: L or auto (from measured load and draft time)")
    g.add_argument("--prefetch-min-prob", type=float, default=_env("prefetch_min_prob", 0.2, float),
                   help="next-layer prefetch: load only experts the next router gives at least this probability "
                        "(default 0.2; 0 = every top-k guess)")
    g.add_argument("--no-direct-io", action="store_true", help="read the disk tier through the page cache")
    g.add_argument("--memory", default=_env("memory"), metavar="LIMIT",
                   help="the whole process's memory budget (e.g. 0.8GB, 1.5GiB): sizes the expert cache (disk tier "
                        "when not every expert fits), the KV cache (--max-model-len when not given) and, with "
                        "--quantize auto, the precision; prints what it chose")


def offload_config(a):
    """An OffloadConfig when any offload flag or --memory was given, else None (every expert resident). With --memory
    and no --expert-cache the plan sizes the cache; this config carries the other settings (next-layer prefetch
    unless --prefetch says otherwise)."""
    budgeted = a.expert_cache is None and a.offload is None and getattr(a, "memory", None) is not None
    # Flags that only mean something with another one are refused without it, never silently ignored.
    if a.hot_profile is not None and a.expert_policy != "static":
        raise MoespecError("--hot-profile is the routing profile of --expert-policy static: add it, or drop "
                           "--hot-profile")
    if str(a.prefetch_cutoff) != "auto" and a.prefetch not in ("draft", "auto"):
        raise MoespecError("--prefetch-cutoff sets how deep draft-guided prefetch goes: add --prefetch draft (or auto)")
    if a.prefetch_min_prob != 0.2 and a.prefetch not in ("next-layer", "auto") and not budgeted:
        raise MoespecError("--prefetch-min-prob filters next-layer prefetch: add --prefetch next-layer")
    if a.expert_cache is None and a.offload is None and not budgeted:
        if a.prefetch != "none":
            raise MoespecError(f"--prefetch {a.prefetch} needs offloaded experts: add --expert-cache N|N%|SIZE")
        if a.expert_policy != "lru" or a.offload_dir is not None:
            flag = "--expert-policy" if a.expert_policy != "lru" else "--offload-dir"
            raise MoespecError(f"{flag} shapes the expert cache: add --expert-cache N|N%|SIZE (or --memory)")
        return None
    from .config import OffloadConfig
    return OffloadConfig(expert_cache=a.expert_cache, offload=a.offload or ("disk" if budgeted else "ram"),
                         offload_dir=a.offload_dir, policy=a.expert_policy,
                         prefetch="next-layer" if budgeted and a.prefetch == "none" else a.prefetch,
                         prefetch_cutoff=a.prefetch_cutoff, prefetch_min_prob=a.prefetch_min_prob,
                         direct_io=not a.no_direct_io, hot_profile=a.hot_profile)


def _spec_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding (lossless unless a verify budget is set)")
    g.add_argument("--spec", choices=["none", "ngram", "draft_model", "self", "auto"], default=_env("spec", "none"),
                   help="drafter: ngram = prompt lookup, draft_model = --draft-model (the bundled model's own draft "
                        "by default), self = the target with fewer experts or shadow copies (SpecMoE), auto = the "
                        "controller picks among them and the draft length each step from what it measures, and "
                        "decodes plainly while none pays")
    g.add_argument("--draft-experts", default=_env("draft_experts", None),
                   help="self drafter: experts per layer while drafting (default: the resident ones, or E/2), or "
                        "shadow-int4 / shadow-int8: draft through low-bit copies of every expert held for drafting "
                        "(the router's own picks, nothing read from the slow tier)")
    g.add_argument("--draft-kv", choices=["auto", "shared", "own"], default=_env("draft_kv", None),
                   help="self drafter: draft on the target's KV cache, every row in one forward per position "
                        "(shared, SpecMoE), or keep its own (own: needed by trees, substitution, --draft-top-k, --draft-layers); "
                        "auto (default): shared unless one of those is asked for")
    g.add_argument("--draft-refresh", choices=["hot-temporal", "hot-global", "random"],
                   default=_env("draft_refresh", None),
                   help="self drafter (shared KV, N cached experts): the draft set is what the last verification "
                        "routed to most (hot-temporal, default), the hottest of --draft-profile, pinned (hot-global), "
                        "or a random draw each step (random)")
    g.add_argument("--draft-profile", default=_env("draft_profile", None),
                   help="routing profile JSON (moespec profile) that --draft-refresh hot-global ranks experts by")
    g.add_argument("--draft-pin", action="store_true", default=_env("draft_pin", "0").lower() in ("1", "true", "yes"),
                   help="self drafter (shared KV): pin the draft set in the expert cache so verification's loads "
                        "cannot evict it")
    g.add_argument("--draft-top-k", type=int, default=_env("draft_top_k", None, int),
                   help="self drafter: experts per token while drafting (fewer = cheaper drafts; default the model's)")
    g.add_argument("--draft-layers", type=int, default=_env("draft_layers", None, int),
                   help="self drafter: draft with only the first L decoder layers (cheaper; default all)")
    g.add_argument("--draft-routing", choices=["substitute", "reroute"], default=_env("draft_routing", None),
                   help="self drafter: a token takes its top-k inside the draft set by router probability "
                        "(reroute, default; higher acceptance) or an expert outside the set becomes its nearest "
                        "one inside (substitute)")
    g.add_argument("--draft-model", default=_env("draft_model"), help="draft model folder (same tokenizer)")
    g.add_argument("--draft-len", default=_env("draft_len", None),
                   help="draft tokens per step (4), or auto: the controller picks k each step and decodes plainly "
                        "while speculation would lose")
    g.add_argument("--tree", default=_env("tree"), metavar="SHAPE",
                   help="draft a static tree instead of a chain: branching factors per depth, e.g. 2,2,1,1 = 2 "
                        "candidates at depth 1, 2 below each, then one (14 nodes, at most 64); the draft length "
                        "is its depth. ngram branches at the root only")
    g.add_argument("--speculative-config", default=_env("speculative_config"),
                   help='vLLM-style JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\'')
    b = p.add_argument_group("verification expert budget (LOSSY: outputs may differ from plain decoding)")
    b.add_argument("--verify-budget", type=int, default=_env("verify_budget", None, int), metavar="B",
                   help="LOSSY: each MoE layer of a verification forward computes only the B experts with the "
                        "most router probability over its tokens (B >= top_k; needs --spec)")
    b.add_argument("--verify-budget-mass", type=float, default=_env("verify_budget_mass", None, float), metavar="TAU",
                   help="LOSSY: keep the fewest experts holding TAU (0 < TAU <= 1) of the router probability "
                        "instead of a fixed B")
    b.add_argument("--budget-mode", choices=["substitute", "truncate"], default=_env("budget_mode"),
                   help="tokens routed outside the kept experts: substitute = re-pick top-k inside them (default), "
                        "truncate = drop those choices")
    b.add_argument("--budget-decay", type=float, default=_env("budget_decay", None, float), metavar="D",
                   help="weight D**depth of a draft token in the expert scores (default 1: no decay)")


LOSSY_NOTE = "note: --verify-budget makes verification lossy: outputs may differ from plain decoding"


def spec_config(a):
    """A SpecConfig from --speculative-config or --spec/--draft-len, or None for plain decoding.

    The verify budget flags apply on top of either (they override the same fields of the JSON)."""
    from .spec_config import SpecConfig
    budget = {k: v for k, v in (("verify_budget", a.verify_budget), ("verify_budget_mass", a.verify_budget_mass),
                                ("budget_mode", a.budget_mode), ("budget_decay", a.budget_decay)) if v is not None}
    tree = getattr(a, "tree", None)
    if tree is not None:
        from .spec_decode.tree import parse_shape
        try:
            tree = parse_shape(tree, "--tree")
        except ValueError as e:
            raise MoespecError(str(e)) from None
    if a.draft_model is not None and (a.speculative_config or a.spec not in ("draft_model", "auto")):
        raise MoespecError("--draft-model is the draft of --spec draft_model (or auto): add it, or give the model in "
                           "--speculative-config")
    if a.speculative_config:
        cfg = _spec_json(a, budget, tree)
    elif a.spec == "none":
        if a.draft_len is not None:
            raise MoespecError("--draft-len needs a drafter: add --spec ngram")
        if tree is not None:
            raise MoespecError("--tree needs a drafter: add --spec ngram, self or draft_model")
        if a.draft_top_k is not None or a.draft_layers is not None or a.draft_routing is not None \
                or a.draft_kv is not None or a.draft_experts is not None or a.draft_refresh is not None \
                or a.draft_profile is not None or a.draft_pin:
            raise MoespecError("--draft-experts, --draft-kv, --draft-refresh, --draft-profile, --draft-pin, "
                               "--draft-top-k, --draft-layers and --draft-routing shape self-drafting: add --spec self")
        if budget:
            flag = "--" + next(iter(budget)).replace("_", "-")
            raise MoespecError(f"{flag} needs speculative decoding (it limits the experts of verification): "
                               "add --spec ngram, self or draft_model")
        return None
    else:
        if a.draft_len is not None and a.draft_len != "auto" and not str(a.draft_len).isdigit():
            raise MoespecError(f"--draft-len must be a positive integer or auto, got {a.draft_len!r}")
        if tree is not None and a.draft_len is not None:
            raise MoespecError("--draft-len and --tree both set the draft length: a tree's depth is its draft length")
        cfg = SpecConfig(method=a.spec, num_speculative_tokens=a.draft_len or 4, model=a.draft_model,
                         draft_experts=a.draft_experts, tree=tree, draft_top_k=a.draft_top_k,
                         draft_kv=a.draft_kv or "auto", draft_refresh=a.draft_refresh or "hot-temporal",
                         draft_profile=a.draft_profile, draft_pin=a.draft_pin,
                         draft_layers=a.draft_layers, draft_routing=a.draft_routing or "reroute",
                         **budget).validate()
    if cfg.budget() is not None:
        print(LOSSY_NOTE, file=sys.stderr)
    return cfg


def _spec_json(a, budget: dict, tree):
    """The SpecConfig of --speculative-config (no other speculation flag may be given with it but the budget's)."""
    from .spec_config import SpecConfig
    given = [flag for flag, v in (("--spec", None if a.spec == "none" else a.spec), ("--draft-len", a.draft_len),
                                  ("--draft-experts", a.draft_experts), ("--draft-kv", a.draft_kv),
                                  ("--draft-refresh", a.draft_refresh), ("--draft-profile", a.draft_profile),
                                  ("--draft-pin", a.draft_pin or None), ("--draft-top-k", a.draft_top_k),
                                  ("--draft-layers", a.draft_layers), ("--draft-routing", a.draft_routing))
             if v is not None]
    if given:
        raise MoespecError(f"{', '.join(given)} and --speculative-config both describe speculation: put "
                           "everything in the JSON (its fields: method, num_speculative_tokens, draft_experts, ...)")
    try:
        d = json.loads(a.speculative_config)
    except json.JSONDecodeError as e:
        raise MoespecError(f"--speculative-config is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise MoespecError("--speculative-config must be a JSON object")
    return SpecConfig.from_dict({**d, **budget, **({"tree": tree} if tree is not None else {})})
