"""plan() and `moespec plan` on the bundled configs (no weights), hardware profiles, size parsing, plots."""
import argparse
import doctest
import json

import pytest

from moespec.perf import cli as plan_cli
from moespec.perf.errors import PerfError
from moespec.perf.hardware import PROFILES, Hardware, get_profile
from moespec.perf.model import CONFIG_DIR, known_model, known_names
from moespec.perf.planner import plan
from moespec.perf import units
from moespec.perf.units import format_bytes, parse_size

GiB = 2 ** 30


@pytest.mark.parametrize("name", known_names())
def test_plan_runs_for_every_bundled_config(name):
    m = known_model(name)
    for hw in PROFILES.values():
        for batch in (1, 16):
            r = plan(m, hw, None, batch)
            assert "error" not in r, (name, hw.name, r.get("error"))
            p = r["plain"]
            assert 0 < p["ttft_s"] < 1e4 and 0 < p["tpot_s"] < 1e3
            assert p["tokens_per_s"] == pytest.approx(batch / p["tpot_s"])
            best = r["speculative"]["best"]
            if best is not None:
                assert best["speedup"] >= 1.03 and best["k"] >= 1
                assert r["recommend"]["drafter"]["value"] == best["drafter"]
            else:
                assert r["recommend"]["drafter"]["value"] == "off"
            for c in r["speculative"]["candidates"]:
                assert c["speedup"] >= 1.0 - 1e-12          # k = 0 (plain) is always available
            json.dumps(r)


def test_mixtral_fp16_on_rtx4090_needs_an_expert_cache():
    r = plan(known_model("mixtral-8x7b"), PROFILES["rtx4090-pcie4"], 24 * GiB, 1)
    mem, rec = r["memory"], r["recommend"]
    assert not mem["fits"] and mem["runnable"]
    assert mem["needed_all_bytes"] > 90e9
    assert 1 <= rec["expert_cache"]["value"] < 8 and rec["expert_cache"]["gain"] > 1.1
    assert r["plain"]["misses_per_layer"] > 1 and r["plain"]["slow_bytes_per_step"] > 0
    # on a 768 GiB CPU server the same model fits entirely
    assert plan(known_model("mixtral-8x7b"), PROFILES["epyc-2s-nvme"])["memory"]["fits"]
    # quantised experts (4.5 bits) need less than a third of the bytes: more of them are cached
    q = plan(known_model("mixtral-8x7b", expert_bits=4.5), PROFILES["rtx4090-pcie4"], 24 * GiB, 1)
    assert q["memory"]["cached_experts_per_layer"] > 3 * mem["cached_experts_per_layer"]


def test_plan_recommends_speculation_where_moesd_says_it_pays():
    # offloaded Mixtral at batch 16: the union saturates, drafts are nearly free in bytes
    r = plan(known_model("mixtral-8x7b"), PROFILES["rtx4090-pcie4"], 24 * GiB, 16)
    assert r["recommend"]["drafter"]["value"] == "self" and r["recommend"]["draft_length"]["value"] >= 2
    assert r["recommend"]["drafter"]["gain"] > 1.2
    # a draft model is considered when given
    r = plan(known_model("qwen3-30b-a3b"), PROFILES["h100-sxm-pcie5"], 80e9, 32, draft=known_model("qwen3-0.6b"))
    assert "draft_model" in [c["drafter"] for c in r["speculative"]["candidates"]]
    # nothing fits: a clear error instead of numbers
    r = plan(known_model("mixtral-8x7b"), PROFILES["rtx4090-pcie4"], 2 * GiB, 1)
    assert not r["memory"]["runnable"] and "more than the 2.00 GiB budget" in r["error"]
    with pytest.raises(PerfError, match="acceptance"):
        plan(known_model("mixtral-8x7b"), PROFILES["rtx4090-pcie4"], 24 * GiB, 1, acceptance=1.5)


def test_hardware_json_roundtrip(tmp_path):
    for hw in PROFILES.values():
        assert hw.sources, f"{hw.name} cites no source"
        assert Hardware.from_json(hw.to_json()) == hw
    path = tmp_path / "mine.json"
    PROFILES["this-machine"].with_rates(name="calibrated", mem_bw_gbs=17.5).to_json(path)
    assert get_profile(str(path)).mem_bw_gbs == 17.5
    with pytest.raises(PerfError, match="unknown hardware profile 'tpu'.*rtx4090-pcie4"):
        get_profile("tpu")
    with pytest.raises(PerfError, match="lacks mem_bw_gbs"):
        Hardware.from_json('{"name": "x"}')


