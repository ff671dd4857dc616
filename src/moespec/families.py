"""How each family's config.json maps onto ModelConfig: one function per model_type giving its MoE fields (and any
field of its own: routing, partial rotary, latent attention, multipliers), and a `Family` record with its q/k norm
kind and biases. `ModelConfig.from_hf` (config.py) reads the fields every family shares; docs/architecture.md says how
to add a family.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from .errors import MoespecError


class Fields:
    """config.json's fields, read with checks that name the field."""

    def __init__(self, raw: dict, mt: str):
        self.raw, self.mt = raw, mt

    def need(self, key: str, *alts: str):
        """A required positive integer (the first of key, *alts present)."""
        for k in (key, *alts):
            if self.raw.get(k) is not None:
                v = self.raw[k]
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    raise MoespecError(f"config.json field {k}={v!r} must be a positive integer")
                return v
        raise MoespecError(f"config.json ({self.mt}) is missing the field {key!r}")

    def optional(self, key: str, default, kind=int):
        """An optional field: absent or null is `default`; present, it must be a positive number of its kind."""
        v = self.raw.get(key)
        if v is None:
            return default
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and (kind is float or
                                                                                      isinstance(v, int))):
            raise MoespecError(f"config.json field {key}={v!r} must be a positive "
                               f"{'integer' if kind is int else 'number'}")
        return v


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
    if rp["rope_type"] not in ("default", "linear", "yarn", "llama3", "longrope"):
        raise MoespecError(f"config.json: rope type {rp['rope_type']!r} is not supported "
                           "(supported: default, linear, yarn, llama3, longrope)")
    return rp


def _dense(f: Fields, layers: int) -> dict:
    return {"intermediate_size": f.need("intermediate_size"), "moe_layers": (False,) * layers}


def _mixtral(f: Fields, layers: int) -> dict:
    return {"num_experts": f.need("num_local_experts"), "top_k": f.need("num_experts_per_tok"),
            "moe_intermediate_size": f.need("intermediate_size"), "norm_topk_prob": True,
            "moe_layers": (True,) * layers}


def _olmoe(f: Fields, layers: int) -> dict:
    return {"num_experts": f.need("num_experts", "num_local_experts"), "top_k": f.need("num_experts_per_tok"),
            "moe_intermediate_size": f.need("intermediate_size"),
            "norm_topk_prob": bool(f.raw.get("norm_topk_prob", False)), "moe_layers": (True,) * layers}


def _qwen_moe(f: Fields, layers: int) -> dict:
    """Qwen2-MoE / Qwen3-MoE: MoE every decoder_sparse_step layers but those in mlp_only_layers (dense)."""
    raw = f.raw
    step = raw.get("decoder_sparse_step", 1) or 1
    dense = set(raw.get("mlp_only_layers") or [])
    moe_layers = tuple((i not in dense) and (i + 1) % step == 0 for i in range(layers))
    out = {"num_experts": f.need("num_experts", "num_local_experts"), "top_k": f.need("num_experts_per_tok"),
           "moe_intermediate_size": f.need("moe_intermediate_size"),
           "norm_topk_prob": bool(raw.get("norm_topk_prob", False)), "moe_layers": moe_layers}
    if not all(moe_layers):
        out["intermediate_size"] = f.need("intermediate_size")
    if f.mt == "qwen2_moe":
        if raw.get("use_sliding_window"):
            raise MoespecError("config.json: use_sliding_window=true is not supported for qwen2_moe yet")
        out["shared_expert_intermediate_size"] = raw.get("shared_expert_intermediate_size") or 0
    return out


def _check_first_dense(first, layers: int) -> None:
    """first_k_dense_replace: the dense layers before the first MoE layer."""
    if not isinstance(first, int) or isinstance(first, bool) or not 0 <= first <= layers:
        raise MoespecError(f"config.json field first_k_dense_replace={first!r} must be an integer in [0, {layers}]")


