"""What a model costs to run, computed from its `config.json` alone (no weights needed).

`ModelDesc` holds parameter counts by kind (attention, routed expert, shared/router, dense MLP, embedding, head)
and the attention shape; bytes are derived from the weight precision, so one description serves bf16, fp32 and
quantised experts. Worked example, Mixtral-8x7B (hidden 4096, intermediate 14336, 32 layers, 8 experts, top-2):
one expert is 3 x 4096 x 14336 = 176.2 M params (352 MB in bf16); 32 x 8 experts = 45.1 B of the 46.7 B total;
active per token = 32 x 2 x 176.2 M + attention 1.34 B + head 0.13 B = 12.75 B (the published 12.9 B
also counts the embedding).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .errors import PerfError

CONFIG_DIR = Path(__file__).parent / "configs"
DTYPE_BYTES = {"float32": 4.0, "fp32": 4.0, "bfloat16": 2.0, "bf16": 2.0, "float16": 2.0, "fp16": 2.0,
               "float8": 1.0, "fp8": 1.0}


@dataclass(frozen=True)
class ModelDesc:
    """Parameter counts and attention shape of one model; bytes follow from `dtype_bytes` and `expert_bits`."""
    name: str
    family: str
    layers: int
    moe_layers: int
    experts: int                 # E routed experts per MoE layer (0 for a dense model)
    top_k: int                   # K experts per token
    hidden: int
    vocab: int
    expert_params: int           # one routed expert (gate + up + down, with biases if any)
    attn_params: int             # per layer: attention projections, their biases and norms, the layer norms
    moe_dense_params: int        # per MoE layer besides the routed experts: router, shared experts, shared gate
    mlp_params: int              # per dense (non-MoE) layer: its MLP
    embed_params: int
    head_params: int             # the LM head matmul (read every forward, even when tied to the embedding)
    tied: bool                   # head shares the embedding's storage
    kv_values: int               # cached values per token per layer (K and V of all KV heads; MLA: latent + rope key)
    attn_pair_flops: int         # flops per (query token, context token) pair per layer: scores + weighted sum
    full_attn_layers: int        # layers attending to the whole context; the rest use `sliding_window`
    sliding_window: int | None = None
    dtype_bytes: float = 2.0     # non-expert weights (and KV cache unless kv_dtype_bytes is set)
    expert_bits: float | None = None   # bits per expert parameter; None means 8 x dtype_bytes
    kv_dtype_bytes: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    # -- derived sizes ------------------------------------------------------------------------------------------
    @property
    def dense_layers(self) -> int:
        return self.layers - self.moe_layers

    @property
    def expert_bytes(self) -> float:
        bits = self.expert_bits if self.expert_bits is not None else 8 * self.dtype_bytes
        return self.expert_params * bits / 8

    @property
    def kv_bytes_per_value(self) -> float:
        return self.kv_dtype_bytes if self.kv_dtype_bytes is not None else self.dtype_bytes

    @property
    def moe_layer_dense_bytes(self) -> float:
        """Bytes of an MoE layer read once per forward whatever the routing (attention, router, shared experts)."""
        return (self.attn_params + self.moe_dense_params) * self.dtype_bytes

    @property
    def dense_layer_bytes(self) -> float:
        return (self.attn_params + self.mlp_params) * self.dtype_bytes

    @property
    def head_bytes(self) -> float:
        return self.head_params * self.dtype_bytes

    @property
    def expert_total_bytes(self) -> float:
        return self.moe_layers * self.experts * self.expert_bytes

    @property
    def nonexpert_bytes(self) -> float:
        """Everything that is not a routed expert: what must stay in fast memory."""
        p = (self.layers * self.attn_params + self.moe_layers * self.moe_dense_params
             + self.dense_layers * self.mlp_params + self.embed_params + (0 if self.tied else self.head_params))
        return p * self.dtype_bytes

    @property
    def total_bytes(self) -> float:
        return self.nonexpert_bytes + self.expert_total_bytes

    @property
    def params_total(self) -> int:
        return (self.layers * self.attn_params + self.moe_layers * (self.moe_dense_params
                + self.experts * self.expert_params) + self.dense_layers * self.mlp_params
                + self.embed_params + (0 if self.tied else self.head_params) + self.hidden)   # + final norm

    @property
    def active_params_per_token(self) -> int:
        """Matmul parameters one token uses (the embedding is a lookup, so it is left out)."""
        return (self.layers * self.attn_params + self.moe_layers * (self.moe_dense_params
                + self.top_k * self.expert_params) + self.dense_layers * self.mlp_params + self.head_params)

    def kv_len(self, positions: float, full: bool) -> float:
        return positions if full or self.sliding_window is None else min(positions, self.sliding_window)

    def kv_bytes(self, context: int, batch: int = 1) -> float:
        """KV cache bytes for `batch` sequences of `context` tokens (sliding layers keep only their window)."""
        per_pos = self.kv_values * self.kv_bytes_per_value * batch
        sliding = self.layers - self.full_attn_layers
        return per_pos * (self.full_attn_layers * context + sliding * self.kv_len(context, False))

    def with_precision(self, dtype_bytes: float | None = None, expert_bits: float | None = None) -> "ModelDesc":
        """The same model stored differently, e.g. `desc.with_precision(2.0, 4.5)` for bf16 + 4.5-bit experts.
        Without `expert_bits`, experts keep a native quantisation (gpt-oss MXFP4) or follow `dtype_bytes`."""
        return replace(self, dtype_bytes=self.dtype_bytes if dtype_bytes is None else dtype_bytes,
                       expert_bits=self.expert_bits if expert_bits is None else expert_bits)

    def summary(self) -> dict:
        """Plain numbers for JSON output and tables."""
        d = {k: v for k, v in asdict(self).items() if k != "notes"}
        d.update(params_total=self.params_total, params_active_per_token=self.active_params_per_token,
                 bytes_per_expert=self.expert_bytes, bytes_experts=self.expert_total_bytes,
                 bytes_nonexpert=self.nonexpert_bytes, bytes_total=self.total_bytes,
                 kv_bytes_per_token=self.kv_bytes(1), notes=list(self.notes))
        return d

    @staticmethod
    def from_config(raw: dict, name: str | None = None, dtype_bytes: float | None = None,
                    expert_bits: float | None = None) -> "ModelDesc":
        """Build from a Hugging Face config.json dict; precision defaults to the config's `torch_dtype`/`dtype`."""
        from .families import parse_family
        if not isinstance(raw, dict):
            raise PerfError("a model config must be a JSON object (the contents of config.json)")
        fields = parse_family(raw)
        if dtype_bytes is None:
            dt = str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16")
            dtype_bytes = DTYPE_BYTES.get(dt, 2.0)
        nm = name or raw.get("_source") or raw.get("_name_or_path") or raw["model_type"]
        desc = ModelDesc(name=nm, dtype_bytes=dtype_bytes, **fields)
        return desc.with_precision(expert_bits=expert_bits) if expert_bits is not None else desc

    @staticmethod
    def from_file(path: str | Path, **kw) -> "ModelDesc":
        """From a config.json file or a checkpoint folder holding one."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        # Read here rather than through moespec.config: perf stays standalone (stdlib, numpy, errors).
        if not p.is_file():
            raise PerfError(f"no config.json at {path}")
        try:
            raw = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise PerfError(f"{p} is not valid JSON: {e}") from None
        kw.setdefault("name", raw.get("_source") or p.parent.name or p.stem)
        return ModelDesc.from_config(raw, **kw)


def known_names() -> list[str]:
    """Names of the bundled configs: `mixtral-8x7b`, `qwen3-30b-a3b`, ..."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def known_model(name: str, **kw) -> ModelDesc:
    """A bundled config by short name (`qwen3-30b-a3b`) or Hugging Face id (`Qwen/Qwen3-30B-A3B`), any case."""
    want = name.strip().lower()
    for p in CONFIG_DIR.glob("*.json"):
        raw = json.loads(p.read_text())
        if want in (p.stem.lower(), str(raw.get("_source", "")).lower(),
                    str(raw.get("_source", "")).lower().rsplit("/", 1)[-1]):
            return ModelDesc.from_config(raw, name=raw.get("_source", p.stem), **kw)
    raise PerfError(f"unknown model {name!r}; bundled configs: {', '.join(known_names())} "
                    "(or pass a config.json / checkpoint folder)")
