"""Train a Hugging Face-architecture LM on the encoded corpus, with resumable checkpoints.

The run keeps everything it needs to resume (model, optimizer, step, data RNG) in
`<run>/ckpt.pt`, written every `save_every` steps and at the end, so a run cut off by the end of a
session continues where it stopped. Metrics go to `<run>/log.jsonl`.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class TrainConfig:
    total_tokens: int
    ctx: int = 512
    batch: int = 8
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 500
    eval_batches: int = 16
    save_every: int = 100
    sample_every: int = 1000
    stdlib_weight: float = 2.0   # stdlib windows drawn this many times more often per token
    seed: int = 0
    aux_coef: float = 0.01
    # bf16 matmuls take a slow path on CPUs without AVX512-BF16 (8x slower than fp32 on AVX2 here).
    bf16_autocast: bool = False
    # Knowledge distillation (the draft model): weight of the cross-entropy against the teacher's next-token
    # distribution; the rest stays on the data's next token. 0 = plain language-model training.
    distill: float = 0.0

    @property
    def steps(self) -> int:
        return max(1, self.total_tokens // (self.ctx * self.batch))


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


class Windows:
    """Random fixed-length windows from weighted token streams."""

    def __init__(self, streams: list[np.ndarray], weights: list[float], ctx: int):
        self.streams = [s for s in streams if s.size > ctx + 1]
        w = np.array([wt * s.size for s, wt in zip(streams, weights) if s.size > ctx + 1], dtype=np.float64)
        self.p = w / w.sum()
        self.ctx = ctx

    def batch(self, rng: np.random.Generator, n: int) -> torch.Tensor:
        rows = []
        for _ in range(n):
            s = self.streams[rng.choice(len(self.streams), p=self.p)]
            i = int(rng.integers(0, s.size - self.ctx - 1))
            rows.append(torch.from_numpy(s[i:i + self.ctx + 1].astype(np.int64)))
        return torch.stack(rows)


def fixed_eval_windows(stream: np.ndarray, ctx: int, n: int) -> torch.Tensor:
    """Evenly spaced, non-overlapping windows: the same held-out tokens every evaluation."""
    n = min(n, max(1, (stream.size - 1) // (ctx + 1)))
    starts = np.linspace(0, stream.size - ctx - 2, n).astype(np.int64)
    return torch.stack([torch.from_numpy(stream[s:s + ctx + 1].astype(np.int64)) for s in starts])


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, bf16: bool, batch: int = 8) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        w = windows[i:i + batch]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, _ = model(w[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                                 reduction="sum")
        total += loss.item()
        count += w[:, 1:].numel()
    model.train()
    return total / count


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student against the teacher's full next-token distribution (forward KL up to
    the teacher's entropy), mean over positions. [B, T, V] each. A draft trained on it agrees with the
    target more often than one trained on the data alone: agreement is what speculation accepts."""
    p = torch.softmax(teacher_logits.float(), -1)
    return -(p * torch.log_softmax(student_logits.float(), -1)).sum(-1).mean()


def train(model, cfg: TrainConfig, data: Windows, evals: dict[str, torch.Tensor], run: Path,
          sample_fn=None, time_limit_s: float | None = None, teacher=None) -> dict:
    """teacher: a frozen model whose distribution the student learns with weight cfg.distill."""
    run.mkdir(parents=True, exist_ok=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(cfg.seed)
    step = 0
    ckpt = run / "ckpt.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        rng.bit_generator.state = state["rng"]
        print(f"resumed at step {step}", flush=True)

    def save():
        tmp = run / "ckpt.pt.tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                    "rng": rng.bit_generator.state, "cfg": asdict(cfg)}, tmp)
        tmp.replace(ckpt)

    log = open(run / "log.jsonl", "a")
    model.train()
    t0, tok_since = time.time(), 0
    start = time.time()
    while step < cfg.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        x = data.batch(rng, cfg.batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
            logits, aux = model(x[:, :-1])
        ce = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss = ce + (cfg.aux_coef * aux if aux is not None else 0.0)
        kd = None
        if teacher is not None and cfg.distill > 0:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
                t_logits, _ = teacher(x[:, :-1])
            kd = distill_loss(logits, t_logits)
            loss = (1 - cfg.distill) * loss + cfg.distill * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        tok_since += x[:, 1:].numel()
        if step % 20 == 0 or step == 1:
            dt = time.time() - t0
            rec = {"step": step, "tokens": step * cfg.ctx * cfg.batch, "ce": round(ce.item(), 4),
                   "aux": round(float(aux.detach()), 4) if aux is not None else None, "lr": lr_at(step - 1, cfg),
                   "gnorm": round(float(gnorm), 3), "tok_s": round(tok_since / dt, 1), "time": time.time()}
            if kd is not None:
                rec["kd"] = round(kd.item(), 4)
            log.write(json.dumps(rec) + "\n"); log.flush()
            print(rec, flush=True)
            t0, tok_since = time.time(), 0
        if step % cfg.eval_every == 0 or step == cfg.steps:
            rec = {"step": step, "tokens": step * cfg.ctx * cfg.batch, "time": time.time()}
            for name, w in evals.items():
                rec[f"val_{name}"] = round(evaluate(model, w, cfg.bf16_autocast), 4)
            log.write(json.dumps(rec) + "\n"); log.flush()
            print(rec, flush=True)
        if sample_fn is not None and (step % cfg.sample_every == 0):
            sample_fn(model, step)
        if step % cfg.save_every == 0 or step == cfg.steps:
            save()
        if time_limit_s is not None and time.time() - start > time_limit_s:
            save()
            print(f"time limit reached at step {step}", flush=True)
            break
    log.close()
    return {"step": step, "done": step >= cfg.steps}
