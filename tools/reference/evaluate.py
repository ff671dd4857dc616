"""Measurements of an exported folder, made with moespec itself on the bf16 weights upcast to float32.

- held-out loss on every token of stdlib_val, site_val and chat_val (non-overlapping windows of CTX);
- loss on real Python code that was never in the corpus (packages installed only in this venv);
- routing statistics on the held-out text (expert shares, dead experts, consecutive-token expert reuse);
- how often the draft's greedy token equals the MoE's (what greedy speculative decoding accepts);
- greedy samples generated through `moespec.LLM`.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import math
import sys
import sysconfig
import time
from math import comb
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CTX = 512
BATCH = 8
HELD_OUT = ("stdlib_val", "site_val", "chat_val")
UNSEEN_PACKAGES = ("rich", "tokenizers", "safetensors")
SAMPLE_PROMPTS = ["def fibonacci(n):", "class Stack:", "import os\n\n\ndef list_files(path):"]
SAMPLE_TOKENS = 96
SAMPLE_PENALTY = 1.2   # the second set of samples: greedy with this repetition_penalty
DEAD_SHARE = 0.01


class RoutingStats:
    """Per MoE layer: assignments per expert, and expert reuse between consecutive tokens."""

    def __init__(self, layers: list[int], experts: int, top_k: int):
        self.layers, self.E, self.K = layers, experts, top_k
        self.counts = {i: torch.zeros(experts, dtype=torch.long) for i in layers}
        self.reuse = {i: [0, 0, 0] for i in layers}     # pairs sharing >= 1 expert, same set, shuffled-pair share
        self.pairs = 0
        self.gen = torch.Generator().manual_seed(0)

    def add(self, routing: list[torch.Tensor], B: int, T: int) -> None:
        if T < 2:
            return
        self.pairs += B * (T - 1)
        perm = torch.randperm(B * T, generator=self.gen)
        for layer, ids in zip(self.layers, routing):
            self.counts[layer] += torch.bincount(ids.reshape(-1), minlength=self.E)
            a = ids.view(B, T, self.K)
            share = (a[:, 1:, :, None] == a[:, :-1, None, :]).any(-1).any(-1)
            same = (a[:, 1:].sort(-1).values == a[:, :-1].sort(-1).values).all(-1)
            flat = ids.view(B * T, self.K)
            shuffled = (flat[:, :, None] == flat[perm][:, None, :]).any(-1).any(-1)[:B * (T - 1)]
            r = self.reuse[layer]
            r[0] += int(share.sum()); r[1] += int(same.sum()); r[2] += int(shuffled.sum())

    def summary(self) -> dict:
        uniform = 1 - comb(self.E - self.K, self.K) / comb(self.E, self.K)
        per_layer = []
        for i in self.layers:
            c = self.counts[i].double()
            share = (c / c.sum()).tolist()
            r = self.reuse[i]
            per_layer.append({"layer": i, "share": [round(s, 5) for s in share], "min_share": round(min(share), 5),
                              "max_share": round(max(share), 5), "dead_experts": sum(s < DEAD_SHARE for s in share),
                              "reuse_any": round(r[0] / self.pairs, 4), "reuse_same_set": round(r[1] / self.pairs, 4),
                              "reuse_any_shuffled": round(r[2] / self.pairs, 4)})
        return {"tokens": int(self.counts[self.layers[0]].sum()) // self.K, "pairs": self.pairs,
                "share_definition": "fraction of the layer's top-k assignments going to the expert (sums to 1)",
                "dead_threshold": DEAD_SHARE, "uniform_share": 1 / self.E,
                "reuse_uniform_random": round(uniform, 4), "layers": per_layer}


def windows(stream: np.ndarray, ctx: int = CTX):
    """Non-overlapping windows: every token after the first is predicted exactly once. Yields (x, y) [n, T]."""
    n = stream.size - 1
    full = n // ctx
    s = torch.from_numpy(stream.astype(np.int64))
    for b in range(0, full, BATCH):
        idx = range(b, min(full, b + BATCH))
        yield (torch.stack([s[i * ctx:(i + 1) * ctx] for i in idx]),
               torch.stack([s[i * ctx + 1:(i + 1) * ctx + 1] for i in idx]))
    if n % ctx:
        yield s[full * ctx:n][None], s[full * ctx + 1:][None]


def score(model, stream: np.ndarray, routing: RoutingStats | None = None, max_tokens: int | None = None) -> dict:
    """Sum of next-token nats over the stream with moespec's forward; also greedy predictions (for agreement)."""
    from moespec.models import ForwardPlan
    if max_tokens is not None:
        stream = stream[:max_tokens + 1]
    nats, hits, preds = 0.0, 0, []
    plan = ForwardPlan(record_routing=routing is not None)
    for x, y in windows(stream):
        out = model.forward(x, model.new_cache(*x.shape), plan=plan)
        logits = out.logits.float()
        nats += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        p = logits.argmax(-1)
        hits += int((p == y).sum())
        preds.append(p.reshape(-1).numpy().astype(np.int32))
        if routing is not None:
            routing.add(out.routing, *x.shape)
    count = stream.size - 1
    return {"tokens": count, "nats_per_token": nats / count, "top1_accuracy": hits / count,
            "preds": np.concatenate(preds)}


