"""Sizes of a model computed from its config alone (no weights needed)."""
from __future__ import annotations

from .config import ModelConfig


def describe(cfg: ModelConfig, bytes_per_param: float = 4.0, expert_bytes: int | None = None,
             matrix_bytes_per_param: float | None = None) -> dict:
    """Parameter counts and byte sizes: total, per expert, dense (non-expert), active per token.

    expert_bytes: one expert's stored size when it is not params x bytes_per_param (quantized experts);
    matrix_bytes_per_param: bytes per parameter of the dense weight matrices when they are quantized (the
    embedding, norms and routers keep bytes_per_param)."""
    D, hd = cfg.hidden_size, cfg.head_dim
    attn = D * (cfg.num_heads + 2 * cfg.num_kv_heads) * hd + cfg.num_heads * hd * D
    if cfg.attention == "mla":                 # query (or its LoRA), latent + rope key, kv_b_proj, output, norms
        H, Q, C, R = cfg.num_heads, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.rotary_dim
        q = D * Q + Q + Q * H * hd if Q else D * H * hd
        attn = q + D * (C + R) + C + C * H * (cfg.qk_nope_head_dim + cfg.v_head_dim) + H * cfg.v_head_dim * D
        if cfg.qkv_bias:
            attn += (Q if Q else 0) + C + R + D
    else:
        attn += (cfg.num_heads + 2 * cfg.num_kv_heads) * hd if cfg.qkv_bias else 0
        attn += D if cfg.o_bias else 0
    if cfg.qk_norm == "head":
        attn += 2 * hd
    elif cfg.qk_norm == "full":
        attn += (cfg.num_heads + cfg.num_kv_heads) * hd
    attn += cfg.num_heads if cfg.attention_sinks else 0
    expert = 3 * D * cfg.moe_intermediate_size + (2 * cfg.moe_intermediate_size + D if cfg.expert_bias else 0)
    dense_mlp = 3 * D * cfg.intermediate_size
    shared = 3 * D * cfg.shared_expert_intermediate_size + \
        (D if cfg.shared_expert_intermediate_size and cfg.shared_expert_gated else 0)     # Qwen2-MoE's gate
    n_moe = sum(cfg.moe_layers)
    per_layer_fixed = attn + (4 * D if cfg.norm == "layer" else 2 * D)
    embed = cfg.vocab_size * D
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * D
    dense = (embed + head + (2 * D if cfg.norm == "layer" else D) + (cfg.vocab_size if cfg.lm_head_bias else 0)
             + cfg.num_layers * per_layer_fixed + (cfg.num_layers - n_moe) * dense_mlp
             + n_moe * (shared + cfg.num_experts * (D + (1 if cfg.router_bias else 0))))
    experts_total = n_moe * cfg.num_experts * expert
    active = dense - embed + n_moe * cfg.top_k * expert   # the embedding is a lookup, not a matmul
    per_expert = int(expert * bytes_per_param) if expert_bytes is None else expert_bytes
    bytes_dense = int(dense * bytes_per_param) if matrix_bytes_per_param is None else \
        int(embed * bytes_per_param + (dense - embed) * matrix_bytes_per_param)
    experts_bytes = n_moe * cfg.num_experts * per_expert
    return {
        "family": cfg.model_type, "layers": cfg.num_layers, "moe_layers": n_moe, "experts": cfg.num_experts,
        "top_k": cfg.top_k, "hidden_size": D, "vocab_size": cfg.vocab_size,
        "params_total": dense + experts_total, "params_dense": dense, "params_experts": experts_total,
        "params_per_expert": expert, "params_active_per_token": active,
        "bytes_per_expert": per_expert, "bytes_experts": experts_bytes,
        "bytes_dense": bytes_dense, "bytes_total": bytes_dense + experts_bytes,
        # what the KV cache keeps per token: keys and values of every KV head, or MLA's latent and rope key
        "kv_values_per_token": cfg.num_layers * cfg.kv_values_per_token,
    }


def model_sizes(path, cfg: ModelConfig, dtype: str, quant) -> dict:
    """describe() at the precision a run would use: the resolved dtype, quantized experts and dense matrices, plus
    the checkpoint's dtype and the quantization (what `moespec inspect` prints)."""
    from .loading import checkpoint_dtype, resolve_dtype
    dt = resolve_dtype(dtype, path)
    es = {"float32": 4, "bfloat16": 2, "float16": 2}[str(dt).removeprefix("torch.")]
    expert_bytes = matrix = None
    if quant is not None or cfg.expert_quant:        # quantized here, or stored quantized (gpt-oss's MXFP4)
        from .experts.pools import layout_blob_bytes
        from .loading.build import expert_layout
        expert_bytes = layout_blob_bytes(expert_layout(cfg, dt, quant=quant)) if cfg.is_moe else None
    if quant is not None:
        if quant.dense:
            matrix = 1.0 if quant.method == "int8" else 0.5 + 4 / quant.group_size
    ck = checkpoint_dtype(path)
    return {**describe(cfg, es, expert_bytes, matrix), "checkpoint_dtype": str(ck).removeprefix("torch.") if ck else None,
            "dtype": str(dt).removeprefix("torch."), **(quant.describe() if quant else {"quantize": "none"}),
            "lossy": quant is not None}
