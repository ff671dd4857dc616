"""The benchmark loop shared by every engine, torch-free (a llama.cpp child process should not pay for torch)."""
from __future__ import annotations

import statistics


def _summary(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def _batches(prompts: list[list[int]], batch: int, reps: int) -> list[list[list[int]]]:
    out, i = [], 0
    for _ in range(reps):
        out.append([prompts[(i + j) % len(prompts)] for j in range(batch)])
        i += batch
    return out


def run_interleaved(runners: list, prompts, batch: int, new: int, reps: int, warmup: int,
                    on_measure=None) -> list[dict]:
    """Each runner decodes the same batches, taking turns batch by batch (a noisy neighbour slows all alike).
    on_measure(): called once, after the warm-up and before the first measured batch. One result per runner:
    ttft_s, tpot_s, decode_tok_s summaries and the tokens (`_tokens`, one list per measured batch)."""
    rec = [{"ttft": [], "tpot": [], "tps": [], "tokens": [], "acc": []} for _ in runners]
    for k, b in enumerate(_batches(prompts, batch, warmup + reps)):
        if k == warmup and on_measure is not None:
            on_measure()
        for r, runner in zip(rec, runners):
            tokens, ttft, decode, acc = runner.generate(b, new)
            if k < warmup:
                continue
            r["ttft"].append(ttft)
            if new > 1:
                r["tpot"].append(decode / (new - 1))
                r["tps"].append(len(b) * (new - 1) / decode)
            r["tokens"].append(tokens)
            if acc:
                r["acc"].append(acc)
    out = []
    for r, runner in zip(rec, runners):
        res = {"engine": runner.engine, "batch": batch, "new_tokens": new, "ttft_s": _summary(r["ttft"]),
               "tpot_s": _summary(r["tpot"]) if r["tpot"] else None,
               "decode_tok_s": _summary(r["tps"]) if r["tps"] else None, "_tokens": r["tokens"]}
        if runner.engine == "llama.cpp":
            res["peer_model"] = str(runner.path)
        if r["acc"]:
            res["speculation"] = {key: _summary([a[key] for a in r["acc"]]) for key in r["acc"][0]}
        out.append(res)
    return out