def _check_groups(E: int, K: int, groups: int, topk_group: int) -> None:
    """Group-limited routing must be able to choose K experts inside its topk_group groups."""
    if E % groups or topk_group > groups or K > topk_group * (E // groups):
        raise MoespecError(f"config.json: n_group={groups} / topk_group={topk_group} cannot route {K} of {E} experts "
                           "(experts must split evenly into groups, and the chosen groups must hold top_k experts)")


def _glm4_moe(f: Fields, layers: int) -> dict:
    """GLM-4.5: the first first_k_dense_replace layers dense, sigmoid routing over groups with a correction bias,
    n_shared_experts ungated shared experts, partial rotary, optional per-head q/k norm."""
    raw = f.raw
    first = raw.get("first_k_dense_replace", 1)
    _check_first_dense(first, layers)
    E, K, I = f.need("n_routed_experts", "num_local_experts"), f.need("num_experts_per_tok"), f.need("moe_intermediate_size")
    groups, topk_group = f.optional("n_group", 1), f.optional("topk_group", 1)
    _check_groups(E, K, groups, topk_group)
    shared = raw.get("n_shared_experts", 1) or 0
    factor = float((raw.get("rope_parameters") or {}).get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.5)))
    head_dim = raw.get("head_dim") or f.need("hidden_size") // f.need("num_attention_heads")
    out = {"num_experts": E, "top_k": K, "moe_intermediate_size": I, "moe_layers": tuple(i >= first for i in range(layers)),
           "norm_topk_prob": bool(raw.get("norm_topk_prob", True)), "scoring": "sigmoid", "n_group": groups,
           "topk_group": topk_group, "routed_scaling_factor": float(raw.get("routed_scaling_factor", 1.0)),
           "shared_expert_intermediate_size": I * shared, "shared_expert_gated": False,
           "rotary_dim": int(head_dim * factor), "qk_norm": "head" if raw.get("use_qk_norm") else "none"}
    if first:
        out["intermediate_size"] = f.need("intermediate_size")
    return out


def _deepseek(f: Fields, layers: int) -> dict:
    """DeepSeek-V2 / V3: multi-head latent attention, dense layers before first_k_dense_replace (and off the
    moe_layer_freq beat), shared experts; V2 routes by softmax (group-limited greedy with n_group), V3 by sigmoid
    scores with a correction bias inside groups."""
    raw, v3 = f.raw, f.mt == "deepseek_v3"
    first, freq = raw.get("first_k_dense_replace") or 0, raw.get("moe_layer_freq") or 1
    _check_first_dense(first, layers)
    E, K, I = f.need("n_routed_experts", "num_local_experts"), f.need("num_experts_per_tok"), f.need("moe_intermediate_size")
    groups, topk_group = f.optional("n_group", 1), f.optional("topk_group", 1)
    if not v3 and raw.get("topk_method", "greedy") == "greedy":
        groups = topk_group = 1
    _check_groups(E, K, groups, topk_group)
    nope, rope, v = f.need("qk_nope_head_dim"), f.need("qk_rope_head_dim"), f.need("v_head_dim")
    rp = rope_params(raw)
    scale = (nope + rope) ** -0.5
    if rp["rope_type"] == "yarn" and rp.get("mscale_all_dim"):       # the attention's share of YaRN's scaling
        m = 0.1 * float(rp["mscale_all_dim"]) * math.log(float(rp["factor"])) + 1.0 if float(rp["factor"]) > 1 else 1.0
        scale *= m * m
    moe_layers = tuple(i >= first and i % freq == 0 for i in range(layers))
    out = {"num_experts": E, "top_k": K, "moe_intermediate_size": I, "moe_layers": moe_layers,
           "norm_topk_prob": bool(raw.get("norm_topk_prob", True)) if v3 else False,
           "scoring": "sigmoid" if v3 else "softmax", "group_score": "top2" if v3 else "max",
           "n_group": groups, "topk_group": topk_group,
           "routed_scaling_factor": float(raw.get("routed_scaling_factor", 2.5 if v3 else 1.0)),
           "shared_expert_intermediate_size": I * (raw.get("n_shared_experts") or 0), "shared_expert_gated": False,
           "attention": "mla", "q_lora_rank": raw.get("q_lora_rank") or 0, "kv_lora_rank": f.need("kv_lora_rank"),
           "qk_nope_head_dim": nope, "v_head_dim": v, "rotary_dim": rope, "head_dim": nope + rope,
           "rope_interleave": bool(raw.get("rope_interleave", True)) if v3 else True, "softmax_scale": scale,
           "num_kv_heads": f.need("num_attention_heads")}
    if not all(moe_layers):
        out["intermediate_size"] = f.need("intermediate_size")
    return out


def _granitemoe(f: Fields, layers: int) -> dict:
    """GraniteMoE: Mixtral's layout with multipliers (embeddings, residual branches, attention scale, logits) and
    softmax over the top-k logits (the same as renormalising the top-k of a full softmax)."""
    out = {"num_experts": f.need("num_local_experts"), "top_k": f.need("num_experts_per_tok"),
           "moe_intermediate_size": f.need("intermediate_size"), "norm_topk_prob": True,
           "moe_layers": (True,) * layers}
    for key, name in (("embedding_multiplier", "embedding_multiplier"), ("residual_multiplier", "residual_multiplier"),
                      ("logits_scaling", "logits_scaling"), ("attention_multiplier", "softmax_scale")):
        out[name] = float(f.optional(key, 1.0, float))
    return out


