"""Build `Weights` and expert pools from a checkpoint, for every supported family and layout.

Expert tensors arrive per expert (`experts.{e}.w1/w3/w2` in Mixtral, `experts.{e}.gate_proj/up_proj/
down_proj` in Qwen/OLMoE) or fused 3-D as transformers 5 holds them (`experts.gate_up_proj [E, 2I, D]`,
`experts.down_proj [E, D, I]`); both end in one contiguous blob per expert. Tensors are read one at a time
(one expert's at a time for fused layouts), converted and, with a QuantConfig, quantized before the next is
read, so loading peaks near the size of what it keeps.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..errors import MoespecError
from ..experts.pool import ExpertPool
from ..experts.pools import make_pool
from ..models.decoder import AttnWeights, LayerWeights, Weights
from ..models.mla import MLAWeights
from ..models.layout import LayoutChooser, as_layout
from ..models.moe import ClampedGLU, MLPWeights, MoEWeights, silu_glu
from ..progress import progress
from ..quant.scheme import QuantConfig
from .checkpoint import Checkpoint
from .gpt_oss import fill_gpt_oss_experts

PER_EXPERT = {"mixtral": ("w1", "w3", "w2"), "phimoe": ("w1", "w3", "w2")}
# Fused [E, 2I, D] / [E, D, I] expert tensors under the MoE block: transformers 5's names, and a family's own.
FUSED = [("experts.gate_up_proj", "experts.down_proj"), ("input_linear.weight", "output_linear.weight")]
# Families whose fused experts are stored for x @ W: gate_up [E, D, 2I] (gate columns, then up), down [E, I, D].
FUSED_XW = {"llama4_text"}
ROUTERS = ("gate.weight", "router.weight", "router.layer.weight")   # GraniteMoE: router.layer (hub) or router
QWEN_NAMES = ("gate_proj", "up_proj", "down_proj")


class DenseMatrices:
    """Stores each dense weight matrix in its fastest layout here, or quantized when the config says so
    (a shape the int4 kernel cannot take falls back to int8)."""

    def __init__(self, lay: LayoutChooser, quant: QuantConfig | None):
        self.lay, self.quant = lay, quant if quant is not None and quant.dense else None

    def __call__(self, w: torch.Tensor, name: str = "weight"):
        if self.quant is None:
            return self.lay.apply(w)
        from ..quant.weights import quantize_weight
        method = self.quant.method
        if method == "int4" and (w.shape[1] % self.quant.group_size or w.shape[0] % 16):
            method = "int8"
        return quantize_weight(w, method, self.quant.group_size, name)


def load_weights(ck: Checkpoint, cfg: ModelConfig, dtype: torch.dtype, device="cpu", auto_layout: bool = True,
                 experts: bool = True, pack: bool | None = None, quant: QuantConfig | None = None,
                 show_progress: bool | None = None, sample_bytes: int = 64 << 20) -> tuple[Weights, dict[int, ExpertPool]]:
    """experts=False skips the routed experts (an offloading provider reads them itself): pools is {}.
    pack: prepack bf16 weights for oneDNN (models/packed.py; None = where it is faster here).
    quant: weight-only quantization of the experts (and, with quant.dense, of the other matrices)."""
    c = cfg
    lay = LayoutChooser(dtype, device, auto_layout, pack, sample_bytes)
    dense = DenseMatrices(lay, quant)

    def get(name, shape=None):
        return ck.get(name, shape).to(dtype=dtype, device=device)

    D = c.hidden_size
    embed = as_layout(get("model.embed_tokens.weight", (c.vocab_size, D)), False)   # aligned: also the tied head
    if ck.has("lm_head.weight"):
        lm_head = dense(get("lm_head.weight", (c.vocab_size, D)), "lm_head.weight")
    elif c.tie_word_embeddings:
        # A prepacked or quantized head is its own copy; the lookup keeps the dense embedding.
        lm_head = dense(embed, "lm_head") if (lay.packs(tuple(embed.shape)) or dense.quant) else embed
    else:
        raise MoespecError(f"checkpoint {ck.folder} is missing tensor 'lm_head.weight' (tie_word_embeddings is false)")
    layers, pools = [], {}
    label = "loading " + ck.folder.name + (f" ({quant.tag})" if quant is not None else "")
    with progress(c.num_layers, label, show_progress) as tick:
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            attn = _attention(get, ck, c, p + "self_attn.", dense)
            lw = LayerWeights(get(p + "input_layernorm.weight", (D,)), get(p + "post_attention_layernorm.weight", (D,)), attn)
            if c.norm == "layer":
                lw.ln1_b, lw.ln2_b = get(p + "input_layernorm.bias", (D,)), get(p + "post_attention_layernorm.bias", (D,))
            if c.moe_layers[i]:
                lw.moe, pool = _moe(get, ck, c, p, dtype, device, lay, dense, quant, experts)
                if pool is not None:
                    pools[i] = pool
            else:
                lw.mlp = _mlp(get, p + ("feed_forward." if ck.has(p + "feed_forward.gate_proj.weight") else "mlp."),
                              c.intermediate_size, D, dense)
            layers.append(lw)
            tick()
    w = Weights(embed, get("model.norm.weight", (D,)), lm_head, layers)
    if c.norm == "layer":
        w.norm_b = get("model.norm.bias", (D,))
    if c.lm_head_bias:
        w.lm_head_b = get("lm_head.bias", (c.vocab_size,))
    return w, pools


def rope_order(r: int, width: int) -> torch.Tensor:
    """The row order that turns rope on interleaved pairs of the first r of `width` dimensions into plain rope:
    evens, then odds, then the dimensions rope does not touch."""
    return torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2), torch.arange(r, width)])


def _attention(get, ck: Checkpoint, c: ModelConfig, p: str, dense: DenseMatrices) -> AttnWeights | MLAWeights:
    if c.attention == "mla":
        return _mla(get, c, p, dense)
    D, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    # Rope on interleaved pairs (ERNIE 4.5) becomes plain rope: each head's rows reordered evens then odds, queries
    # and keys alike (their products are unchanged; the rotation computes the same numbers in the other order).
    order = rope_order(c.rope_dim, c.head_dim) if c.rope_interleave else None

    def heads(w, n):
        return w if order is None else w.view(n, c.head_dim, *w.shape[1:])[:, order].reshape(w.shape)
    wqkv = torch.cat([heads(get(p + "q_proj.weight", (q, D)), c.num_heads),
                      heads(get(p + "k_proj.weight", (kv, D)), c.num_kv_heads), get(p + "v_proj.weight", (kv, D))])
    bqkv = None
    if c.qkv_bias:
        bqkv = torch.cat([heads(get(p + "q_proj.bias", (q,)), c.num_heads),
                          heads(get(p + "k_proj.bias", (kv,)), c.num_kv_heads), get(p + "v_proj.bias", (kv,))])
    aw = AttnWeights(dense(wqkv, p + "qkv_proj"), dense(get(p + "o_proj.weight", (D, q)), p + "o_proj"), bqkv,
                     get(p + "o_proj.bias", (D,)) if c.o_bias else None)
    if c.attention_sinks:                       # gpt-oss: one sink logit per head, kept in float32 like the cache
        aw.sinks = ck.get(p + "sinks", (c.num_heads,)).to(dtype=torch.float32, device=wqkv.device)
    if c.qk_norm == "head":
        aw.q_norm, aw.k_norm = get(p + "q_norm.weight", (c.head_dim,)), get(p + "k_norm.weight", (c.head_dim,))
        if order is not None:
            aw.q_norm, aw.k_norm = aw.q_norm[order], aw.k_norm[order]
        aw.qk_norm = torch.cat([aw.q_norm.expand(c.num_heads, -1), aw.k_norm.expand(c.num_kv_heads, -1)])
    elif c.qk_norm == "full":
        aw.q_norm, aw.k_norm = get(p + "q_norm.weight", (q,)), get(p + "k_norm.weight", (kv,))
    return aw


def _mla(get, c: ModelConfig, p: str, dense: DenseMatrices) -> MLAWeights:
    """DeepSeek's attention weights (models/mla.py): the products of x fused into one; kv_b_proj [H * (N + Vd), C]
    split per head into the key part absorbed into the query and the value part, kept in float32. Rope on
    interleaved pairs becomes plain rope: the rows making each rope part are reordered evens then odds (queries and
    keys alike: their products are unchanged, and the rotation computes the same numbers in the other order)."""
    D, H, N, R, C, Vd = c.hidden_size, c.num_heads, c.qk_nope_head_dim, c.rotary_dim, c.kv_lora_rank, c.v_head_dim
    order = rope_order(R, R) if c.rope_interleave else torch.arange(R)

    def q_rows(w):                       # [H * (N + R), in]: each head's rope rows reordered
        w = w.view(H, N + R, -1)
        return torch.cat([w[:, :N], w[:, N:][:, order]], 1).reshape(H * (N + R), -1)
    kv_a = get(p + "kv_a_proj_with_mqa.weight", (C + R, D))
    kv_a = torch.cat([kv_a[:C], kv_a[C:][order]])
    Q = c.q_lora_rank
    wq = get(p + "q_a_proj.weight", (Q, D)) if Q else q_rows(get(p + "q_proj.weight", (H * (N + R), D)))
    bx = None
    if c.qkv_bias:                       # attention_bias: the query LoRA, the latent and rope key, the output
        b = get(p + "kv_a_proj_with_mqa.bias", (C + R,))
        bx = torch.cat([get(p + "q_a_proj.bias", (Q,)) if Q else b.new_zeros(wq.shape[0]), b[:C], b[C:][order]])
    kv_b = get(p + "kv_b_proj.weight", (H * (N + Vd), C)).view(H, N + Vd, C).float()
    w = MLAWeights(dense(torch.cat([wq, kv_a]), p + "x_proj"), get(p + "kv_a_layernorm.weight", (C,)),
                   kv_b[:, :N].contiguous(), kv_b[:, N:].transpose(1, 2).contiguous(),
                   dense(get(p + "o_proj.weight", (D, H * Vd)), p + "o_proj"), bx=bx,
                   bo=get(p + "o_proj.bias", (D,)) if c.qkv_bias else None)
    if Q:
        w.q_a_norm = get(p + "q_a_layernorm.weight", (Q,))
        w.wq_b = dense(q_rows(get(p + "q_b_proj.weight", (H * (N + R), Q))), p + "q_b_proj")
    return w


def _mlp(get, p: str, inter: int, D: int, dense: DenseMatrices) -> MLPWeights:
    w13 = torch.cat([get(p + "gate_proj.weight", (inter, D)), get(p + "up_proj.weight", (inter, D))])
    return MLPWeights(dense(w13, p + "gate_up_proj"), dense(get(p + "down_proj.weight", (D, inter)), p + "down_proj"))


def _moe_block(ck: Checkpoint, p: str) -> str:
    # Mixtral and GraniteMoE checkpoints say block_sparse_moe, Llama 4's feed_forward; transformers 5's fused save mlp.
    return p + next((b for b in ("block_sparse_moe.", "feed_forward.") if any(ck.has(p + b + r) for r in ROUTERS)),
                    "mlp.")


def _router(ck: Checkpoint, block: str) -> str:
    return block + next((r for r in ROUTERS if ck.has(block + r)), ROUTERS[0])


def _moe(get, ck: Checkpoint, c: ModelConfig, p: str, dtype, device, lay: LayoutChooser, dense: DenseMatrices,
         quant: QuantConfig | None, experts: bool = True) -> tuple[MoEWeights, ExpertPool | None]:
    D, E, I = c.hidden_size, c.num_experts, c.moe_intermediate_size
    block = _moe_block(ck, p)
    mw = MoEWeights(ck.get(_router(ck, block), (E, D)).to(dtype=torch.float32, device=device))  # routing.py
    bias = next((block + n for n in ("gate.e_score_correction_bias", "moe_statics.e_score_correction_bias",
                                     "gate.moe_statics.e_score_correction_bias") if ck.has(block + n)), None)
    # (DeepSeek-V3 / GLM-4.5; ERNIE 4.5 in its hub and transformers 5 names, [1, E])
    if bias is not None:
        mw.bias = ck.get(bias).reshape(E).to(dtype=torch.float32, device=device)
    if c.shared_expert_intermediate_size:
        if c.shared_expert_gated:               # Qwen2-MoE: one shared expert behind a sigmoid gate
            mw.shared = _mlp(get, block + "shared_expert.", c.shared_expert_intermediate_size, D, dense)
            mw.shared_gate = get(block + "shared_expert_gate.weight", (1, D))
        else:                                   # GLM-4.5 / DeepSeek: the shared experts as one wider MLP
            name = "shared_experts." if ck.has(block + "shared_experts.gate_proj.weight") else "shared_expert."  # Llama 4
            mw.shared = _mlp(get, block + name, c.shared_expert_intermediate_size, D, dense)
    if c.router_bias:
        mw.router_bias = ck.get(block + "router.bias", (E,)).to(dtype=torch.float32, device=device)
    mw.act, mw.weight_input = expert_act(c), c.weight_expert_input
    if not experts:
        return mw, None
    layout = expert_layout(c, dtype, device, lay.auto, quant, lay)
    pool = make_pool(layout, E, device)
    _fill_experts(get, ck, c, block, pool)
    if not layout.get("quant") and lay.packs((2 * I, D)) and lay.packs((D, I)):
        from ..models.packed import PackedExperts
        return mw, PackedExperts(pool)
    return mw, pool


def expert_act(cfg: ModelConfig):
    """The experts' activation on gate+up [N, 2I] -> [N, I]: SwiGLU, or gpt-oss's clamped one."""
    return ClampedGLU(cfg.swiglu_limit, cfg.swiglu_alpha) if cfg.expert_act == "clamped" else silu_glu


def expert_layout(cfg: ModelConfig, dtype: torch.dtype, device="cpu", auto_layout: bool = True,
                  quant: QuantConfig | None = None, lay: LayoutChooser | None = None) -> dict:
    """The storage layout load_weights gives this model's expert pools here (ExpertPool.layout's keys): the
    (t13, t2) orders a float pool is stored in, or the quantization of a quantized one: `quant`'s, else the
    checkpoint's own (gpt-oss's MXFP4, kept as stored)."""
    D, I = cfg.hidden_size, cfg.moe_intermediate_size
    base = {"hidden": D, "inter": I, "dtype": str(dtype).removeprefix("torch.")}
    method = quant.method if quant is not None else cfg.expert_quant
    if method is not None:
        from ..experts.quant_pool import QuantExpertPool
        group = quant.group_size if quant is not None else 0
        return QuantExpertPool(0, D, I, dtype, method, group, device, bias=cfg.expert_bias).layout
    lay = lay or LayoutChooser(dtype, device, auto_layout)
    out = {**base, "t13": lay.colmajor((2 * I, D)), "t2": lay.colmajor((D, I))}
    return {**out, "bias": True} if cfg.expert_bias else out


def load_expert_pool(ck: Checkpoint, cfg: ModelConfig, layer: int, layout: dict, experts: list[int] | None = None,
                     device="cpu"):
    """Experts of one MoE layer (all E by default) in one pool of that `layout`, slot j = experts[j] (what an
    expert store packs: the RAM tier a layer at a time, the packed file an expert at a time)."""
    c = cfg
    dtype = getattr(torch, layout["dtype"])

    def get(name, shape=None):
        return ck.get(name, shape).to(dtype=dtype, device=device)

    ids = list(range(c.num_experts)) if experts is None else experts
    pool = make_pool(layout, len(ids), device)
    _fill_experts(get, ck, c, _moe_block(ck, f"model.layers.{layer}."), pool, ids)
    return pool


def _fill_experts(get, ck: Checkpoint, c: ModelConfig, block: str, pool, ids: list[int] | None = None) -> None:
    """Expert ids[j] into slot j, one expert read at a time (quantized pools quantize each as it lands)."""
    D, E, I = c.hidden_size, c.num_experts, c.moe_intermediate_size
    dtype, dev = getattr(torch, pool.layout["dtype"]), pool.blob.device
    if c.model_type == "gpt_oss":
        return fill_gpt_oss_experts(ck, c, block, pool, range(E) if ids is None else ids)
    for j, e in enumerate(range(E) if ids is None else ids):
        fused = next(((a, b) for a, b in FUSED if ck.has(block + a)), None)
        if fused is not None and c.model_type in FUSED_XW:
            gu = ck.get_rows(block + fused[0], e, e + 1, (E, D, 2 * I))[0].t().to(dtype=dtype, device=dev)
            down = ck.get_rows(block + fused[1], e, e + 1, (E, I, D))[0].t().to(dtype=dtype, device=dev)
            pool.pack(j, gu[:I], gu[I:], down)
        elif fused is not None:
            gu = ck.get_rows(block + fused[0], e, e + 1, (E, 2 * I, D))[0].to(dtype=dtype, device=dev)
            down = ck.get_rows(block + fused[1], e, e + 1, (E, D, I))[0].to(dtype=dtype, device=dev)
            pool.pack(j, gu[:I], gu[I:], down)
        else:
            g, u, d = PER_EXPERT.get(c.model_type, QWEN_NAMES)
            q = f"{block}experts.{e}."
            pool.pack(j, get(q + g + ".weight", (I, D)), get(q + u + ".weight", (I, D)), get(q + d + ".weight", (D, I)))
