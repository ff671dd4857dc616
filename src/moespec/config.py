"""Model configuration read straight from a Hugging Face `config.json`.

One dataclass covers every supported family; `ModelConfig.from_hf` maps each family's field
names onto it (Mixtral's `num_local_experts`, Qwen's `num_experts` / `moe_intermediate_size`, ...)
and rejects what the engine cannot run with an error naming the field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MoespecError
from .families import FAMILIES, Fields, rope_params, text_config

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
    qk_norm: str = "none"          # "none" | "head" (per head, Qwen3) | "full" (whole projection, OLMoE) | "l2"
                                   # (per head, no weight, after rope, rope layers only: Llama 4)
    clip_qkv: float | None = None
    sliding_window: int | None = None
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    scoring: str = "softmax"       # router scores: "softmax" | "sigmoid" (with a correction bias: GLM-4.5, DeepSeek-V3)
    n_group: int = 1               # sigmoid routing chooses inside topk_group of n_group expert groups
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    intermediate_size: int = 0     # dense MLP layers
    shared_expert_intermediate_size: int = 0
    shared_expert_gated: bool = True   # a sigmoid gate on the shared expert (Qwen2-MoE) or none (GLM-4.5)
    rotary_dim: int = 0            # rope over the first rotary_dim of each head (partial rotary); 0 = all of it
    group_score: str = "top2"      # how expert groups are ranked (models/routing.py)
    # Multi-head latent attention (DeepSeek-V2/V3): the cache keeps a kv_lora_rank latent and a shared rope key
    attention: str = "gqa"         # "gqa" | "mla"
    q_lora_rank: int = 0           # 0: a plain query projection
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # rope on interleaved pairs of dimensions (DeepSeek)
    softmax_scale: float | None = None   # None: head_dim ** -0.5
    # GraniteMoE's multipliers: of the embeddings, of each block's output before the residual add, 1 / of the logits
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    # gpt-oss: per-layer sliding windows (None = full attention; empty: sliding_window for every layer), a learned
    # sink logit per head in each softmax, experts with biases and a clamped SwiGLU, a router bias, MXFP4 experts
    layer_windows: tuple[int | None, ...] = ()
    attention_sinks: bool = False
    expert_act: str = "silu"       # "silu" | "clamped" (gpt-oss: swiglu_limit, swiglu_alpha)
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    expert_bias: bool = False
    router_bias: bool = False
    expert_quant: str | None = None  # how the checkpoint stores the experts: None (as its dtype) | "mxfp4"
    # PhiMoE: LayerNorms (with biases) instead of RMSNorms, a biased LM head; scoring "sparsemixer" (router_jitter)
    norm: str = "rms"              # "rms" | "layer"
    lm_head_bias: bool = False
    router_jitter: float = 0.0
    # Llama 4: layers with rope (empty: all), per-layer attention chunks (None: the whole context; empty: none),
    # (floor_scale, attn_scale) of the no-rope layers' query temperature, expert inputs scaled by the router's weight
    rope_layers: tuple[bool, ...] = ()
    layer_chunks: tuple[int | None, ...] = ()
    attn_temperature: tuple[float, float] | None = None
    weight_expert_input: bool = False
    moe_layers: tuple[bool, ...] = field(default_factory=tuple)
    hidden_act: str = "silu"
    eos_token_id: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0 and any(self.moe_layers)

    @property
    def kv_values_per_token(self) -> int:
        """Values one token keeps in one layer's KV cache: keys and values of every KV head, or MLA's latent and rope
        key."""
        if self.attention == "mla":
            return self.kv_lora_rank + self.rotary_dim
        return 2 * self.num_kv_heads * self.head_dim

    def span(self, layer: int) -> tuple[int | None, int | None]:
        """What `layer`'s attention sees: (sliding window, chunk), None for no limit."""
        return (self.layer_windows[layer] if self.layer_windows else self.sliding_window,
                self.layer_chunks[layer] if self.layer_chunks else None)

    def has_rope(self, layer: int) -> bool:
        return self.rope_layers[layer] if self.rope_layers else True

    @property
    def rope_dim(self) -> int:
        return self.rotary_dim or self.head_dim

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, m in enumerate(self.moe_layers) if m]

    @staticmethod
    def from_folder(path: str | Path) -> "ModelConfig":
        return ModelConfig.from_hf(read_config_json(Path(path) / "config.json"))

    @staticmethod
    def from_hf(raw: dict) -> "ModelConfig":
        raw = text_config(raw)
        mt = raw.get("model_type")
        if mt not in FAMILIES:
            raise MoespecError(f"unsupported model_type {mt!r}; supported: {', '.join(sorted(FAMILIES))}")
        fam, f = FAMILIES[mt], Fields(raw, mt)
        layers = f.need("num_hidden_layers")
        moe = fam.experts(f, layers)
        if moe.get("num_experts") and not 0 < moe["top_k"] <= moe["num_experts"]:
            raise MoespecError(f"config.json: num_experts_per_tok={moe['top_k']} must be in [1, {moe['num_experts']}]")
        moe.setdefault("intermediate_size", raw.get("intermediate_size") or 0)
        eos = raw.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        fields = dict(
            model_type=mt, num_layers=layers, **_attention_fields(f),
            vocab_size=f.need("vocab_size"), rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=raw.get("max_position_embeddings") or 4096,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)), rope=rope_params(raw),
            qkv_bias=fam.qkv_bias(raw), o_bias=fam.o_bias(raw), qk_norm=fam.qk_norm, clip_qkv=raw.get("clip_qkv"),
            sliding_window=raw.get("sliding_window") if fam.sliding_window else None,
            hidden_act="silu", eos_token_id=eos, bos_token_id=raw.get("bos_token_id"))
        return ModelConfig(**{**fields, **moe})        # a family's own fields win (q/k norm, partial rotary, ...)


