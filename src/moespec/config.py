"""Model configuration read straight from a Hugging Face `config.json`.

One dataclass covers every supported family; `ModelConfig.from_hf` maps each family's field
names onto it (Mixtral's `num_local_experts`, Qwen's `num_experts` / `moe_intermediate_size`, ...)
and rejects what the engine cannot run with an error naming the field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import MoespecError

if TYPE_CHECKING:
    from .spec.budget import VerifyBudget

# model_type -> (query/key norm kind, default norm_topk_prob); dense families have no experts.
FAMILIES = {
    "mixtral": ("none", True),
    "qwen2_moe": ("none", False),
    "qwen3_moe": ("head", False),
    "olmoe": ("full", False),
    "qwen3": ("head", False),
    "qwen2": ("none", False),
    "llama": ("none", False),
}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: dict                     # {"rope_type", "rope_theta", ...scaling fields}
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"          # "none" | "head" (per head, Qwen3) | "full" (whole projection, OLMoE)
    clip_qkv: float | None = None
    sliding_window: int | None = None
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    intermediate_size: int = 0     # dense MLP layers
    shared_expert_intermediate_size: int = 0
    moe_layers: tuple[bool, ...] = field(default_factory=tuple)
    hidden_act: str = "silu"
    eos_token_id: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0 and any(self.moe_layers)

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, m in enumerate(self.moe_layers) if m]

    @staticmethod
    def from_folder(path: str | Path) -> "ModelConfig":
        return ModelConfig.from_hf(read_config_json(Path(path) / "config.json"))

    @staticmethod
    def from_hf(raw: dict) -> "ModelConfig":
        mt = raw.get("model_type")
        if mt not in FAMILIES:
            raise MoespecError(f"unsupported model_type {mt!r}; supported: {', '.join(sorted(FAMILIES))}")
        qk_norm, default_norm = FAMILIES[mt]

        def need(key, *alts, kind=int):
            for k in (key, *alts):
                if raw.get(k) is not None:
                    v = raw[k]
                    if kind is int and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                        raise MoespecError(f"config.json field {k}={v!r} must be a positive integer")
                    return v
            raise MoespecError(f"config.json ({mt}) is missing the field {key!r}")

        def optional(key, default, kind=int):
            """An optional field: absent or null is `default`; present, it must be a positive number of its kind."""
            v = raw.get(key)
            if v is None:
                return default
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and (kind is float or
                                                                                       isinstance(v, int))
            if not ok:
                raise MoespecError(f"config.json field {key}={v!r} must be a positive "
                                   f"{'integer' if kind is int else 'number'}")
            return v

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        layers = need("num_hidden_layers")
        for key in ("max_position_embeddings", "num_key_value_heads", "head_dim", "intermediate_size",
                    "moe_intermediate_size", "vocab_size"):
            optional(key, None)
        for key in ("rms_norm_eps", "rope_theta"):
            optional(key, None, float)
        if optional("max_position_embeddings", 4096) > 1 << 24:
            raise MoespecError(f"config.json field max_position_embeddings={raw['max_position_embeddings']} is "
                               "implausible (more than 16M positions)")
        kv_heads = raw.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise MoespecError(f"config.json: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        head_dim = raw.get("head_dim") or hidden // heads
        if raw.get("hidden_act", "silu") not in ("silu", "swish"):
            raise MoespecError(f"config.json: hidden_act={raw.get('hidden_act')!r} is not supported (only silu)")
        experts, top_k, moe_i, inter, shared_i = 0, 0, 0, raw.get("intermediate_size") or 0, 0
        moe_layers = [False] * layers
        if mt == "mixtral":
            experts, top_k = need("num_local_experts"), need("num_experts_per_tok")
            moe_i = need("intermediate_size")
            moe_layers = [True] * layers
        elif mt in ("qwen2_moe", "qwen3_moe", "olmoe"):
            experts, top_k = need("num_experts", "num_local_experts"), need("num_experts_per_tok")
            moe_i = need("intermediate_size") if mt == "olmoe" else need("moe_intermediate_size")
            if mt == "olmoe":
                moe_layers = [True] * layers
            else:
                step = raw.get("decoder_sparse_step", 1) or 1
                dense = set(raw.get("mlp_only_layers") or [])
                moe_layers = [(i not in dense) and (i + 1) % step == 0 for i in range(layers)]
                if not all(moe_layers):
                    inter = need("intermediate_size")
            if mt == "qwen2_moe":
                shared_i = raw.get("shared_expert_intermediate_size") or 0
        else:
            inter = need("intermediate_size")
        if experts and not 0 < top_k <= experts:
            raise MoespecError(f"config.json: num_experts_per_tok={top_k} must be in [1, {experts}]")
        eos = raw.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        if mt == "qwen2_moe" and raw.get("use_sliding_window"):
            raise MoespecError("config.json: use_sliding_window=true is not supported for qwen2_moe yet")
        return ModelConfig(
            model_type=mt, vocab_size=need("vocab_size"), hidden_size=hidden, num_layers=layers,
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=raw.get("max_position_embeddings") or 4096,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            rope=rope_params(raw),
            qkv_bias=bool(raw.get("qkv_bias", True) if mt in ("qwen2_moe", "qwen2") else raw.get("attention_bias", False)),
            o_bias=bool(raw.get("attention_bias", False)) if mt in ("llama", "qwen3", "qwen3_moe", "olmoe") else False,
            qk_norm=qk_norm, clip_qkv=raw.get("clip_qkv"),
            sliding_window=raw.get("sliding_window") if mt == "mixtral" else None,
            num_experts=experts, top_k=top_k, moe_intermediate_size=moe_i,
            norm_topk_prob=True if mt == "mixtral" else bool(raw.get("norm_topk_prob", default_norm)),
            intermediate_size=inter, shared_expert_intermediate_size=shared_i,
            moe_layers=tuple(moe_layers), hidden_act="silu", eos_token_id=eos,
            bos_token_id=raw.get("bos_token_id"),
        )


def read_config_json(p: Path) -> dict:
    """A config.json as a dict; a missing or malformed file is a MoespecError naming it."""
    if not p.is_file():
        raise MoespecError(f"no config.json at {p}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise MoespecError(f"{p} is not valid JSON: {e}") from None


def rope_params(raw: dict) -> dict:
    """Transformers 5 writes `rope_parameters`; older configs use `rope_theta` + `rope_scaling`."""
    rp = dict(raw.get("rope_parameters") or {})
    if not rp:
        rp = dict(raw.get("rope_scaling") or {})
        rp.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    if "type" in rp and "rope_type" not in rp:
        rp["rope_type"] = rp.pop("type")
    rp.setdefault("rope_type", "default")
    rp.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    if rp["rope_type"] not in ("default", "linear", "yarn", "llama3"):
        raise MoespecError(f"config.json: rope type {rp['rope_type']!r} is not supported "
                           "(supported: default, linear, yarn, llama3)")
    return rp


@dataclass
class OffloadConfig:
    """Where experts live when they do not all fit in fast memory (see experts/ and the CLI flags).

    expert_cache: slots per MoE layer in fast memory: an int / "12" (experts), "25%" (of the experts)
        or a byte size "2GiB" / "512MB" split evenly across MoE layers; None = every expert.
    offload: the slow tier holding every expert: "ram" (CPU memory) or "disk" (a packed file of
        per-expert blobs in offload_dir, read with pread, O_DIRECT when direct_io).
    policy: eviction "lru" | "lfu" | "static" (hottest experts of hot_profile pinned, the rest LRU).
    prefetch: "none" (load on demand) | "next-layer" (run the next layer's router on the hidden state
        entering this layer's MoE and load its top-k in the background) | "draft" (self-speculation:
        load the experts the draft's router picks, for verification; spec/prefetch.py) | "auto" (draft
        when self-speculating, else next-layer).
    prefetch_cutoff: draft prefetch covers the first L MoE layers (an int) or an L chosen from
        measured load and draft times ("auto").
    prefetch_min_prob: next-layer prefetch loads only experts the next router gives at least this
        probability (a wrong guess costs a read and evicts an expert LRU would have kept; on the reference
        model guesses above 0.2 were right 79% of the time, all guesses 48%). 0 = every top-k guess.
    """
    expert_cache: str | int | None = None
    offload: str = "ram"
    offload_dir: str | None = None          # None: $XDG_CACHE_HOME/moespec/experts (or ~/.cache/...)
    policy: str = "lru"
    prefetch: str = "none"
    prefetch_cutoff: int | str = "auto"
    prefetch_min_prob: float = 0.2
    direct_io: bool = True
    hot_profile: str | None = None          # JSON routing profile (experts/profile.py) for policy "static"
    io_threads: int = 1
    io_timeout_s: float = 60.0              # a load not done by then is an error, never a hang

    def validate(self) -> "OffloadConfig":
        for name, value, allowed in (("offload", self.offload, ("ram", "disk")),
                                     ("policy", self.policy, ("lru", "lfu", "static")),
                                     ("prefetch", self.prefetch, ("none", "next-layer", "draft", "auto"))):
            if value not in allowed:
                raise MoespecError(f"{name}={value!r} is not one of: {', '.join(allowed)}")
        c = self.prefetch_cutoff
        if isinstance(c, str) and c != "auto":
            try:
                self.prefetch_cutoff = c = int(c)
            except ValueError:
                raise MoespecError(f"prefetch_cutoff={c!r} must be a number of MoE layers or 'auto'") from None
        if c != "auto" and (not isinstance(c, int) or c < 0):
            raise MoespecError(f"prefetch_cutoff={c!r} must be a number of MoE layers (>= 0) or 'auto'")
        if self.policy == "static" and not self.hot_profile:
            raise MoespecError("expert policy 'static' needs a routing profile (hot_profile / --hot-profile)")
        if not 0.0 <= self.prefetch_min_prob <= 1.0:
            raise MoespecError(f"prefetch_min_prob={self.prefetch_min_prob!r} must be a probability in [0, 1]")
        if self.io_threads < 1 or self.io_timeout_s <= 0:
            raise MoespecError("io_threads must be at least 1 and io_timeout_s positive")
        return self

    def resolved_dir(self) -> Path:
        if self.offload_dir:
            return Path(self.offload_dir).expanduser()
        import os
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "moespec" / "experts"


SHADOW_KINDS = ("shadow-int4", "shadow-int8")


DRAFT_REFRESH = ("hot-temporal", "hot-global", "random")    # the self drafter's draft-set policies (SpecMoE)


@dataclass
class SpecConfig:
    """Speculative decoding settings, vLLM style (`--speculative-config '{"method": "ngram", ...}'`).

    method: "ngram" (prompt lookup), "draft_model" (a small model with the same tokenizer, `model`; the bundled
        model's own draft when not given), "self" (the target drafts with `draft_experts` experts per layer: the
        resident ones when offloading, or shadow copies), or "auto": each step the controller picks among the self
        drafter (MoE models; shadow-int4 unless `draft_experts` says otherwise), the draft model (when `model` is
        given, or the bundled one) and prompt lookup, and the draft length, from what it measures (perf/chooser.py).
    num_speculative_tokens: draft length k per step, or "auto": the online controller (perf/controller.py)
        picks k in 1..max_speculative_tokens each step from measured acceptance and step costs, and
        switches to plain decoding while speculation would lose (one controller per batch size, kept
        across requests of an LLM). Greedy output is identical either way;
        seeded sampling is reproducible run to run only with a fixed k (auto's choices follow timings).
    prompt_lookup_max / prompt_lookup_min: the n-gram sizes matched, longest first.
    verify_budget / verify_budget_mass: LOSSY verification expert budget (MoE-Spec, spec/budget.py): each MoE
        layer of a verification forward computes only the top-B experts by aggregate router probability, or
        the smallest set reaching that probability mass; None (default) = lossless. At most one of the two.
    budget_mode: "substitute" (re-pick a token's top-K inside the kept set) or "truncate" (drop its choices
        outside it). budget_decay: a draft token at depth d weighs budget_decay**d in the expert scores.
    tree: a static draft tree, branching factors per depth ([2, 2, 1, 1] or "2,2,1,1": 2 children at depth
        1, each with 2 at depth 2, then one each; at most 64 nodes; spec/tree.py); the draft length is then
        the tree's depth. None (default): chains.
    """
    method: str = "ngram"
    num_speculative_tokens: int | str = 4
    max_speculative_tokens: int = 16         # the largest k "auto" may choose (16: at batch 1 over a throttled
                                             # tier, drafts of ~0.96 acceptance pay up to k = 12-16, docs/benchmarks.md)
    prompt_lookup_max: int = 3
    prompt_lookup_min: int = 1
    model: str | None = None
    draft_experts: int | str | None = None  # self: experts per layer while drafting (default: resident / E/2), or
                                            # "shadow-int4" / "shadow-int8": low-bit copies of every expert
    draft_kv: str = "auto"                  # self: "shared" (drafts on the target's KV, every row in one forward
                                            # per position: spec/self_shared.py), "own" (its own KV cache), "auto"
    draft_top_k: int | None = None          # self: experts per token while drafting (default: the model's K)
    draft_layers: int | None = None         # self: draft with the first L decoder layers only (default: all)
    draft_refresh: str = "hot-temporal"     # self, shared KV: how the N draft experts are chosen: "hot-temporal"
                                            # (last verification's), "hot-global" (a routing profile's, pinned),
                                            # "random" (spec/self_shared.py)
    draft_profile: str | None = None        # the routing profile JSON "hot-global" ranks experts by
    draft_pin: bool = False                 # self, shared KV: pin the draft set in the expert cache
    draft_routing: str = "reroute"          # self: a token takes its top-K inside the draft set ("reroute"), or
                                            # an expert outside becomes its nearest one inside ("substitute")
    verify_budget: int | None = None        # lossy: experts per MoE layer per verification forward
    verify_budget_mass: float | None = None  # lossy: router probability mass kept per MoE layer, in (0, 1]
    budget_mode: str = "substitute"
    budget_decay: float = 1.0
    tree: list[int] | str | None = None     # static draft tree shape; validate() makes it a list

    METHODS = ("ngram", "draft_model", "self", "auto")

    @staticmethod
    def from_dict(d: dict) -> "SpecConfig":
        known = {"method", "num_speculative_tokens", "max_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "model", "draft_experts",
                 "verify_budget", "verify_budget_mass", "budget_mode", "budget_decay", "tree",
                 "draft_top_k", "draft_layers", "draft_routing", "draft_kv", "draft_refresh", "draft_profile",
                 "draft_pin"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MoespecError(f"speculative config: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return SpecConfig(**d).validate()

    def validate(self) -> "SpecConfig":
        if self.method not in self.METHODS:
            raise MoespecError(f"speculative method {self.method!r} is not available; choose one of: "
                               f"{', '.join(self.METHODS)}")
        if isinstance(self.draft_experts, str):
            d = self.draft_experts.strip()
            self.draft_experts = int(d) if d.isdigit() else d
            if isinstance(self.draft_experts, str) and self.draft_experts not in SHADOW_KINDS:
                raise MoespecError(f"draft_experts={d!r} must be a number of experts or one of: "
                                   f"{', '.join(SHADOW_KINDS)}")
        for name in ("draft_experts", "draft_top_k", "draft_layers"):
            v = getattr(self, name)
            if v is not None and not (name == "draft_experts" and isinstance(v, str)) and \
                    (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise MoespecError(f"{name}={v!r} must be a positive integer")
        if self.draft_kv not in ("auto", "shared", "own"):
            raise MoespecError(f"draft_kv={self.draft_kv!r} is not one of: auto, shared, own")
        if self.draft_kv != "auto" and self.method != "self":
            raise MoespecError("draft_kv chooses the self drafter's KV cache: it needs method 'self' (--spec self)")
        if self.shadow is not None and self.method not in ("self", "auto"):
            raise MoespecError("shadow draft experts are the self drafter's: they need method 'self' (--spec self)")
        if self.draft_refresh not in DRAFT_REFRESH:
            raise MoespecError(f"draft_refresh={self.draft_refresh!r} is not one of: {', '.join(DRAFT_REFRESH)}")
        if (self.draft_refresh == "hot-global") != (self.draft_profile is not None):
            raise MoespecError("draft_refresh 'hot-global' ranks experts by a routing profile: give draft_profile "
                               "(--draft-profile, from `moespec profile`)" if self.draft_profile is None else
                               "draft_profile is what draft_refresh 'hot-global' ranks experts by: add it")
        if (self.draft_refresh != "hot-temporal" or self.draft_pin) and (self.method != "self" or self.shadow):
            raise MoespecError("draft_refresh and draft_pin choose the self drafter's cached draft experts: they need "
                               "method 'self' without shadow experts")
        if self.draft_routing not in ("substitute", "reroute"):
            raise MoespecError(f"draft_routing={self.draft_routing!r} is not one of: substitute, reroute")
        if (self.draft_top_k or self.draft_layers or self.draft_routing != "reroute") and self.method != "self":
            raise MoespecError("draft_top_k, draft_layers and draft_routing shape the self drafter's forward: they "
                               "need method 'self' (--spec self)")
        k = self.num_speculative_tokens
        if self.method == "auto":
            # The drafter is chosen per step from measurements (perf/chooser.py); its k too.
            if k not in ("auto", 4):
                raise MoespecError("speculative method 'auto' picks the draft length as well: drop "
                                   "num_speculative_tokens (--draft-len)")
            if self.tree is not None:
                raise MoespecError("speculative method 'auto' drafts chains: drop the tree")
            self.num_speculative_tokens = k = "auto"
            if self.draft_experts is None:
                self.draft_experts = "shadow-int4"
        if isinstance(k, str) and k.strip().isdigit():
            self.num_speculative_tokens = k = int(k)
        if k != "auto" and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 64):
            raise MoespecError(f"num_speculative_tokens={k!r} must be an integer in [1, 64] or 'auto'")
        m = self.max_speculative_tokens
        if not isinstance(m, int) or isinstance(m, bool) or not 1 <= m <= 64:
            raise MoespecError(f"max_speculative_tokens={m!r} must be an integer in [1, 64]")
        if self.tree is not None:
            from .spec.tree import parse_shape
            try:
                self.tree = parse_shape(self.tree, "tree")
            except ValueError as e:
                raise MoespecError(str(e)) from None
            if k == "auto":
                raise MoespecError("tree and num_speculative_tokens 'auto' cannot be combined: a tree's depth is "
                                   "its draft length")
            self.num_speculative_tokens = len(self.tree)
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise MoespecError("prompt_lookup_min must be >= 1 and <= prompt_lookup_max, got "
                               f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")
        self._validate_budget()
        return self

    @property
    def shadow(self) -> str | None:
        """"int4" / "int8" when the self drafter drafts through low-bit copies of every expert, else None."""
        d = self.draft_experts
        return d.removeprefix("shadow-") if isinstance(d, str) else None

    @property
    def adaptive(self) -> bool:
        """The online controller picks k (num_speculative_tokens "auto")."""
        return self.num_speculative_tokens == "auto"

    @property
    def k_max(self) -> int:
        """The longest draft a step may use (sizes the KV slack and the per-position stats)."""
        return self.max_speculative_tokens if self.adaptive else self.num_speculative_tokens

    def _validate_budget(self) -> None:
        b, m = self.verify_budget, self.verify_budget_mass
        if b is not None and m is not None:
            raise MoespecError(f"verify_budget={b!r} and verify_budget_mass={m!r} were both given; "
                               "choose one (--verify-budget or --verify-budget-mass)")
        if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 1):
            raise MoespecError(f"verify_budget={b!r} must be a positive integer (experts per MoE layer)")
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m <= 1):
            raise MoespecError(f"verify_budget_mass={m!r} must be in (0, 1]")
        from .spec.budget import MODES
        if self.budget_mode not in MODES:
            raise MoespecError(f"budget_mode={self.budget_mode!r} is not one of: {', '.join(MODES)}")
        d = self.budget_decay
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1:
            raise MoespecError(f"budget_decay={d!r} must be in (0, 1]")
        if b is None and m is None and (self.budget_mode != "substitute" or d != 1.0):
            raise MoespecError("budget_mode / budget_decay need a verify budget (verify_budget or verify_budget_mass)")

    def budget(self) -> VerifyBudget | None:
        """The verification expert budget as spec/budget.py takes it, or None when verification is lossless."""
        if self.verify_budget is None and self.verify_budget_mass is None:
            return None
        from .spec.budget import VerifyBudget
        return VerifyBudget(self.verify_budget, self.verify_budget_mass, self.budget_mode,
                            float(self.budget_decay)).validate()
