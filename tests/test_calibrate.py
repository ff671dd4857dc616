"""`moespec calibrate`: the O_DIRECT reader, a quick calibration usable by `moespec plan`, clear errors, and the
predicted-vs-measured validation (tiny runs; accuracy targets are checked by benchmarks, not here)."""
import hashlib
import json
import math
import os

import pytest

from moespec.calibrate.measure import read_direct, read_latency
from moespec.calibrate.validate import validate
from moespec.cli import main
from moespec.perf.hardware import PROFILES, Hardware


@pytest.fixture
def one_thread():
    """Calibrate with one torch thread: measurements are per thread count, and two threads on a 2-core machine
    shared with other jobs spend minutes in spin barriers."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _write(path, nbytes, seed=0):
    data = hashlib.shake_256(str(seed).encode()).digest(nbytes)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def test_direct_reader_reads_back_every_byte(tmp_path):
    f = tmp_path / "blob.bin"
    digest = _write(f, 3 * 2**20 + 12345)           # not a multiple of the chunk nor of the 4 KiB block
    for direct in (True, False):
        h = hashlib.sha256()
        r = read_direct(f, chunk=2**20, direct=direct, hasher=h)
        assert h.hexdigest() == digest and r.nbytes == f.stat().st_size
        assert r.seconds > 0 and r.gbs > 0
        if not direct:
            assert not r.direct
    assert 0 < read_latency(f, f.stat().st_size, reads=8) < 1.0


@pytest.mark.slow
def test_quick_calibration_feeds_plan(tmp_path, capsys, one_thread):
    out = tmp_path / "hw.json"
    assert main(["calibrate", "--quick", "--output", str(out), "--offload-dir", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    hw = Hardware.from_json(out)
    assert hw.name.startswith("calibrated: ") and hw.slow_kind == "ssd"
    assert hw.mem_eff == hw.flops_eff == hw.slow_eff == 1.0
    for v in (hw.mem_bw_gbs, hw.peak_fp32_tflops, hw.peak_bf16_tflops, hw.slow_bw_gbs, hw.slow_latency_s,
              hw.fast_mem_bytes):
        assert math.isfinite(v) and v > 0
    # The profile carries what was measured: the overheads derive from the report's raw timings (each clamped at
    # 0, as a model that overpredicts the forward would make them negative).
    ov, meas = report["measurements"]["overhead"], report["measurements"]
    assert ov["forward_s"] > 0 and ov["tpot_s"] > 0 and ov["calls"] > 1
    assert hw.layer_overhead_s == pytest.approx(max(0.0, (ov["forward_s"] - ov["rate_bound_s"]) / ov["calls"]))
    assert hw.step_overhead_s == ov["step_overhead_s"]
    assert hw.spec_step_overhead_s == meas["spec_overhead"]["spec_step_overhead_s"]
    assert meas["spec_overhead"]["runs"] > 0 and 1 < meas["spec_overhead"]["mean_width"] <= 5
    assert len(hw.sources) >= 9 and "speculative step overhead" in hw.sources[-2]
    assert hw.miss_overhead_s == meas["miss_overhead"]["miss_overhead_s"] and "miss costs" in hw.sources[-1]
    miss = report["measurements"]["miss_overhead"]
    assert [b["batch"] for b in miss["batches"]] == [1, 8]
    for b in miss["batches"]:                                          # the 25% cache really missed, in decoding
        assert 0 < b["hit_rate"] < 1 and b["misses_per_layer"] > 0
    assert miss["batches"][1]["misses_per_layer"] > miss["batches"][0]["misses_per_layer"]
    assert hw.miss_read_gbs == miss["miss_read_gbs"] and (hw.miss_read_gbs is None or hw.miss_read_gbs > 0)
    assert report["measurements"]["spec_overhead"]["mean_width"] > 1    # the repeated phrase was drafted
    # random single reads of 256 KiB, 1 MiB and 4 MiB: an expert miss is priced from them
    assert [b for b, _ in hw.slow_read_gbs] == [256 * 1024, 1024 * 1024, 4 * 1024 * 1024]
    assert all(math.isfinite(g) and g > 0 for _, g in hw.slow_read_gbs)
    for table in (hw.rows_fp32_tflops, hw.rows_bf16_tflops):           # M-rows tables: every size x M measured
        assert {m for _, m, _ in table} == {1, 2, 4, 8, 16, 32, 64} and len({s for s, _, _ in table}) == 3
        assert all(s > 0 and math.isfinite(tf) and tf > 0 for s, _, tf in table)
    assert report["profile"]["rows_fp32_tflops"] == [list(r) for r in hw.rows_fp32_tflops]
    assert report["path"] == str(out) and report["profile"]["name"] == hw.name
    # the SSD test file is gone; the reference model's packed experts stay for offloading to reuse
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("reference-moe-")) == ["hw.json"]
    assert len([p for p in tmp_path.iterdir() if p.name.endswith("-float32.experts")]) == 1
    assert main(["plan", "--hardware", str(out), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["hardware"]["name"] == hw.name and plan["plain"]["tpot_s"] > 0


def test_clear_errors_before_measuring(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    bad = tmp_path / "file" / "hw.json"                # parent is a regular file: cannot be created
    assert main(["calibrate", "--quick", "--output", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write the hardware profile to {bad}") and "Traceback" not in err
    assert main(["calibrate", "--quick", "--output", str(tmp_path)]) == 2
    assert "it is a directory" in capsys.readouterr().err
    missing = tmp_path / "nowhere"
    assert main(["calibrate", "--quick", "--output", str(tmp_path / "hw.json"), "--offload-dir", str(missing)]) == 2
    assert f"offload folder {missing} does not exist" in capsys.readouterr().err
    assert main(["calibrate", "--hardware", "this-machine"]) == 2
    assert "only applies with --validate" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "hw.json")


def test_validation_points(capsys, one_thread):
    v = validate(PROFILES["this-machine"], batches=(1, 2), new_tokens=6, repetitions=1, warmup=0, forwards=4)
    assert [p["batch"] for p in v["points"]] == [1, 2]
    for p in v["points"]:
        assert p["predicted_s"] > 0 and p["measured_s"] > 0 and math.isfinite(p["rel_error"])
        assert p["rel_error"] == (p["predicted_s"] - p["measured_s"]) / p["measured_s"]
        assert p["forward_s"] > 0 and p["host_s"] == p["measured_s"] - p["forward_s"]
        assert 1 <= p["measured_experts_per_layer"] <= 2 * p["batch"]           # top-2 routing
        assert p["predicted_step_overhead_s"] == 0.0                           # the built-in profile has none
    assert math.isfinite(v["mape"]) and v["mape"] == sum(abs(p["rel_error"]) for p in v["points"]) / 2
    assert main(["calibrate", "--validate", "--hardware", "this-machine", "--batch-size", "0"]) == 2
    assert "--batch-size and --repetitions must be at least 1" in capsys.readouterr().err


def test_validation_grid_speculative_and_offloaded(tmp_path, one_thread):
    """Draft lengths and an SSD-tier cache: the run's own step counts and hit rate feed the prediction."""
    v = validate(PROFILES["this-machine"], batches=(1, 2), new_tokens=10, repetitions=1, warmup=0, forwards=4,
                 draft_lens=(0, 3), caches=(None, "25%"), offload_dir=str(tmp_path), prompt_set="prose")
    assert [(p["cache"], p["k"], p["batch"]) for p in v["points"]] == [
        (c, k, b) for c in (None, "25%") for k in (0, 3) for b in (1, 2)]
    for p in v["points"]:
        assert p["rel_error"] == (p["predicted_s"] - p["measured_s"]) / p["measured_s"] and p["predicted_s"] > 0
        assert (p["hit_rate"] is None) == (p["cache"] is None) == (p["measured_union"] is None)
        if p["cache"] is not None:     # decode forwards touch 2 (top-2) to 16 experts per layer
            assert 2 <= p["measured_union"] <= 16
        assert ("forward_s" in p) == (p["cache"] is None and p["k"] == 0)
        if p["k"]:
            assert p["steps"] >= 1 and 1 <= p["mean_width"] <= 4 and 1 <= p["mean_rows"] <= p["batch"]
            assert p["tokens_per_step"] == 9 / p["steps"] and 0 <= p["acceptance"] <= 1
    plain = {(p["cache"], p["batch"]): p for p in v["points"] if p["k"] == 0}
    for b in (1, 2):        # misses cost slow-tier time on top of the same compute
        assert 0 <= plain[("25%", b)]["hit_rate"] < 1
        assert plain[("25%", b)]["predicted_s"] > plain[(None, b)]["predicted_s"]
    assert set(v["mape_by"]) == {"resident plain", "resident spec", "25% plain", "25% spec"}
    assert v["mape"] == sum(abs(p["rel_error"]) for p in v["points"]) / 8


