"""Calibrated slow-tier reads and speculative step overhead in the step model: a missed expert costs one random
read of its blob at the rate measured for that read size; a speculative step pays the profile's extra host cost."""
import json
from dataclasses import replace

import pytest

from moespec.assets import REFERENCE_MODEL
from moespec.perf.errors import PerfError
from moespec.perf.hardware import PROFILES, Hardware
from moespec.perf.model import ModelDesc
from moespec.perf.spec import Drafter, best_spec, spec_decode
from moespec.perf.step import Offload, forward_cost

REF = ModelDesc.from_file(REFERENCE_MODEL, name="reference-moe", dtype_bytes=4.0)
CPU = PROFILES["this-machine"]
KiB, MiB = 1024, 2 ** 20
READS = ((256 * KiB, 1.0), (MiB, 2.0), (4 * MiB, 4.0))
HW = replace(CPU, slow_read_gbs=READS)


@pytest.mark.parametrize("nbytes,gbs", [
    (256 * KiB, 1.0), (MiB, 2.0), (4 * MiB, 4.0),      # measured sizes
    (512 * KiB, 1.5), (2 * MiB, 3.0),                  # halfway in log size
    (4 * KiB, 1.0), (64 * MiB, 4.0),                   # clamped outside the table
])
def test_read_time_interpolates_in_log_size(nbytes, gbs):
    assert HW.slow_read_s(nbytes) == pytest.approx(nbytes / (gbs * 1e9), rel=1e-12)
    assert replace(HW, slow_eff=0.5).slow_read_s(nbytes) == pytest.approx(2 * nbytes / (gbs * 1e9), rel=1e-12)


def test_without_a_table_a_read_is_latency_plus_bandwidth():
    assert CPU.slow_read_gbs is None
    assert CPU.slow_read_s(MiB) == pytest.approx(CPU.slow_latency_s + MiB / CPU.slow_bw, rel=1e-12)


def test_misses_priced_one_read_per_expert():
    off = Offload(cached_experts=4, hit_rate=0.5)
    with_table, without = (forward_cost(REF, hw, 1, 1, 32, offload=off) for hw in (HW, CPU))
    assert with_table.misses == without.misses == pytest.approx(2 * 0.5)       # union 2, half missed
    resident = forward_cost(REF, HW, 1, 1, 32).time
    per_read = HW.slow_read_s(REF.expert_bytes)
    assert with_table.time - resident == pytest.approx(REF.moe_layers * 1.0 * per_read, rel=1e-9)
    assert without.time - forward_cost(REF, CPU, 1, 1, 32).time == pytest.approx(
        REF.moe_layers * (REF.expert_bytes / CPU.slow_bw + CPU.slow_latency_s), rel=1e-9)


def test_miss_overhead_once_per_waiting_layer():
    hw = replace(HW, miss_overhead_s=1e-4)
    for hit, m in ((0.5, 1.0), (0.75, 0.5)):                 # misses per layer: union 2 x (1 - hit)
        off = Offload(cached_experts=4, hit_rate=hit)
        extra = forward_cost(REF, hw, 1, 1, 32, offload=off).time - forward_cost(REF, HW, 1, 1, 32, offload=off).time
        assert extra == pytest.approx(REF.moe_layers * 1e-4 * min(1.0, m), rel=1e-9)
    assert forward_cost(REF, hw, 1, 1, 32).time == forward_cost(REF, HW, 1, 1, 32).time   # no misses, no wait


def test_engine_miss_rate_prices_misses_and_is_fitted_from_two_batches():
    from moespec.calibrate.costs import fit_miss_costs
    hw = replace(HW, miss_overhead_s=2e-4, miss_read_gbs=3.0)
    off = Offload(cached_experts=4, hit_rate=0.5)                   # one miss per layer at batch 1
    extra = forward_cost(REF, hw, 1, 1, 32, offload=off).time - forward_cost(REF, hw, 1, 1, 32).time
    assert extra == pytest.approx(REF.moe_layers * (2e-4 + REF.expert_bytes / 3e9), rel=1e-9)
    assert hw.miss_read_s(REF.expert_bytes) < HW.miss_read_s(REF.expert_bytes) == HW.slow_read_s(REF.expert_bytes)
    # the fit recovers a known wait and rate from (misses per layer, extra seconds per layer) at two batches
    pts = [(m, 3e-4 * min(1.0, m) + m * REF.expert_bytes / 2.5e9) for m in (0.9, 7.0)]
    wait, gbs = fit_miss_costs(pts, REF.expert_bytes)
    assert wait == pytest.approx(3e-4, rel=1e-6) and gbs == pytest.approx(2.5, rel=1e-6)
    wait, gbs = fit_miss_costs(pts[:1], REF.expert_bytes)              # one batch: the wait alone
    assert gbs is None and wait == pytest.approx(pts[0][1] / 0.9)
    assert fit_miss_costs([(1.0, 1e-3), (4.0, 1e-3)], 1e6)[1] is None  # no growth with misses: no rate


def test_spec_step_overhead_is_paid_once_per_speculative_step():
    d = Drafter("ngram", 0.7)
    base = spec_decode(REF, CPU, d, 1, 64, 4)
    slow = spec_decode(REF, replace(CPU, spec_step_overhead_s=1e-3), d, 1, 64, 4)
    assert slow["step_s"] - base["step_s"] == pytest.approx(1e-3, rel=1e-9)
    assert slow["speedup"] < base["speedup"] and slow["tokens_per_step"] == base["tokens_per_step"]
    plain = spec_decode(REF, CPU, d, 1, 64, 0)["step_s"]
    assert spec_decode(REF, replace(CPU, spec_step_overhead_s=1e-3), d, 1, 64, 0)["step_s"] == plain   # k = 0: none
    # a large enough overhead makes the planner turn speculation off
    assert best_spec(REF, CPU, Drafter("ngram", 0.9), 1, 64)["k"] > 0
    assert best_spec(REF, replace(CPU, spec_step_overhead_s=1.0), Drafter("ngram", 0.9), 1, 64)["k"] == 0


def test_json_round_trip_and_clear_errors():
    hw = replace(HW, spec_step_overhead_s=2e-4)
    assert Hardware.from_json(hw.to_json()) == hw
    old = {k: v for k, v in json.loads(CPU.to_json()).items() if k not in ("slow_read_gbs", "spec_step_overhead_s")}
    assert Hardware.from_json(json.dumps(old)) == CPU                 # profiles from before the fields still load
    for bad in ('[[1, 0]]', '[[0, 1]]', '[[1, 1], [1, 2]]', '[1, 2]', '[["x", 1]]', '[[1, 1e400]]'):
        with pytest.raises(PerfError, match="slow_read_gbs must be a list of \\[read bytes, GB/s\\] pairs"):
            Hardware.from_json(CPU.to_json().replace('"slow_read_gbs": null', f'"slow_read_gbs": {bad}'))


def test_a_measured_union_replaces_the_routing_model():
    off = Offload(cached_experts=4, hit_rate=0.5, union=3.0)
    fc = forward_cost(REF, HW, 8, 1, 32, offload=off)
    assert fc.union == 3.0 and fc.misses == pytest.approx(1.5)
    assert forward_cost(REF, HW, 8, 1, 32, offload=Offload(cached_experts=4, hit_rate=0.5)).union > 3.0
    assert fc.time < forward_cost(REF, HW, 8, 1, 32, offload=Offload(cached_experts=4, hit_rate=0.5)).time