def _attention_fields(f: Fields) -> dict:
    """Sizes every family shares (hidden size, heads, head dim), checked; and the checks of optional sizes."""
    raw = f.raw
    hidden, heads = f.need("hidden_size"), f.need("num_attention_heads")
    for key in ("max_position_embeddings", "num_key_value_heads", "head_dim", "intermediate_size",
                "moe_intermediate_size", "vocab_size"):
        f.optional(key, None)
    for key in ("rms_norm_eps", "rope_theta"):
        f.optional(key, None, float)
    if f.optional("max_position_embeddings", 4096) > 1 << 24:
        raise MoespecError(f"config.json field max_position_embeddings={raw['max_position_embeddings']} is "
                           "implausible (more than 16M positions)")
    kv_heads = raw.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise MoespecError(f"config.json: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    if raw.get("hidden_act", "silu") not in ("silu", "swish"):
        raise MoespecError(f"config.json: hidden_act={raw.get('hidden_act')!r} is not supported (only silu)")
    return {"hidden_size": hidden, "num_heads": heads, "num_kv_heads": kv_heads,
            "head_dim": raw.get("head_dim") or hidden // heads}


def read_config_json(p: Path) -> dict:
    """A config.json as a dict; a missing or malformed file is a MoespecError naming it."""
    if not p.is_file():
        raise MoespecError(f"no config.json at {p}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise MoespecError(f"{p} is not valid JSON: {e}") from None


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
        load the experts the draft's router picks, for verification; spec_decode/prefetch.py) | "auto" (draft
        when self-speculating, else next-layer).
    prefetch_cutoff: draft prefetch covers the first L MoE layers (an int) or an L chosen from
        measured load and draft times ("auto").
    prefetch_min_prob: next-layer prefetch loads only experts the next router gives at least this
        probability (a wrong guess costs a read and evicts an expert LRU would have kept; on the reference
        model guesses above 0.2 were right far more often than all guesses). 0 = every top-k guess.
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

