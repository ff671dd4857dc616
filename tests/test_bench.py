"""`moespec bench` end to end on a tiny checkpoint: JSON report, peer runner, forward-cost curve."""
import json
import subprocess
import sys

import pytest

import hf_models


@pytest.mark.slow
def test_bench_json_with_transformers_peer_and_curve(tmp_path):
    hf_models.build("mixtral", tmp_path / "m")
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "moespec.cli", "bench", str(tmp_path / "m"), "--max-new-tokens", "6",
                        "--prompt-len", "8", "--num-prompts", "2", "--batch-size", "1", "2", "--repetitions", "2",
                        "--warmup", "1", "--prefill-len", "16", "--peer", "transformers", "--curve",
                        "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert json.loads(r.stdout) == report
    runs = {(x["engine"], x["test"], x["batch"]): x for x in report["runs"]}
    assert set(runs) == {(e, t, b) for e in ("moespec", "transformers") for t, b in
                         (("tg6", 1), ("tg6", 2), ("pp16", 1))}
    for key, run in runs.items():
        assert run["ttft_s"]["n"] == 2 and run["ttft_s"]["mean"] > 0
        if key[1] == "tg6":
            assert run["decode_tok_s"]["mean"] > 0 and run["tpot_s"]["n"] == 2
    # Greedy float32: both engines produce the same tokens, and the report says so.
    assert runs[("moespec", "tg6", 2)]["vs_transformers"]["identical_sequences"] == "4/4"
    curve = report["forward_curve"]
    assert [row["n"] for row in curve] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 32, 64]
    assert curve[0]["distinct_experts_per_layer"] == 2.0          # one token, top-2
    assert all(row["distinct_experts_per_layer"] <= 6 for row in curve)  # 6 experts in the model


def test_bench_rejects_bad_values(tmp_path):
    hf_models.build("mixtral", tmp_path / "m")
    r = subprocess.run([sys.executable, "-m", "moespec.cli", "bench", str(tmp_path / "m"), "--repetitions", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error: --repetitions must be at least 1" in r.stderr


def test_prose_prompt_set_is_offline_english_text():
    from moespec import MoespecError
    from moespec.bench.workloads import load_prompts, prose_prompts
    ps = prose_prompts(3)
    assert len(ps) == 3 and all(len(p) >= 200 and "```" not in p for p in ps)
    assert ps == prose_prompts(3)                       # deterministic order
    with pytest.raises(MoespecError, match="choose random, humaneval or prose"):
        load_prompts("poetry", 1, 0, 100, None)


def test_variants_take_turns_and_report_their_ratio_and_identical_tokens(tmp_path):
    """--variant NAME=FLAGS: the command's flags plus each variant's, run on the same batches in one process; every
    variant after the first reports its speed ratio to the first and whether its tokens are identical."""
    hf_models.build("mixtral", tmp_path / "m")
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "moespec.cli", "bench", str(tmp_path / "m"), "--dtype", "float32",
                        "--max-new-tokens", "8", "--prompt-len", "8", "--num-prompts", "2", "--repetitions", "2",
                        "--warmup", "0", "--prefill-len", "0", "--expert-cache", "2", "--variant", "plain=",
                        "--variant", "self=--spec self --draft-experts shadow-int8 --draft-len 3",
                        "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert report["variants"]["self"]["flags"] == "--spec self --draft-experts shadow-int8 --draft-len 3"
    assert report["variants"]["plain"]["speculative"] is None
    assert report["variants"]["self"]["speculative"]["draft_experts"] == "shadow-int8"
    plain, spec = report["runs"]
    assert (plain["engine"], spec["engine"]) == ("moespec[plain]", "moespec[self]")
    assert spec["vs_moespec[plain]"]["identical_sequences"] == "2/2"
    ratio = spec["decode_tok_s"]["mean"] / plain["decode_tok_s"]["mean"]
    assert abs(spec["vs_moespec[plain]"]["speedup"] - ratio) < 1e-9
    # and batch by batch: each measured batch's ratio (the two took turns on it), their geometric mean and range
    per = [a / b for a, b in zip(spec["decode_tok_s"]["values"], plain["decode_tok_s"]["values"])]
    paired = spec["vs_moespec[plain]"]["paired_speedup"]
    assert paired["n"] == len(per) == 2 and (paired["min"], paired["max"]) == (min(per), max(per))
    assert abs(paired["geomean"] - (per[0] * per[1]) ** 0.5) < 1e-9
    assert spec["speculation"]["acceptance_rate"]["mean"] > 0.9      # int8 shadow copies agree with the model
    bad = subprocess.run([sys.executable, "-m", "moespec.cli", "bench", str(tmp_path / "m"), "--variant", "a=",
                          "--variant", "a=--spec ngram"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--variant name 'a' is given twice" in bad.stderr


def test_runners_take_every_place_in_the_turn():
    """A place in the turn is not neutral on a shared machine: the runner that goes first moves on each batch."""
    from moespec.bench.loop import run_interleaved
    order = []

    class Fake:
        def __init__(self, name):
            self.engine = name

        def generate(self, batch, new):
            order.append(self.engine)
            return [[1] * new for _ in batch], 0.01, 0.1, None
    res = run_interleaved([Fake("a"), Fake("b"), Fake("c")], [[1], [2], [3]], 1, 4, reps=3, warmup=1)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert [r["decode_tok_s"]["n"] for r in res] == [3, 3, 3]
    assert res[0]["decode_tok_s"]["values"] == [30.0, 30.0, 30.0]        # 1 row x 3 tokens after the first / 0.1 s