def test_verify_tokens_counts_each_verification_width(one_thread):
    from moespec import LLM, SamplingParams
    llm = LLM(speculative={"method": "ngram", "num_speculative_tokens": 4})
    prompt = "def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n"
    s = llm.generate([prompt], SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True))[0].stats
    # batch 1, chains: each verification runs the pending token and its draft
    assert s["verify_tokens"] == s["draft_steps"] + s["draft_tokens"] and s["row_steps"] == s["draft_steps"]


def test_validation_of_a_quantized_model_prices_its_expert_bytes(one_thread):
    v = validate(PROFILES["this-machine"], batches=(1,), new_tokens=6, repetitions=1, warmup=0, forwards=4,
                 quantize="int4")
    assert v["quantize"] == "int4" and len(v["points"]) == 1 and v["points"][0]["measured_s"] > 0
    plain = validate(PROFILES["this-machine"], batches=(1,), new_tokens=6, repetitions=1, warmup=0, forwards=4)
    # a quarter of the bytes and a bit (scales): the model predicts a faster step than for the float32 experts
    assert v["points"][0]["predicted_s"] < plain["points"][0]["predicted_s"]


@pytest.mark.parametrize("drafter", ["shadow-int4", "self", "draft_model", "oracle:0.8"])
def test_validation_of_each_drafter_reports_predicted_and_measured_speedups(drafter, tmp_path, one_thread):
    v = validate(PROFILES["this-machine"], batches=(1, 2), new_tokens=10, repetitions=1, warmup=0, forwards=4,
                 draft_lens=(0, 3), caches=("25%",), offload_dir=str(tmp_path), prompt_set="prose", drafter=drafter)
    assert v["drafter"] == drafter and [(s["batch"], s["k"]) for s in v["speedups"]] == [(1, 3), (2, 3)]
    pts = {(p["batch"], p["k"]): p for p in v["points"]}
    for s in v["speedups"]:
        plain, spec = pts[(s["batch"], 0)], pts[(s["batch"], 3)]
        assert s["measured_speedup"] == plain["measured_s"] / spec["measured_s"]
        assert s["predicted_speedup"] == plain["predicted_s"] / spec["predicted_s"] > 0
        assert spec["drafter"] == drafter and plain["drafter"] is None
    if drafter == "oracle:0.8":       # free drafts of acceptance 0.8 (10 tokens: a coarse but real estimate)
        assert all(0.4 <= s["acceptance"] <= 1.0 for s in v["speedups"])
    if drafter == "shadow-int4":      # the shadow copies draft almost exactly what verification accepts
        assert all(s["acceptance"] >= 0.8 for s in v["speedups"])
