"""Published setups, predicted vs reported (issue 7): every setup evaluates from configs alone, the error is
(predicted - reported) / reported, and `moespec plan --published [--json]` prints them without changing
plain `moespec plan`."""
import json
import math
from dataclasses import replace

import pytest

from moespec.cli import main
from moespec.perf import published
from moespec.perf.model import known_model
from moespec.perf.published import HW, SETUPS, Q4_K_M, compare, mean_abs_error, predict, predict_tpot
from moespec.perf.step import Offload, decode_tpot


def test_every_setup_predicts_a_finite_positive_value_with_sources():
    assert 6 <= len(SETUPS) <= 10 and len({s.name for s in SETUPS}) == len(SETUPS)
    for s in SETUPS:
        p = predict(s)
        assert math.isfinite(p) and p > 0, s.name
        assert s.metric in ("tok_s", "tpot_s") and s.reported > 0 and s.source
        assert s.hardware.sources and (s.cpu is None or s.cpu.sources)
        m = published.setup_model(s)                        # the model's own bits, as the setup states them
        if s.dense_bits is not None:
            assert m.dtype_bytes == pytest.approx(s.dense_bits / 8)


def test_error_is_relative_to_the_reported_figure():
    rows = compare()
    assert [r["setup"] for r in rows] == [s.name for s in SETUPS]
    for r, s in zip(rows, SETUPS):
        assert r["reported"] == s.reported
        assert r["error"] == pytest.approx((r["predicted"] - s.reported) / s.reported)
        assert r["unit"] == ("tok/s" if s.metric == "tok_s" else "s/token")
        want = s.batch / r["predicted_tpot_s"] if s.metric == "tok_s" else r["predicted_tpot_s"]
        assert r["predicted"] == pytest.approx(want)
    assert mean_abs_error(rows) == pytest.approx(sum(abs(r["error"]) for r in rows) / len(rows))


def test_rows_recomputed_directly_through_the_perf_functions():
    by = {s.name: s for s in SETUPS}
    # pure CPU llama.cpp: one decode step of the Q4_K_M model on the i7-8700 profile
    s = by["llama.cpp CPU only, Qwen3-30B-A3B Q4_K_M"]
    m = known_model("qwen3-30b-a3b", dtype_bytes=Q4_K_M / 8, expert_bits=Q4_K_M)
    tok_s = 1 / decode_tpot(m, HW["i7-8700-ddr4-2666"], 1, s.context)
    row = next(r for r in compare([s]))
    assert row["predicted"] == pytest.approx(tok_s)
    assert row["error"] == pytest.approx((tok_s - 10.6) / 10.6)
    # offloading: k = 4 cached experts per layer, loads stall the layer
    s = by["mixtral-offloading T4 (Colab), k=4 LRU"]
    m = known_model("mixtral-8x7b", dtype_bytes=s.dense_bits / 8, expert_bits=s.expert_bits)
    t = decode_tpot(m, s.hardware, 1, s.context, offload=Offload(4.0))
    assert predict(s) == pytest.approx(1 / t)
    # --n-cpu-moe: dense model on the GPU + GPU experts + CPU experts
    s = by["llama.cpp --n-cpu-moe 36, Qwen3-30B-A3B Q4_K_M"]
    m = known_model("qwen3-30b-a3b", dtype_bytes=Q4_K_M / 8, expert_bits=Q4_K_M)
    gpu = s.hardware
    t = (decode_tpot(replace(m, expert_params=0), gpu, 1, s.context)
         + decode_tpot(published._experts_only(m, 12), replace(gpu, layer_overhead_s=0.0), 1, s.context)
         + decode_tpot(published._experts_only(m, 36), HW["i9-10900x-ddr4-4ch"], 1, s.context))
    assert predict_tpot(s) == pytest.approx(t)
    # the experts-only pieces are what they claim: every CPU expert byte, nothing else
    cpu_only = published._experts_only(m, 36)
    assert cpu_only.total_bytes == pytest.approx(36 * 128 * m.expert_bytes)


def test_hybrid_split_prices_cpu_experts_at_the_cpu_bandwidth():
    s = next(s for s in SETUPS if s.cpu is not None)
    all_gpu = replace(s, cpu=None, cpu_moe_layers=0)
    assert predict_tpot(s) > predict_tpot(all_gpu)         # DRAM is slower than GDDR: moving experts costs time


def test_cli_published_json_lists_every_setup(capsys):
    assert main(["plan", "--published", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"setups", "mean_abs_error"}
    assert [r["setup"] for r in out["setups"]] == [s.name for s in SETUPS]
    assert out["mean_abs_error"] == pytest.approx(mean_abs_error(out["setups"]))
    for r in out["setups"]:
        assert {"predicted", "reported", "unit", "error", "source"} <= set(r)


def test_cli_published_table_and_plain_plan_unchanged(capsys):
    assert main(["plan", "--published"]) == 0
    text = capsys.readouterr().out
    assert "mean absolute error" in text and "MoE-Infinity" in text
    assert main(["plan", "mixtral-8x7b", "--hardware", "rtx4090-pcie4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "setups" not in out and out["model"]["experts"] == 8 and out["plain"]["tpot_s"] > 0
