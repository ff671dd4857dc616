"""Step and speculation model: the properties the model must have (monotone, bounded, zero-I/O self-draft)."""
import numpy as np
import pytest

from moespec.perf.hardware import PROFILES
from moespec.perf.model import known_model
from moespec.perf.spec import Drafter, best_k, best_spec, expected_accepted, spec_decode, speedup
from moespec.perf.step import Offload, decode_tokens_per_s, decode_tpot, forward_cost, prefill_time, t_target

MIX, QWEN = known_model("mixtral-8x7b"), known_model("qwen3-30b-a3b")
GPU, CPU = PROFILES["rtx4090-pcie4"], PROFILES["this-machine"]


def test_expected_accepted():
    assert expected_accepted(0.5, 0) == 1.0
    assert expected_accepted(1.0, 4) == 5.0
    assert expected_accepted(0.0, 4) == 1.0
    assert expected_accepted(0.8, 4) == pytest.approx(sum(0.8 ** i for i in range(5)))
    rng = np.random.default_rng(0)                       # simulate: accept while draws < a, plus one token
    acc = (rng.random((20000, 4)) < 0.7).cumprod(1).sum(1) + 1
    assert acc.mean() == pytest.approx(expected_accepted(0.7, 4), rel=0.02)


def test_speedup_monotone_in_acceptance_and_draft_cost():
    for k in (1, 2, 4, 8):
        s = [speedup(a, k, 0.01, 0.02, 0.001) for a in np.linspace(0, 1, 21)]
        assert all(x <= y + 1e-12 for x, y in zip(s, s[1:]))
        d = [speedup(0.7, k, 0.01, 0.02, td) for td in (0, 1e-4, 1e-3, 1e-2)]
        assert all(x >= y for x, y in zip(d, d[1:]))
    assert best_k(0.0, lambda t: 0.01 * (1 + 0.5 * (t - 1)), 0.001) == (0, 1.0)
    k, s = best_k(0.9, lambda t: 0.01, 0.0001)            # flat verify cost, cheap drafts: draft long
    assert k >= 8 and s > 4


@pytest.mark.parametrize("model", [MIX, QWEN, known_model("gpt-oss-20b"), known_model("deepseek-v2-lite")])
@pytest.mark.parametrize("hw", [GPU, CPU, PROFILES["h100-sxm-pcie5"]])
def test_target_time_monotone_and_efficiency_bounded(model, hw):
    for off in (None, Offload(model.experts / 4)):
        for B in (1, 4, 64):
            ts = [t_target(model, hw, B, t, 512, offload=off) for t in range(1, 18)]
            assert all(x <= y for x, y in zip(ts, ts[1:]))                       # more tokens never faster
            for k in range(1, 17):
                # target efficiency; the causal attention term (token i of k+1 also attends to the i-1
                # drafts before it) may push it below 1/(k+1) by ~k / (2 x context), under 2% here
                assert (1 - 0.02) / (k + 1) <= ts[0] / ts[k] <= 1.0
        bs = [t_target(model, hw, B, 1, 512, offload=off) for B in (1, 2, 4, 8, 16)]
        assert all(x <= y for x, y in zip(bs, bs[1:]))


def test_offloading_costs_and_cache_monotone():
    full = forward_cost(MIX, GPU, 1, 1, 512)
    assert full.slow_bytes == 0 and full.union == pytest.approx(2.0)
    tp = [decode_tpot(MIX, GPU, 1, 512, offload=Offload(c)) for c in (0, 1, 2, 4, 6, 8)]
    assert all(x >= y for x, y in zip(tp, tp[1:])) and tp[-1] == pytest.approx(full.time)
    half = forward_cost(MIX, GPU, 1, 1, 512, offload=Offload(4))
    assert half.misses == pytest.approx(1.0)                                      # 2 x (1 - 4/8)
    assert half.slow_bytes == pytest.approx(MIX.moe_layers * MIX.expert_bytes)
    assert forward_cost(MIX, GPU, 1, 1, 512, offload=Offload(4, hit_rate=1.0)).slow_bytes == 0
    ov = forward_cost(MIX, GPU, 1, 1, 512, offload=Offload(4, overlap=True))
    assert full.time <= ov.time < half.time
    # prefetched layers hide the misses the predictor's measured recall covers, none without a recall
    pre = forward_cost(MIX, GPU, 1, 4, 512, offload=Offload(4, prefetched_layers=16, prefetch_accuracy=0.73))
    none = forward_cost(MIX, GPU, 1, 4, 512, offload=Offload(4))
    assert pre.slow_bytes == pytest.approx(none.slow_bytes * (1 - 0.73) * 16 / MIX.moe_layers
                                           + none.slow_bytes * (MIX.moe_layers - 16) / MIX.moe_layers)
    assert forward_cost(MIX, GPU, 1, 4, 512, offload=Offload(4, prefetched_layers=16)).slow_bytes == none.slow_bytes
    assert decode_tokens_per_s(MIX, GPU, 8, 512) == pytest.approx(8 / decode_tpot(MIX, GPU, 8, 512))
    assert prefill_time(MIX, GPU, 512) > decode_tpot(MIX, GPU, 1, 512)
    assert forward_cost(MIX, GPU, 1, 4, 512, budget=3).union == 3


def test_self_draft_moves_no_bytes_and_spec_numbers_consistent():
    d = forward_cost(MIX, GPU, 4, 1, 512, experts=2)
    assert d.slow_bytes == 0 and d.union <= 2 + 1e-9
    off = Offload(2)
    r = spec_decode(MIX, GPU, Drafter("self", 0.6, draft_experts=2), 16, 512, 4, offload=off)
    assert r["tokens_per_s"] == pytest.approx(16 * r["tokens_per_step"] / r["step_s"])
    assert r["speedup"] == pytest.approx(r["tokens_per_step"] * t_target(MIX, GPU, 16, 1, 512, offload=off)
                                         / r["step_s"])
    b = best_spec(MIX, GPU, Drafter("self", 0.6, draft_experts=2), 16, 512, offload=off)
    assert b["speedup"] >= r["speedup"] - 1e-12
    # MoESD: speculation pays more at medium batch than at batch 1 (expert union saturates)
    s1 = best_spec(QWEN, PROFILES["h100-sxm-pcie5"], Drafter("ngram", 0.7), 1, 512)["speedup"]
    s32 = best_spec(QWEN, PROFILES["h100-sxm-pcie5"], Drafter("ngram", 0.7), 32, 512)["speedup"]
    assert s32 > s1
