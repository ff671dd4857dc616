"""Tokenizer training and corpus encoding for the reference model."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from chat_data import exchanges
from corpus import SourceFile, read_text

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS = "<|endoftext|>"


def train_tokenizer(files: list[SourceFile], vocab_size: int, out: Path, max_bytes: int, seed: int = 0) -> Tokenizer:
    """Byte-level BPE (GPT-2 split regex) trained on training files only; all stdlib, then a seeded sample."""
    train = [f for f in files if f.split == "train"]
    rng = random.Random(seed)
    std = [f for f in train if f.group == "stdlib"]
    site = [f for f in train if f.group != "stdlib"]
    rng.shuffle(site)
    texts, total = [], 0
    for f in std + site:
        t = read_text(f)
        if t is None:
            continue
        texts.append(t)
        total += len(t)
        if total >= max_bytes:
            break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return tok


def encode_files(tok: Tokenizer, files: list[SourceFile], out: Path) -> dict:
    """Write one uint16 token stream per (group, split): documents joined by EOS."""
    eos = tok.token_to_id(EOS)
    stats = {}
    buckets: dict[str, list[SourceFile]] = {}
    for f in files:
        buckets.setdefault(f"{f.group}_{f.split}", []).append(f)
    for name, group in sorted(buckets.items()):
        texts = [t for t in (read_text(f) for f in group) if t is not None]
        ids: list[np.ndarray] = []
        for i in range(0, len(texts), 256):
            for enc in tok.encode_batch(texts[i:i + 256], add_special_tokens=False):
                ids.append(np.asarray(enc.ids + [eos], dtype=np.uint16))
        _write(out, name, ids, texts, stats)
    # Chat exchanges mined from every file of each split.
    for split in ("train", "val"):
        texts = [x for f in files if f.split == split for x in exchanges(f)]
        ids = []
        for i in range(0, len(texts), 256):
            for enc in tok.encode_batch(texts[i:i + 256], add_special_tokens=False):
                ids.append(np.asarray(enc.ids + [eos], dtype=np.uint16))
        _write(out, f"chat_{split}", ids, texts, stats)
    (out / "data_stats.json").write_text(json.dumps(stats, indent=1))
    return stats


def _write(out: Path, name: str, ids: list, texts: list, stats: dict) -> None:
    arr = np.concatenate(ids) if ids else np.zeros(0, dtype=np.uint16)
    arr.tofile(out / f"{name}.bin")
    stats[name] = {"docs": len(texts), "tokens": int(arr.size), "bytes": sum(len(t.encode()) for t in texts)}


def load_stream(data_dir: Path, name: str) -> np.ndarray:
    return np.fromfile(data_dir / f"{name}.bin", dtype=np.uint16)
