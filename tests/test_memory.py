"""`--memory LIMIT`: the plan's arithmetic, what the engine chooses from it, and that it holds inside a cgroup
of that size (bench --memory-cap)."""
import json
import subprocess
import sys

import pytest

import hf_models
from moespec import LLM, SamplingParams
from moespec.errors import MoespecError
from moespec.memory import PAGE, RESERVE_BASE, plan_memory

MB = 10 ** 6


def test_plan_splits_the_budget_in_order():
    kw = dict(dense_bytes=80 * MB, expert_blob_bytes=17 * MB + 5, moe_layers=8, experts=16, kv_bytes_per_token=65536,
              max_model_len=1000, batch=2, hidden=1024, expert_width=2816, top_k=2, runtime=250 * MB)
    p = plan_memory(1_200 * MB, **kw)
    slot = -(-(17 * MB + 5) // PAGE) * PAGE                       # a slot is the blob rounded up to a page
    assert p.expert_bytes == slot and p.kv == 65536 * 2000
    assert p.reserve == RESERVE_BASE + 2 * slot + 2000 * (24 * 1024 + 8 * 2816 * 2 // 16)
    assert p.slots == (1_200 * MB - p.fixed) // (slot * 8) and not p.resident
    assert p.fixed + p.expert_cache <= 1_200 * MB < p.fixed + p.expert_cache + slot * 8
    big = plan_memory(10_000 * MB, **kw)
    assert big.resident and big.slots == 16
    with pytest.raises(MoespecError, match=r"--memory 0\.50 GB is too small: .* need 0\.\d\d GB, leaving .* one expert "
                                           r"per MoE layer needs 0\.14 GB; lower --max-model-len"):
        plan_memory(500 * MB, **kw)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("mem")
    hf_models.build_text_model(d, family="mixtral")
    return d


def test_llm_under_a_budget_offloads_and_decodes_the_same_tokens(model, tmp_path, monkeypatch):
    import moespec.memory as mm
    from moespec import OffloadConfig
    ref = LLM(model, dtype="float32")
    prompts = [[5, 17, 3, 99, 42, 7], [11, 2]]
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    want = [o.token_ids for o in ref.generate(prompts, params)]
    monkeypatch.setattr(mm, "rss_bytes", lambda: 100 * MB)        # a fixed runtime, so the budget below is exact
    full = LLM(model, dtype="float32", memory=1_000 * MB, max_model_len=64, max_batch=2).memory_plan
    assert full.resident and full.runtime == 100 * MB and full.slots == 6
    per_layer = full.expert_bytes * full.moe_layers
    limit = full.fixed + 2 * per_layer + per_layer // 2                # room for 2.5 of the 6 experts per layer
    llm = LLM(model, dtype="float32", memory=limit, max_model_len=64, max_batch=2,
              offload=OffloadConfig(offload_dir=str(tmp_path)))
    p = llm.memory_plan
    assert p.slots == 2 and not p.resident and p.fixed == full.fixed and p.max_model_len == 64 and p.batch == 2
    assert p.expert_bytes == -(-3 * 64 * 48 * 4 // PAGE) * PAGE       # a float32 expert's blob, rounded to a page
    # the OffloadConfig given carries the other settings (here its default prefetch, none)
    assert llm.offload.expert_cache == 2 and llm.offload.offload == "disk" and llm.offload.prefetch == "none"
    out = llm.generate(prompts, params)
    assert [o.token_ids for o in out] == want                          # offloaded under the plan: same tokens
    assert out[0].stats["memory_plan"]["slots"] == 2 and out[0].stats["expert_misses"] > 0
    with pytest.raises(MoespecError, match="3 prompts at once, but the --memory plan left KV room for 2"):
        llm.generate(prompts + prompts[:1], params)
    llm.close()
    with pytest.raises(MoespecError, match="give --memory or --expert-cache, not both"):
        LLM(model, memory="1GB", offload=OffloadConfig(expert_cache=2))
    with pytest.raises(MoespecError, match="--memory: cannot read 'lots' as a size"):
        LLM(model, memory="lots")
    with pytest.raises(MoespecError, match="--quantize auto picks the precision that fits --memory"):
        LLM(model, quantize="auto")


def test_quantize_auto_takes_the_most_precise_that_fits(model, monkeypatch):
    import moespec.memory as mm
    monkeypatch.setattr(mm, "rss_bytes", lambda: 100 * MB)
    full = LLM(model, dtype="float32", memory=1_000 * MB, max_model_len=64, quantize="auto")
    assert full.quant is None and full.memory_plan.resident                       # float fits: no quantization
    f32 = full.memory_plan
    tight = f32.fixed + f32.expert_cache // 2                                     # half of the float experts' bytes
    llm = LLM(model, dtype="float32", memory=tight, max_model_len=64, quantize="auto")
    assert llm.quant is not None and llm.quant.method == "int8" and llm.memory_plan.resident   # int8: a quarter


def test_cli_prints_the_plan_and_refuses_a_budget_too_small(model):
    r = subprocess.run([sys.executable, "-m", "moespec.cli", "generate", str(model), "--prompt", "x", "--memory",
                        "10MB", "--max-new-tokens", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error: --memory 0.01 GB is too small: the runtime" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "moespec.cli", "generate", str(model), "--prompt", "x", "--memory",
                        "4GB", "--max-new-tokens", "2", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith("--memory 4.00 GB: runtime") and "all resident" in r.stderr, r.stderr
    assert json.loads(r.stdout)["stats"]["memory_plan"]["resident"] is True


@pytest.mark.slow
def test_memory_cap_runs_in_a_cgroup_or_says_why_not(tmp_path):
    """The budget holds: a run with --memory equal to a cgroup's limit is never killed and never hits it."""
    from moespec.bench.cgroup import version
    from moespec.bench.synthetic import make_synthetic
    # 2 layers x 32 experts of 3 MiB (200 MB of experts): under 520 MB, after the runtime (0.24-0.30 GB seen), only
    # a part fits
    folder = make_synthetic(tmp_path / "m", "small", num_hidden_layers=2, num_local_experts=32)
    out = tmp_path / "capped.json"
    cmd = [sys.executable, "-m", "moespec.cli", "bench", str(folder), "--max-new-tokens", "8", "--num-prompts", "1",
           "--repetitions", "1", "--warmup", "0", "--prefill-len", "0", "--offload-dir", str(tmp_path / "off"),
           "--memory-cap", "520MB", "--output", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if version() == 0:
        assert r.returncode == 2 and "error: --memory-cap needs cgroups" in r.stderr
        return
    try:
        open("/sys/fs/cgroup/memory/cgroup.procs" if version() == 1 else "/sys/fs/cgroup/cgroup.procs", "a").close()
    except OSError:
        assert r.returncode == 2 and "cannot set up a cgroup" in r.stderr
        return
    assert r.returncode == 0, r.stderr
    run = json.loads(out.read_text())["runs"][0]
    assert run["engine"] == "moespec" and run["exit_code"] == 0 and not run["killed"], run
    assert run["cgroup"]["peak_bytes"] <= 520 * MB and run["cgroup"]["failcnt"] == 0, run["cgroup"]
    plan = run["memory_plan"]
    assert plan["limit"] == 520 * MB and not plan["resident"] and 1 <= plan["slots"] < 32
    assert run["runs"][0]["decode_tok_s"]["mean"] > 0
