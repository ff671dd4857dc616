"""Build `Weights` and expert pools from a checkpoint, for every supported family and layout.

Expert tensors arrive per expert (`experts.{e}.w1/w3/w2` in Mixtral, `experts.{e}.gate_proj/up_proj/
down_proj` in Qwen/OLMoE) or fused 3-D as transformers 5 holds them (`experts.gate_up_proj [E, 2I, D]`,
`experts.down_proj [E, D, I]`); both end in one contiguous blob per expert.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..errors import MoespecError
from ..experts.pool import ExpertPool
from ..models.decoder import AttnWeights, LayerWeights, Weights
from ..models.layout import LayoutChooser, as_layout
from ..models.moe import MLPWeights, MoEWeights
from .checkpoint import Checkpoint

PER_EXPERT = {"mixtral": ("w1", "w3", "w2")}
QWEN_NAMES = ("gate_proj", "up_proj", "down_proj")


def load_weights(ck: Checkpoint, cfg: ModelConfig, dtype: torch.dtype, device="cpu", auto_layout: bool = True,
                 experts: bool = True, pack: bool | None = None) -> tuple[Weights, dict[int, ExpertPool]]:
    """experts=False skips the routed experts (an offloading provider reads them itself): pools is {}.
    pack: prepack bf16 weights for oneDNN (models/packed.py; None = where it is faster here)."""
    c = cfg
    lay = LayoutChooser(dtype, device, auto_layout, pack)

    def get(name, shape=None):
        return ck.get(name, shape).to(dtype=dtype, device=device)

    D = c.hidden_size
    embed = as_layout(get("model.embed_tokens.weight", (c.vocab_size, D)), False)   # aligned: also the tied head
    if ck.has("lm_head.weight"):
        lm_head = lay.apply(get("lm_head.weight", (c.vocab_size, D)))
    elif c.tie_word_embeddings:
        # A prepacked head is its own copy (V x D more memory); the lookup keeps the dense embedding.
        lm_head = lay.apply(embed) if lay.packs(tuple(embed.shape)) else embed
    else:
        raise MoespecError(f"checkpoint {ck.folder} is missing tensor 'lm_head.weight' (tie_word_embeddings is false)")
    layers, pools = [], {}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        attn = _attention(get, ck, c, p + "self_attn.", lay)
        lw = LayerWeights(get(p + "input_layernorm.weight", (D,)), get(p + "post_attention_layernorm.weight", (D,)), attn)
        if c.moe_layers[i]:
            lw.moe, pool = _moe(get, ck, c, p, dtype, device, lay, experts)
            if pool is not None:
                pools[i] = pool
        else:
            lw.mlp = _mlp(get, p + "mlp.", c.intermediate_size, D, lay)
        layers.append(lw)
    return Weights(embed, get("model.norm.weight", (D,)), lm_head, layers), pools


def _attention(get, ck: Checkpoint, c: ModelConfig, p: str, lay: LayoutChooser) -> AttnWeights:
    D, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    wqkv = torch.cat([get(p + "q_proj.weight", (q, D)), get(p + "k_proj.weight", (kv, D)),
                      get(p + "v_proj.weight", (kv, D))])
    bqkv = None
    if c.qkv_bias:
        bqkv = torch.cat([get(p + "q_proj.bias", (q,)), get(p + "k_proj.bias", (kv,)), get(p + "v_proj.bias", (kv,))])
    aw = AttnWeights(lay.apply(wqkv), lay.apply(get(p + "o_proj.weight", (D, q))), bqkv, get(p + "o_proj.bias", (D,)) if c.o_bias else None)
    if c.qk_norm == "head":
        aw.q_norm, aw.k_norm = get(p + "q_norm.weight", (c.head_dim,)), get(p + "k_norm.weight", (c.head_dim,))
        aw.qk_norm = torch.cat([aw.q_norm.expand(c.num_heads, -1), aw.k_norm.expand(c.num_kv_heads, -1)])
    elif c.qk_norm == "full":
        aw.q_norm, aw.k_norm = get(p + "q_norm.weight", (q,)), get(p + "k_norm.weight", (kv,))
    return aw


def _mlp(get, p: str, inter: int, D: int, lay: LayoutChooser) -> MLPWeights:
    w13 = torch.cat([get(p + "gate_proj.weight", (inter, D)), get(p + "up_proj.weight", (inter, D))])
    return MLPWeights(lay.apply(w13), lay.apply(get(p + "down_proj.weight", (D, inter))))


def _moe_block(ck: Checkpoint, p: str) -> str:
    # Mixtral checkpoints say block_sparse_moe; transformers 5's fused save says mlp.
    return p + ("block_sparse_moe." if ck.has(p + "block_sparse_moe.gate.weight") else "mlp.")


def _moe(get, ck: Checkpoint, c: ModelConfig, p: str, dtype, device, lay: LayoutChooser, experts: bool = True
         ) -> tuple[MoEWeights, ExpertPool | None]:
    D, E, I = c.hidden_size, c.num_experts, c.moe_intermediate_size
    block = _moe_block(ck, p)
    mw = MoEWeights(get(block + "gate.weight", (E, D)))
    if c.shared_expert_intermediate_size:
        mw.shared = _mlp(get, block + "shared_expert.", c.shared_expert_intermediate_size, D, lay)
        mw.shared_gate = get(block + "shared_expert_gate.weight", (1, D))
    if not experts:
        return mw, None
    pool = ExpertPool(E, D, I, dtype, device, t13=lay.colmajor((2 * I, D)), t2=lay.colmajor((D, I)))
    _fill_experts(get, ck, c, block, pool)
    if lay.packs((2 * I, D)) and lay.packs((D, I)):
        from ..models.packed import PackedExperts
        return mw, PackedExperts(pool)
    return mw, pool


def expert_layout(cfg: ModelConfig, dtype: torch.dtype, device="cpu", auto_layout: bool = True) -> dict:
    """The (t13, t2) storage flags load_weights would give this model's expert pools here."""
    lay, D, I = LayoutChooser(dtype, device, auto_layout), cfg.hidden_size, cfg.moe_intermediate_size
    return {"t13": lay.colmajor((2 * I, D)), "t2": lay.colmajor((D, I))}


def load_expert_pool(ck: Checkpoint, cfg: ModelConfig, layer: int, dtype: torch.dtype, t13: bool = False,
                     t2: bool = False, device="cpu") -> ExpertPool:
    """All E experts of one MoE layer in one pool (what an expert store packs, one layer at a time)."""
    c = cfg

    def get(name, shape=None):
        return ck.get(name, shape).to(dtype=dtype, device=device)

    pool = ExpertPool(c.num_experts, c.hidden_size, c.moe_intermediate_size, dtype, device, t13=t13, t2=t2)
    _fill_experts(get, ck, c, _moe_block(ck, f"model.layers.{layer}."), pool)
    return pool


def _fill_experts(get, ck: Checkpoint, c: ModelConfig, block: str, pool: ExpertPool) -> None:
    D, E, I = c.hidden_size, c.num_experts, c.moe_intermediate_size
    if ck.has(block + "experts.gate_up_proj"):
        pool.w13.copy_(get(block + "experts.gate_up_proj", (E, 2 * I, D)))
        pool.w2.copy_(get(block + "experts.down_proj", (E, D, I)))
    else:
        g, u, d = PER_EXPERT.get(c.model_type, QWEN_NAMES)
        for e in range(E):
            q = f"{block}experts.{e}."
            pool.pack(e, get(q + g + ".weight", (I, D)), get(q + u + ".weight", (I, D)), get(q + d + ".weight", (D, I)))