def _ernie4_5_moe(f: Fields, layers: int) -> dict:
    """ERNIE 4.5: MoE layers from moe_layer_start_index to moe_layer_end_index every moe_layer_interval, softmax
    routing whose choice adds a correction bias, ungated shared experts, rope on interleaved pairs."""
    raw = f.raw
    if raw.get("use_bias"):
        raise MoespecError("config.json: use_bias=true (biases on every projection) is not supported for ernie4_5_moe")
    start, interval = raw.get("moe_layer_start_index", 1), raw.get("moe_layer_interval", 1) or 1
    end = raw.get("moe_layer_end_index", -1)
    end = layers - 1 if end in (-1, None) else end
    I = f.need("moe_intermediate_size")
    moe_layers = tuple((i + 1) % interval == 0 and start <= i <= end for i in range(layers))
    out = {"num_experts": f.need("moe_num_experts", "num_experts"), "top_k": f.need("moe_k", "num_experts_per_tok"),
           "moe_intermediate_size": I, "moe_layers": moe_layers, "norm_topk_prob": True,
           "shared_expert_intermediate_size": I * (raw.get("moe_num_shared_experts") or 0),
           "shared_expert_gated": False, "rope_interleave": True}
    if not all(moe_layers):
        out["intermediate_size"] = f.need("intermediate_size")
    return out


def _gpt_oss(f: Fields, layers: int) -> dict:
    """gpt-oss: sliding-window and full attention layers (layer_types) with a sink logit per head, a biased router
    whose top-k logits are softmaxed (the renormalised top-k of a full softmax), experts with biases and a clamped
    SwiGLU, gate and up interleaved in the checkpoint (the loader splits them), stored in MXFP4 by its
    quantization_config."""
    raw = f.raw
    types = raw.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    if len(types) != layers or not set(types) <= {"sliding_attention", "full_attention"}:
        raise MoespecError(f"config.json field layer_types must list {layers} of 'sliding_attention' / "
                           f"'full_attention'; got {types!r}")
    window = f.optional("sliding_window", None)
    quant = (raw.get("quantization_config") or {}).get("quant_method")
    if quant not in (None, "mxfp4"):
        raise MoespecError(f"config.json: quantization_config quant_method={quant!r} is not supported for gpt_oss "
                           "(supported: mxfp4, or none)")
    return {"num_experts": f.need("num_local_experts"), "top_k": f.need("num_experts_per_tok", "experts_per_token"),
            "moe_intermediate_size": f.need("intermediate_size"), "norm_topk_prob": True,
            "moe_layers": (True,) * layers, "attention_sinks": True, "expert_act": "clamped",
            "layer_windows": tuple(window if t == "sliding_attention" else None for t in types),
            "swiglu_limit": float(f.optional("swiglu_limit", 7.0, float)),
            "swiglu_alpha": float(f.optional("swiglu_alpha", 1.702, float)),
            "expert_bias": True, "router_bias": True, "expert_quant": quant}


def _phimoe(f: Fields, layers: int) -> dict:
    """PhiMoE: Mixtral's layout with sparsemixer routing (two experts, each chosen among those within a relative
    2 * router_jitter_noise of the best remaining one and weighted by a softmax over them), LayerNorms with biases, a
    biased LM head and attention biases. LongRoPE runs with its short factors, so the context is the original one
    (transformers switches every position to the long factors past it, re-encoding the whole sequence)."""
    raw = f.raw
    K = f.need("num_experts_per_tok")
    if K != 2:
        raise MoespecError(f"config.json: phimoe routes exactly 2 experts (sparsemixer); num_experts_per_tok={K}")
    out = {"num_experts": f.need("num_local_experts"), "top_k": K, "moe_intermediate_size": f.need("intermediate_size"),
           "moe_layers": (True,) * layers, "scoring": "sparsemixer",
           "router_jitter": float(raw.get("router_jitter_noise", 0.01)), "norm": "layer",
           "lm_head_bias": bool(raw.get("lm_head_bias", False))}
    rp = rope_params(raw)
    if rp["rope_type"] == "longrope":
        orig = rp.get("original_max_position_embeddings") or raw.get("original_max_position_embeddings")
        if not isinstance(orig, int) or orig <= 0:
            raise MoespecError("config.json: longrope needs original_max_position_embeddings")
        full = raw.get("max_position_embeddings") or orig
        out["rope"] = {**rp, "original_max_position_embeddings": orig, "factor": rp.get("factor") or full / orig}
        out["max_position_embeddings"] = min(orig, full)
    return out


