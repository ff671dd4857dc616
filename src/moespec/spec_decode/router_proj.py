"""SP-MoE with a separate draft model: the draft's hidden states through the target's routers.

A draft model has no routers of its own, and its hidden size differs from the target's (the bundled draft: 128
vs 256). What SP-MoE needs from it is, per draft token, a guess of the experts each target MoE layer will route
that token to. We fit, per target MoE layer l, a linear map W_l [H_d + 1, E] from the draft's final normed
hidden state at a position (plus a bias) to the target router's logits at the same position, by ridge
regression on a corpus both models read teacher-forced. The guess is the top-K of h W_l. It is a projection to
the router's logits rather than to the target's hidden state: E outputs instead of D per layer, fitted directly
on what is ranked.

The fit takes seconds on the bundled pair (which ships its projection beside the draft) and is cached per
(target routers, draft weights) pair under $XDG_CACHE_HOME/moespec/router-projection/ for any other pair.
Held-out top-K recall and precision are kept in the file's metadata (`moespec inspect` prints them).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import MoespecError

FORMAT = "moespec-router-projection"
FILE = "router_projection.safetensors"


class RouterProjection:
    def __init__(self, weights: dict[int, torch.Tensor], top_k: int, meta: dict):
        self.w, self.top_k, self.meta = weights, top_k, meta        # MoE layer -> [H_d + 1, E] float32

    def picks(self, hidden: torch.Tensor) -> dict[int, torch.Tensor]:
        """hidden [N, H_d] (the draft's final normed states) -> per MoE layer the guessed experts [N, K]."""
        x = torch.nn.functional.pad(hidden.float(), (0, 1), value=1.0)
        return {layer: torch.topk(x @ w, self.top_k, dim=-1).indices for layer, w in self.w.items()}

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file
        save_file({f"layer.{i}": w.contiguous() for i, w in self.w.items()}, str(path),
                  metadata={"format": FORMAT, "meta": json.dumps(self.meta)})


def router_signature(target) -> str:
    """Identifies the target's routers (what the projection predicts): a hash of their weights."""
    h = hashlib.sha256()
    for i in target.cfg.moe_layer_ids:
        h.update(target.w.layers[i].moe.router.float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def draft_signature(draft) -> str:
    h = hashlib.sha256()
    h.update(draft.w.embed.float().contiguous().numpy().tobytes()[:1 << 20])
    h.update(draft.w.norm.float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_projection(path: str | Path, target, draft) -> RouterProjection | None:
    """The projection in `path` if it was fitted for these routers and this draft's width, else None."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            md = f.metadata() or {}
            meta = json.loads(md.get("meta", "{}"))
            if md.get("format") != FORMAT or meta.get("target_routers") != router_signature(target) \
                    or meta.get("draft_hidden") != draft.cfg.hidden_size:
                return None
            weights = {i: f.get_tensor(f"layer.{i}") for i in target.cfg.moe_layer_ids}
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None
    return RouterProjection(weights, target.cfg.top_k, meta)


def projection_for(target, draft, draft_path: str | Path, tokenizer=None) -> RouterProjection:
    """The draft folder's projection when it fits this target, else the cached one, else fitted now (once)."""
    own = Path(draft_path) / FILE
    if own.is_file() and (p := load_projection(own, target, draft)) is not None:
        return p
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moespec" / "router-projection"
    cached = base / f"{router_signature(target)}-{draft_signature(draft)}.safetensors"
    if cached.is_file() and (p := load_projection(cached, target, draft)) is not None:
        return p
    print(f"fitting the draft model's router projection for draft-guided prefetch (once; cached in {base})",
          file=sys.stderr)
    p = fit_projection(target, draft, corpus(tokenizer, target.cfg.vocab_size))
    base.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    p.save(tmp)
    tmp.replace(cached)
    return p


def corpus(tokenizer, vocab: int, tokens: int = 32768, seq: int = 256) -> list[list[int]]:
    """Token sequences to fit on: Python's own standard library source (every machine has it; code like the
    bundled model's training data), or random ids for a model without a tokenizer."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab, (tokens // seq, seq), generator=g).tolist()
    import sysconfig
    ids: list[int] = []
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        ids += tokenizer.encode(f.read_text(errors="replace")[:20000])
        if len(ids) >= tokens:
            break
    return [ids[i:i + seq] for i in range(0, min(len(ids), tokens) - seq + 1, seq)]


class _Capture:
    """An expert provider that records each MoE layer's router input (observe) and delegates the rest."""

    def __init__(self, inner):
        self.inner, self.x = inner, {}

    def observe(self, layer, x):
        self.x[layer] = x.detach().float()
        self.inner.observe(layer, x)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@torch.inference_mode()
def fit_projection(target, draft, seqs: list[list[int]], ridge: float = 1e-2, held_out: float = 0.1
                   ) -> RouterProjection:
    """Ridge regression per MoE layer from the draft's hidden states to the target router's logits, on `seqs`
    read by both (teacher-forced); the last `held_out` share of the sequences measures top-K recall."""
    from ..models.decoder import ForwardPlan
    if not seqs:
        raise MoespecError("no text to fit the router projection on")
    X, Y = [], {i: [] for i in target.cfg.moe_layer_ids}
    for s in seqs:
        toks = torch.tensor([s])
        cap = _Capture(target.experts)
        target.forward(toks, target.new_cache(1, len(s)), plan=ForwardPlan(experts=cap))
        h = draft.forward(toks, draft.new_cache(1, len(s))).hidden[0]                       # [T, H_d]
        X.append(torch.nn.functional.pad(h.float(), (0, 1), value=1.0))
        for i in Y:
            mw = target.w.layers[i].moe
            Y[i].append(F.linear(cap.x[i], mw.router.float(), mw.router_bias))           # [T, E] logits
    n_fit = max(1, int(len(seqs) * (1 - held_out)))
    Xf = torch.cat(X[:n_fit]).double()
    gram = Xf.T @ Xf + ridge * len(Xf) * torch.eye(Xf.shape[1], dtype=torch.float64)
    K = target.cfg.top_k
    weights, tp, n = {}, 0, 0
    for i, ys in Y.items():
        w = torch.linalg.solve(gram, Xf.T @ torch.cat(ys[:n_fit]).double()).float()
        weights[i] = w
        if n_fit < len(seqs):                     # held out: |guessed & routed| / |routed| over positions
            Xh, Yh = torch.cat(X[n_fit:]), torch.cat(ys[n_fit:])
            guess, true = torch.topk(Xh @ w, K).indices, torch.topk(Yh, K).indices
            tp += int((guess[:, :, None] == true[:, None, :]).any(-1).sum())
            n += true.numel()
    meta = {"target_routers": router_signature(target), "draft_hidden": draft.cfg.hidden_size,
            "target_experts": target.cfg.num_experts, "top_k": K, "ridge": ridge,
            "fit_tokens": int(len(Xf)), "held_out_topk_recall": tp / n if n else None}
    return RouterProjection(weights, K, meta)
