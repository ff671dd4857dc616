"""Per-family reading of a config.json into `ModelDesc` fields (parameter counts and attention shape).

Each family names its MoE fields differently (CONVENTIONS.md): Mixtral / PhiMoE / GraniteMoE / gpt-oss use
`num_local_experts`; Qwen2/3-MoE and OLMoE `num_experts` (transformers 5 writes Qwen3's as `num_local_experts`);
DeepSeek-V2/V3 `n_routed_experts`, `n_shared_experts`, `first_k_dense_replace`. Counts include biases and norms,
so totals land within a fraction of a percent of the published sizes (see tests/test_perf_model.py).
"""
from __future__ import annotations

from .errors import PerfError

MXFP4_BITS = 4.25


def _get(raw: dict, *keys, default=None):
    """The first of `keys` present in `raw` (a positive number), else `default`, else a PerfError naming it."""
    for k in keys:
        if raw.get(k) is not None:
            v = raw[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise PerfError(f"config.json field {k}={v!r} must be a positive number")
            return v
    if default is None:
        raise PerfError(f"config.json ({raw.get('model_type')}) is missing the field {keys[0]!r}")
    return default


def _gqa(raw: dict, D: int, bias_qkv: bool, bias_o: bool, layer_norm: bool = False) -> tuple[int, int, int, int]:
    """(attention params per layer, KV values per token per layer, attention flops per pair, heads)."""
    H = int(_get(raw, "num_attention_heads"))
    KVH = int(_get(raw, "num_key_value_heads", default=H))
    hd = int(_get(raw, "head_dim", default=D // H))
    p = D * H * hd + 2 * D * KVH * hd + H * hd * D
    if bias_qkv:
        p += (H + 2 * KVH) * hd
    if bias_o:
        p += D
    p += (4 if layer_norm else 2) * D          # input + post-attention norms (LayerNorm has a bias too)
    return p, 2 * KVH * hd, 4 * H * hd, H


def _moe_common(raw: dict, experts_key: tuple[str, ...]) -> tuple[int, int]:
    E = int(_get(raw, *experts_key))
    K = int(_get(raw, "num_experts_per_tok", "experts_per_token"))
    if not 0 < K <= E:
        raise PerfError(f"config.json: num_experts_per_tok={K} must be in [1, {E}]")
    return E, K


def parse_family(raw: dict) -> dict:
    if raw.get("model_type") == "llama4" and isinstance(raw.get("text_config"), dict):   # (perf stays standalone:
        raw = {**raw["text_config"], "model_type": "llama4_text"}          # moespec.families.text_config's reading)
    mt = raw.get("model_type")
    if mt not in _FAMILIES:
        raise PerfError(f"unsupported model_type {mt!r} for the performance model; supported: "
                        f"{', '.join(sorted(_FAMILIES))}")
    D, V, L = int(_get(raw, "hidden_size")), int(_get(raw, "vocab_size")), int(_get(raw, "num_hidden_layers"))
    tied = bool(raw.get("tie_word_embeddings", False))
    out = dict(family=mt, layers=L, hidden=D, vocab=V, embed_params=V * D, head_params=V * D, tied=tied,
               full_attn_layers=L, sliding_window=None, expert_bits=None, notes=())
    out.update(_FAMILIES[mt](raw, D, L))
    if raw.get("lm_head_bias"):
        out["head_params"] += V
    return out


def _mixtral_like(raw: dict, D: int, L: int, *, bias: bool = False, layer_norm: bool = False) -> dict:
    E, K = _moe_common(raw, ("num_local_experts", "num_experts"))
    I = int(_get(raw, "intermediate_size"))
    attn, kv, pair, _ = _gqa(raw, D, bias, bias, layer_norm)
    sw = raw.get("sliding_window")
    return dict(moe_layers=L, experts=E, top_k=K, expert_params=3 * D * I, attn_params=attn,
                moe_dense_params=E * D, mlp_params=0, kv_values=kv, attn_pair_flops=pair,
                full_attn_layers=0 if sw else L, sliding_window=sw or None)


def _granite(raw: dict, D: int, L: int) -> dict:
    # GraniteMoE: input_linear [E, 2I, D] + output_linear [E, D, I]; muP multipliers change no sizes.
    return _mixtral_like(raw, D, L)


def _phimoe(raw: dict, D: int, L: int) -> dict:
    return _mixtral_like(raw, D, L, bias=bool(raw.get("attention_bias", False)), layer_norm=True)


def _qwen_moe(raw: dict, D: int, L: int) -> dict:
    mt = raw["model_type"]
    E, K = _moe_common(raw, ("num_experts", "num_local_experts"))
    moe_i = int(_get(raw, "moe_intermediate_size"))
    step = int(raw.get("decoder_sparse_step") or 1)
    dense_ids = set(raw.get("mlp_only_layers") or [])
    n_moe = sum(1 for i in range(L) if i not in dense_ids and (i + 1) % step == 0)
    if mt == "qwen2_moe":
        attn, kv, pair, H = _gqa(raw, D, bool(raw.get("qkv_bias", True)), False)
    else:
        attn, kv, pair, H = _gqa(raw, D, bool(raw.get("attention_bias", False)), bool(raw.get("attention_bias", False)))
        attn += 2 * int(_get(raw, "head_dim", default=D // H))      # q_norm, k_norm per head
    shared_i = int(raw.get("shared_expert_intermediate_size") or 0) if mt == "qwen2_moe" else 0
    shared = 3 * D * shared_i + (D if shared_i else 0)              # shared expert + its sigmoid gate
    sw = raw.get("sliding_window") if raw.get("use_sliding_window") else None
    inter = int(_get(raw, "intermediate_size")) if n_moe < L else 0   # only dense layers use it
    return dict(moe_layers=n_moe, experts=E, top_k=K, expert_params=3 * D * moe_i, attn_params=attn,
                moe_dense_params=E * D + shared, mlp_params=3 * D * inter, kv_values=kv, attn_pair_flops=pair,
                full_attn_layers=0 if sw else L, sliding_window=sw)


def _olmoe(raw: dict, D: int, L: int) -> dict:
    E, K = _moe_common(raw, ("num_experts", "num_local_experts"))
    I = int(_get(raw, "intermediate_size"))
    attn, kv, pair, H = _gqa(raw, D, bool(raw.get("attention_bias", False)), bool(raw.get("attention_bias", False)))
    KVH = int(_get(raw, "num_key_value_heads", default=H))
    hd = int(_get(raw, "head_dim", default=D // H))
    attn += (H + KVH) * hd                                          # q_norm, k_norm over the whole projection
    return dict(moe_layers=L, experts=E, top_k=K, expert_params=3 * D * I, attn_params=attn,
                moe_dense_params=E * D, mlp_params=0, kv_values=kv, attn_pair_flops=pair)


def _deepseek(raw: dict, D: int, L: int) -> dict:
    """MLA attention and DeepSeekMoE. KV counts the compressed cache (kv_lora_rank + qk_rope_head_dim values per
    token per layer) and attention flops the weight-absorbed form, as vLLM and SGLang run it. Example, V2-Lite:
    (512 + 64) values x 2 bytes x 27 layers = 31 KB per token, against 16 x (192 + 128) values uncompressed."""
    E, K = _moe_common(raw, ("n_routed_experts",))
    H = int(_get(raw, "num_attention_heads"))
    nope, rope = int(_get(raw, "qk_nope_head_dim")), int(_get(raw, "qk_rope_head_dim"))
    vdim, kvr = int(_get(raw, "v_head_dim")), int(_get(raw, "kv_lora_rank"))
    qr = raw.get("q_lora_rank")
    q = D * qr + qr + qr * H * (nope + rope) if qr else D * H * (nope + rope)
    attn = q + D * (kvr + rope) + kvr + kvr * H * (nope + vdim) + H * vdim * D + 2 * D
    moe_i, inter = int(_get(raw, "moe_intermediate_size")), int(_get(raw, "intermediate_size"))
    first_dense = int(raw.get("first_k_dense_replace") or 0)
    freq = int(raw.get("moe_layer_freq") or 1)
    n_moe = sum(1 for i in range(L) if i >= first_dense and i % freq == 0)
    shared = 3 * D * moe_i * int(raw.get("n_shared_experts") or 0)
    router = E * D + (E if raw["model_type"] == "deepseek_v3" else 0)   # V3: e_score_correction_bias
    notes = ("KV and attention cost assume the compressed MLA cache (latent + rope key) with absorbed weights",)
    if raw.get("num_nextn_predict_layers"):
        notes += ("the multi-token-prediction module (num_nextn_predict_layers) is not counted",)
    return dict(moe_layers=n_moe, experts=E, top_k=K, expert_params=3 * D * moe_i, attn_params=attn,
                moe_dense_params=router + shared, mlp_params=3 * D * inter, kv_values=kvr + rope,
                attn_pair_flops=2 * H * (kvr + rope) + 2 * H * kvr, notes=notes)


def _glm4_moe(raw: dict, D: int, L: int) -> dict:
    """GQA attention (q/k/v bias with attention_bias, per-head q/k norm with use_qk_norm) and DeepSeekMoE-style
    experts: first_k_dense_replace dense layers, n_shared_experts shared experts, a router with a correction bias."""
    E, K = _moe_common(raw, ("n_routed_experts", "num_local_experts"))
    bias = bool(raw.get("attention_bias", False))
    attn, kv, pair, H = _gqa(raw, D, bias, False)
    if raw.get("use_qk_norm"):
        attn += 2 * int(_get(raw, "head_dim", default=D // H))
    moe_i = int(_get(raw, "moe_intermediate_size"))
    first_dense = int(raw.get("first_k_dense_replace", 1) or 0)
    shared = 3 * D * moe_i * int(raw.get("n_shared_experts", 1) or 0)
    notes = ("the multi-token-prediction module (num_nextn_predict_layers) is not counted",) \
        if raw.get("num_nextn_predict_layers") else ()
    return dict(moe_layers=L - first_dense, experts=E, top_k=K, expert_params=3 * D * moe_i, attn_params=attn,
                moe_dense_params=E * D + E + shared,
                mlp_params=3 * D * int(_get(raw, "intermediate_size")) if first_dense else 0,
                kv_values=kv, attn_pair_flops=pair, notes=notes)


def _ernie4_5_moe(raw: dict, D: int, L: int) -> dict:
    """GQA attention and MoE layers from moe_layer_start_index to moe_layer_end_index every moe_layer_interval, with
    moe_num_shared_experts shared experts and a router correction bias."""
    E, K = int(_get(raw, "moe_num_experts", "num_experts")), int(_get(raw, "moe_k", "num_experts_per_tok"))
    if not 0 < K <= E:
        raise PerfError(f"config.json: moe_k={K} must be in [1, {E}]")
    attn, kv, pair, _ = _gqa(raw, D, False, False)
    moe_i = int(_get(raw, "moe_intermediate_size"))
    start, interval = int(raw.get("moe_layer_start_index", 1)), int(raw.get("moe_layer_interval", 1) or 1)
    end = raw.get("moe_layer_end_index", -1)
    end = L - 1 if end in (-1, None) else int(end)
    n_moe = sum(1 for i in range(L) if (i + 1) % interval == 0 and start <= i <= end)
    shared = 3 * D * moe_i * int(raw.get("moe_num_shared_experts") or 0)
    return dict(moe_layers=n_moe, experts=E, top_k=K, expert_params=3 * D * moe_i, attn_params=attn,
                moe_dense_params=E * D + E + shared,
                mlp_params=3 * D * int(_get(raw, "intermediate_size")) if n_moe < L else 0,
                kv_values=kv, attn_pair_flops=pair)


def _gpt_oss(raw: dict, D: int, L: int) -> dict:
    """gpt-oss: biased attention with per-head sinks, alternating sliding (128) / full layers, experts with biases
    stored as MXFP4 (4.25 bits per parameter: 4-bit values + an 8-bit scale per 32) unless the config says the
    checkpoint is not quantised. Attention, router, embedding and head stay in bf16."""
    E, K = _moe_common(raw, ("num_local_experts", "num_experts"))
    I = int(_get(raw, "intermediate_size"))
    attn, kv, pair, H = _gqa(raw, D, bool(raw.get("attention_bias", True)), bool(raw.get("attention_bias", True)))
    attn += H                                                        # attention sinks
    types = raw.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(L)]
    full = sum(1 for t in types if t == "full_attention")
    q = raw.get("quantization_config") or {}
    mx = q.get("quant_method") == "mxfp4"
    notes = ("experts in MXFP4: 4.25 bits per parameter (biases counted at the same rate)",) if mx else ()
    return dict(moe_layers=L, experts=E, top_k=K, expert_params=3 * D * I + 2 * I + D, attn_params=attn,
                moe_dense_params=E * D + E, mlp_params=0, kv_values=kv, attn_pair_flops=pair,
                full_attn_layers=full, sliding_window=int(raw.get("sliding_window") or 128),
                expert_bits=MXFP4_BITS if mx else None, notes=notes)


def _llama4(raw: dict, D: int, L: int) -> dict:
    """Llama 4's text decoder: MoE layers (moe_layers, else every interleave_moe_layer_step-th) with a shared expert,
    dense ones of intermediate_size_mlp; the rope layers attend within chunks of attention_chunk_size (counted as a
    window of that size), the no-rope ones over the whole context."""
    E, K = _moe_common(raw, ("num_local_experts",))
    I = int(_get(raw, "intermediate_size"))
    attn, kv, pair, _ = _gqa(raw, D, bool(raw.get("attention_bias")), bool(raw.get("attention_bias")))
    step = int(raw.get("interleave_moe_layer_step", 1) or 1)
    moe = raw.get("moe_layers")
    n_moe = len(moe) if moe is not None else len(range(step - 1, L, step))
    interval = int(raw.get("no_rope_layer_interval", 4) or 4)
    rope = raw.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(L)]
    chunk = raw.get("attention_chunk_size")
    return dict(moe_layers=n_moe, experts=E, top_k=K, expert_params=3 * D * I, attn_params=attn,
                moe_dense_params=E * D + 3 * D * I,
                mlp_params=3 * D * int(_get(raw, "intermediate_size_mlp")) if n_moe < L else 0,
                kv_values=kv, attn_pair_flops=pair, full_attn_layers=L - sum(map(bool, rope)) if chunk else L,
                sliding_window=int(chunk) if chunk else None,
                notes=("chunked attention counted as a window of attention_chunk_size",) if chunk else ())


def _dense(raw: dict, D: int, L: int) -> dict:
    """Dense decoder families, for draft models (llama, mistral, qwen2, qwen3)."""
    mt = raw["model_type"]
    bias = bool(raw.get("attention_bias", False)) or mt == "qwen2"
    attn, kv, pair, H = _gqa(raw, D, bias, bool(raw.get("attention_bias", False)) and mt != "qwen2")
    if mt == "qwen3":
        attn += 2 * int(_get(raw, "head_dim", default=D // H))
    sw = raw.get("sliding_window") if (mt == "mistral" or raw.get("use_sliding_window")) else None
    return dict(moe_layers=0, experts=0, top_k=0, expert_params=0, attn_params=attn, moe_dense_params=0,
                mlp_params=3 * D * int(_get(raw, "intermediate_size")), kv_values=kv, attn_pair_flops=pair,
                full_attn_layers=0 if sw else L, sliding_window=sw or None)


_FAMILIES = {
    "mixtral": _mixtral_like, "qwen2_moe": _qwen_moe, "qwen3_moe": _qwen_moe, "olmoe": _olmoe,
    "deepseek_v2": _deepseek, "deepseek_v3": _deepseek, "glm4_moe": _glm4_moe, "ernie4_5_moe": _ernie4_5_moe,
    "gpt_oss": _gpt_oss, "phimoe": _phimoe, "llama4_text": _llama4,
    "granitemoe": _granite, "llama": _dense, "mistral": _dense, "qwen2": _dense, "qwen3": _dense,
}
