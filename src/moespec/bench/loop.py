"""The benchmark loop shared by every engine, torch-free (a llama.cpp child process should not pay for torch)."""
from __future__ import annotations

import statistics


def _summary(xs: list[float], values: bool = False) -> dict:
    """mean, std, n; with `values`, each batch's figure too (paired ratios between runs: bench/cli.py compare)."""
    out = {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}
    return {**out, "values": list(xs)} if values else out


def _batches(prompts: list[list[int]], batch: int, reps: int) -> list[list[list[int]]]:
    out, i = [], 0
    for _ in range(reps):
        out.append([prompts[(i + j) % len(prompts)] for j in range(batch)])
        i += batch
    return out


def run_interleaved(runners: list, prompts, batch: int, new: int, reps: int, warmup: int,
                    on_measure=None) -> list[dict]:
    """Each runner decodes the same batches, taking turns batch by batch (a noisy neighbour slows all alike), the
    runner that goes first moving on by one each batch.
    on_measure(): called once, after the warm-up and before the first measured batch. One result per runner:
    ttft_s, tpot_s, decode_tok_s summaries and the tokens (`_tokens`, one list per measured batch)."""
    rec = [{"ttft": [], "tpot": [], "tps": [], "tokens": [], "acc": []} for _ in runners]
    for k, b in enumerate(_batches(prompts, batch, warmup + reps)):
        if k == warmup and on_measure is not None:
            on_measure()
        # Each batch starts with the next runner: a place in the turn is not neutral (in one process, the runners
        # later in a round ran up to 10% slower on the same batches), so every runner takes every place in turn.
        first = k % len(runners)
        for i in list(range(first, len(runners))) + list(range(first)):
            r, runner = rec[i], runners[i]
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
               "decode_tok_s": _summary(r["tps"], values=True) if r["tps"] else None, "_tokens": r["tokens"]}
        if runner.engine == "llama.cpp":
            res["peer_model"] = str(runner.path)
        if r["acc"]:
            res["speculation"] = {key: _summary([a[key] for a in r["acc"]]) for key in r["acc"][0]}
        out.append(res)
    return out