def corpus_hashes(run: Path) -> set[str]:
    """sha1 of every corpus file listed in the run's manifest (train and val)."""
    roots = {"stdlib": Path(sysconfig.get_paths()["stdlib"]), "site": base_site()}
    out = set()
    for line in (run / "manifest.tsv").read_text().splitlines():
        rel = line.split("\t")[0]
        group, _, rest = rel.partition("/")
        try:
            out.add(hashlib.sha1((roots[group] / rest).read_bytes()).hexdigest())
        except OSError:
            pass
    return out


def base_site() -> Path:
    return Path(sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})["purelib"])


def unseen_code(run: Path, tok, eos: int) -> dict:
    """Token streams of venv-only packages' .py files, checked to be outside the corpus (path and content)."""
    manifest = [ln.split("\t")[0] for ln in (run / "manifest.tsv").read_text().splitlines()]
    hashes = corpus_hashes(run)
    base = base_site().resolve()
    out = {}
    for pkg in UNSEEN_PACKAGES:
        spec = importlib.util.find_spec(pkg)
        root = Path(spec.origin).parent.resolve()
        if root.is_relative_to(base) or (base / pkg).exists() or any(r.startswith(f"site/{pkg}/") for r in manifest):
            raise RuntimeError(f"{pkg} ({root}) is part of the training corpus; it cannot measure unseen code")
        texts, dupes = [], 0
        for p in sorted(root.rglob("*.py")):
            raw = p.read_bytes()
            if not raw.strip():
                continue
            if hashlib.sha1(raw).hexdigest() in hashes:  # e.g. a vendored copy of a corpus file
                dupes += 1
                continue
            texts.append(raw.decode("utf-8"))
        ids = [np.asarray(e.ids + [eos], dtype=np.uint16) for e in tok.encode_batch(texts, add_special_tokens=False)]
        version = importlib.metadata.version(pkg)
        out[pkg] = {"stream": np.concatenate(ids), "files": len(texts), "skipped_same_as_corpus": dupes,
                    "bytes": sum(len(t.encode()) for t in texts), "version": version, "path": str(root)}
    return out


def samples(folder: Path) -> list[dict]:
    from moespec import LLM, SamplingParams
    llm = LLM(folder, dtype="float32")
    out = []
    for rp in (1.0, SAMPLE_PENALTY):            # plain greedy, then greedy with a repetition penalty
        for p in SAMPLE_PROMPTS:
            o = llm.generate(p, SamplingParams(max_new_tokens=SAMPLE_TOKENS, temperature=0, repetition_penalty=rp))[0]
            out.append({"prompt": p, "completion": o.text, "new_tokens": len(o.token_ids),
                        "finish_reason": o.finish_reason, "repetition_penalty": rp})
    return out


def evaluate_all(folders: dict[str, Path], run: Path, streams: dict, stats: dict, max_tokens: int | None = None) -> dict:
    """Everything the model card reports, per model ("moe", "draft"), in one JSON-able dict."""
    from tokenizers import Tokenizer

    from moespec.loading import load_model
    tok = Tokenizer.from_file(str(run / "data" / "tokenizer.json"))
    unseen = unseen_code(run, tok, tok.token_to_id("<|endoftext|>"))
    res = {"ctx": CTX, "max_tokens_per_set": max_tokens, "weights": "exported bf16, upcast to float32",
           "engine": "moespec", "bits_per_byte": "nats/token * (tokens / UTF-8 bytes of the set) / ln 2"}
    preds = {}
    for name, folder in folders.items():
        t0 = time.time()
        m = load_model(folder, "float32")
        c = m.cfg
        routing = RoutingStats(c.moe_layer_ids, c.num_experts, c.top_k) if c.is_moe else None
        r = {"heldout": {}, "unseen_code": {}}
        for sname in HELD_OUT:
            if sname not in streams:
                continue
            sc = score(m, streams[sname], routing, max_tokens)
            preds[name, sname] = sc.pop("preds")
            st = stats[sname]
            r["heldout"][sname] = dict(sc, bits_per_byte=sc["nats_per_token"] * st["tokens"] / st["bytes"] / math.log(2),
                                       set_tokens=st["tokens"], set_bytes=st["bytes"], docs=st["docs"])
        for pkg, u in unseen.items():
            sc = score(m, u["stream"], None, max_tokens)
            sc.pop("preds")
            n = int(u["stream"].size)
            r["unseen_code"][pkg] = dict(sc, bits_per_byte=sc["nats_per_token"] * n / u["bytes"] / math.log(2),
                                         set_tokens=n, **{k: v for k, v in u.items() if k != "stream"})
        if routing is not None:
            r["routing"] = routing.summary()
        r["samples"] = samples(folder)
        r["eval_seconds"] = round(time.time() - t0, 1)
        print(f"{name}: evaluated in {r['eval_seconds']}s", flush=True)
        res[name] = r
    if "moe" in folders and "draft" in folders:
        res["draft_agreement"] = {s: float(np.mean(preds["moe", s] == preds["draft", s]))
                                  for s in HELD_OUT if ("moe", s) in preds}
    return res