def _llama4(f: Fields, layers: int) -> dict:
    """Llama 4's text decoder: MoE layers from moe_layers (else every interleave_moe_layer_step-th), dense ones of
    intermediate_size_mlp; a top-k sigmoid router whose score scales each chosen expert's input; one ungated shared
    expert. Layers marked 1 in no_rope_layers rotate q and k (interleaved pairs), L2-normalise them after (use_qk_norm)
    and attend within chunks of attention_chunk_size; the others have no rope and scale their queries up with the
    position (attn_temperature_tuning)."""
    raw = f.raw
    moe = raw.get("moe_layers")
    step = raw.get("interleave_moe_layer_step", 1) or 1
    moe = set(range(step - 1, layers, step) if moe is None else moe)
    interval = raw.get("no_rope_layer_interval", 4) or 4
    rope = raw.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
    types = raw.get("layer_types") or ["chunked_attention" if r else "full_attention" for r in rope]
    if len(rope) != layers or len(types) != layers:
        raise MoespecError(f"config.json fields no_rope_layers and layer_types must list {layers} layers")
    chunk = f.optional("attention_chunk_size", None)
    I = f.need("intermediate_size")
    moe_layers = tuple(i in moe for i in range(layers))
    out = {"num_experts": f.need("num_local_experts"), "top_k": f.need("num_experts_per_tok"),
           "moe_intermediate_size": I, "moe_layers": moe_layers, "scoring": "sigmoid", "norm_topk_prob": False,
           "shared_expert_intermediate_size": I, "shared_expert_gated": False, "weight_expert_input": True,
           "rope_layers": tuple(bool(r) for r in rope), "rope_interleave": True,
           "qk_norm": "l2" if raw.get("use_qk_norm", True) else "none",
           "layer_chunks": tuple(chunk if t == "chunked_attention" else None for t in types) if chunk else (),
           "attn_temperature": (float(f.optional("floor_scale", 8192, float)), float(raw.get("attn_scale", 0.1)))
           if raw.get("attn_temperature_tuning", True) else None}
    if not all(moe_layers):
        out["intermediate_size"] = f.need("intermediate_size_mlp")
    return out


def text_config(raw: dict) -> dict:
    """The text decoder's config.json fields: a multimodal Llama 4 nests them under text_config."""
    if raw.get("model_type") == "llama4" and isinstance(raw.get("text_config"), dict):
        return {**raw["text_config"], "model_type": "llama4_text",
                "tie_word_embeddings": raw.get("tie_word_embeddings", raw["text_config"].get("tie_word_embeddings"))}
    return raw


def _attention_bias(raw: dict) -> bool:
    return bool(raw.get("attention_bias", False))


def _attention_bias_on(raw: dict) -> bool:
    """attention_bias, true when absent (gpt-oss)."""
    return bool(raw.get("attention_bias", True))


def _qwen2_bias(raw: dict) -> bool:
    return bool(raw.get("qkv_bias", True))


def _no_bias(raw: dict) -> bool:
    return False


@dataclass(frozen=True)
class Family:
    """One model_type: its MoE fields (experts(fields, layers) -> ModelConfig fields; a dense family has none),
    its q/k norm kind and biases. The forward and the loader read only ModelConfig."""
    experts: Callable[[Fields, int], dict]
    qk_norm: str = "none"
    qkv_bias: Callable[[dict], bool] = _attention_bias
    o_bias: Callable[[dict], bool] = _attention_bias
    sliding_window: bool = False


FAMILIES = {
    "mixtral": Family(_mixtral, o_bias=_no_bias, sliding_window=True),
    "qwen2_moe": Family(_qwen_moe, qkv_bias=_qwen2_bias, o_bias=_no_bias),
    "qwen3_moe": Family(_qwen_moe, qk_norm="head"),
    "olmoe": Family(_olmoe, qk_norm="full"),
    "glm4_moe": Family(_glm4_moe, o_bias=_no_bias),
    "granitemoe": Family(_granitemoe),
    "ernie4_5_moe": Family(_ernie4_5_moe, qkv_bias=_no_bias, o_bias=_no_bias),
    "phimoe": Family(_phimoe),
    "llama4_text": Family(_llama4),
    "gpt_oss": Family(_gpt_oss, qkv_bias=_attention_bias_on, o_bias=_attention_bias_on),
    "deepseek_v2": Family(_deepseek),
    "deepseek_v3": Family(_deepseek),
    "qwen3": Family(_dense, qk_norm="head"),
    "qwen2": Family(_dense, qkv_bias=_qwen2_bias, o_bias=_no_bias),
    "llama": Family(_dense),
}