def test_parse_size():
    assert parse_size("24GiB") == 24 * GiB
    assert parse_size("512MB") == 512_000_000
    assert parse_size("2e9") == 2_000_000_000
    assert parse_size(" 1.5 gb ") == 1_500_000_000
    assert parse_size("24G") == 24 * GiB and parse_size("100") == 100 and parse_size(4096) == 4096
    for bad, why in [("24 gigs", "cannot read"), ("", "cannot read"), ("GiB", "cannot read"), ("-1GB", "cannot read"),
                     ("0", "positive"), ("1e999", "positive"), (True, "expected a size")]:
        with pytest.raises(PerfError, match=f"--memory: .*{why}"):
            parse_size(bad, "--memory")
    assert format_bytes(24 * GiB) == "24.0 GiB" and format_bytes(100) == "100 B"
    assert doctest.testmod(units).failed == 0                      # the module docstring's examples


def _parser():
    ap = argparse.ArgumentParser(prog="moespec")
    sub = ap.add_subparsers(dest="command")

    def model_args(p):      # as src/moespec/cli.py defines it
        p.add_argument("model", nargs="?", default=None)
        p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    plan_cli.add_plan_parser(sub, model_args)
    return ap


def test_cli_json_and_table(capsys, tmp_path):
    a = _parser().parse_args(["plan", "mixtral-8x7b", "--hardware", "rtx4090-pcie4", "--memory", "24GiB", "--json"])
    assert a.dtype is None                                  # plan uses the checkpoint's dtype unless told
    plan_cli.run_plan(a)
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["dtype_bytes"] == 2 and not out["memory"]["fits"]
    a = _parser().parse_args(["plan", "olmoe-1b-7b", "--hardware", "h100-sxm-pcie5", "--batch", "8",
                              "--dtype", "float32", "--acceptance", "0.8"])
    plan_cli.run_plan(a)
    text = capsys.readouterr().out
    assert "recommended settings" in text and "OLMoE" in text
    cfg = tmp_path / "m"
    cfg.mkdir()
    (cfg / "config.json").write_text((CONFIG_DIR / "olmoe-1b-7b.json").read_text())
    plan_cli.run_plan(_parser().parse_args(["plan", str(cfg), "--json"]))
    assert json.loads(capsys.readouterr().out)["model"]["family"] == "olmoe"


def test_cli_errors(monkeypatch, tmp_path):
    for argv, msg in [(["plan", "mixtral-8x7b", "--memory", "lots"], "--memory: cannot read 'lots'"),
                      (["plan", "gpt-5"], "unknown model 'gpt-5'"),
                      (["plan", "mixtral-8x7b", "--hardware", "cray"], "unknown hardware profile"),
                      (["plan", "mixtral-8x7b", "--batch", "0"], "--batch"),
                      (["plan", "mixtral-8x7b", "--acceptance", "2"], "--acceptance")]:
        with pytest.raises(PerfError, match=msg):
            plan_cli.run_plan(_parser().parse_args(argv))
    monkeypatch.setattr(plan_cli, "REFERENCE_CONFIG", tmp_path / "missing" / "config.json")
    with pytest.raises(PerfError, match="no MODEL given and the bundled reference model"):
        plan_cli.run_plan(_parser().parse_args(["plan"]))


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from moespec.perf.plots import speedup_vs_batch, write_plots
    m, hw = known_model("mixtral-8x7b"), PROFILES["rtx4090-pcie4"]
    curves = speedup_vs_batch(m, hw, 24 * GiB, batches=(1, 8, 32))
    assert [r["batch"] for r in curves["self"]] == [1, 8, 32]
    paths = write_plots(m, hw, 24 * GiB, 8, tmp_path, batches=(1, 4, 16, 64), k_max=8)
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prefetch_is_priced_with_the_measured_recall():
    """Draft-guided prefetch hides the misses it predicted: the planner takes the recall this engine measured per
    drafter (or the one given), never a published constant; a recall of 0 hides nothing."""
    from moespec.perf.planner import PREFETCH_RECALL
    m = known_model("mixtral-8x7b")
    hw = PROFILES["rtx4090-pcie4"]
    runs = {r: plan(m, hw, 48 * GiB, 4, 0.8, prefetch_recall=r) for r in (None, 0.0, 0.95)}
    self_of = {r: next(c for c in out["speculative"]["candidates"] if c["drafter"] == "self")
               for r, out in runs.items()}
    assert self_of[0.95].get("prefetch_recall") == 0.95 and self_of[0.95]["prefetch_cutoff"] > 0
    assert self_of[None].get("prefetch_recall", PREFETCH_RECALL["self"]) == PREFETCH_RECALL["self"]
    assert self_of[0.0]["prefetch_cutoff"] == 0          # predicting nothing is no gain: no prefetch
    assert self_of[0.95]["tokens_per_s"] > self_of[0.0]["tokens_per_s"]
    assert any("prefetch recall as measured" in a for a in runs[None]["assumptions"])
    with pytest.raises(PerfError, match="prefetch recall must be in"):
        plan(m, hw, 20 * GiB, 1, prefetch_recall=1.5)
