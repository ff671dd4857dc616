"""The command line as users run it: JSON contract, errors without stack traces."""
import json
import subprocess
import sys

import pytest

import hf_models


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    hf_models.build_text_model(d, family="mixtral")
    return d


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "moespec.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


def test_generate_json_is_exactly_one_object(text_model):
    r = run("generate", text_model, "--prompt", "def f(x):", "--max-new-tokens", "8", "--temperature", "0",
            "--ignore-eos", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"text", "token_ids", "prompt_token_ids", "finish_reason", "stats"}
    assert len(out["token_ids"]) == 8 and out["finish_reason"] == "length"
    for k in ("prompt_tokens", "new_tokens", "ttft_s", "decode_s", "tokens_per_s"):
        assert k in out["stats"]
    from moespec import LLM, SamplingParams
    ref = LLM(text_model).generate("def f(x):", SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))[0]
    assert out["token_ids"] == ref.token_ids and out["text"] == ref.text


def test_generate_streams_text(text_model):
    r = run("generate", text_model, "--prompt", "import", "--max-new-tokens", "6", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert "tok/s" in r.stderr


def test_inspect_json(text_model):
    r = run("inspect", text_model, "--json")
    info = json.loads(r.stdout)
    assert info["family"] == "mixtral" and info["experts"] == 6 and info["top_k"] == 2
    assert info["bytes_per_expert"] == 3 * 64 * 48 * 4


@pytest.mark.parametrize("args, message", [
    (["generate", "/no/such/model", "--prompt", "x"], "error: model folder /no/such/model does not exist"),
    (["generate", "{m}", "--prompt", "x", "--top-p", "2"], "error: invalid sampling value: top_p=2.0"),
    (["generate", "{m}", "--prompt", "x", "--dtype", "fp8"], "invalid choice: 'fp8'"),
])
def test_errors_are_one_clear_line(text_model, args, message):
    r = run(*[a.format(m=text_model) for a in args])
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_env_variable_sets_a_flag(text_model):
    import os
    r = run("inspect", text_model, "--json", env={**os.environ, "MOESPEC_DTYPE": "bfloat16"})
    assert json.loads(r.stdout)["bytes_per_expert"] == 3 * 64 * 48 * 2


@pytest.mark.slow
def test_generate_with_disk_offload_matches_resident(text_model, tmp_path):
    base = ["generate", text_model, "--prompt", "def f(x):", "--max-new-tokens", "10", "--temperature", "0",
            "--ignore-eos", "--json"]
    resident = json.loads(run(*base).stdout)
    r = run(*base, "--expert-cache", "2", "--offload", "disk", "--offload-dir", tmp_path / "off",
            "--prefetch", "next-layer")
    assert r.returncode == 0, r.stderr
    off = json.loads(r.stdout)
    assert off["token_ids"] == resident["token_ids"]
    s = off["stats"]
    assert s["cache_capacity"] == 2 and s["expert_misses"] > 0
    bytes_per_expert = 3 * 64 * 48 * 4
    assert s["expert_bytes_read"] % bytes_per_expert == 0 and s["expert_bytes_read"] > 0
    r = run(*base, "--expert-cache", "lots")
    assert r.returncode == 2 and "error:" in r.stderr and "lots" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_inspect_shows_what_fits_in_a_budget(text_model):
    """inspect --memory shows the plan a run with that --memory would make (moespec/memory.py)."""
    big = json.loads(run("inspect", text_model, "--json", "--memory", "1GiB").stdout)
    assert big["experts_per_layer_in_budget"] == 6 and big["fits_entirely"] is True
    plan = big["memory_plan"]
    slot = -(-3 * 64 * 48 * 4 // 4096) * 4096          # a float32 expert's blob, page-rounded
    assert plan["resident"] and plan["expert_bytes"] == slot and "all resident" in plan["summary"]
    budget = plan["fixed"] + 2 * 2 * slot + 100        # the same fixed part, room for 2 experts in each MoE layer
    fit = json.loads(run("inspect", text_model, "--json", "--memory", str(budget)).stdout)
    assert fit["experts_per_layer_in_budget"] == 2 and fit["fits_entirely"] is False
    assert "2 of 6 per MoE layer cached over the disk tier" in fit["memory_plan"]["summary"]
    r = run("inspect", text_model, "--memory", "lots")
    assert r.returncode == 2 and "--memory: cannot read 'lots' as a size" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--hot-profile", "p.json"], "--hot-profile is the routing profile of --expert-policy static"),
    (["--expert-cache", "2", "--prefetch-cutoff", "2"], "--prefetch-cutoff sets how deep draft-guided prefetch"),
    (["--expert-cache", "2", "--prefetch-min-prob", "0.5"], "--prefetch-min-prob filters next-layer prefetch"),
    (["--expert-policy", "lfu"], "--expert-policy shapes the expert cache: add --expert-cache"),
    (["--draft-model", "d"], "--draft-model is the draft of --spec draft_model"),
    (["--spec", "ngram", "--speculative-config", '{"method": "ngram"}'],
     "--spec and --speculative-config both describe speculation"),
    (["--draft-len", "3", "--speculative-config", '{"method": "ngram"}'], "--draft-len and --speculative-config"),
])
def test_flags_that_would_not_apply_are_refused_not_ignored(args, message):
    """Parsed without loading anything: the namespace goes through the same config builders as every command."""
    from moespec.cli import build_parser
    from moespec.errors import MoespecError
    from moespec.flags import offload_config, spec_config
    a = build_parser().parse_args(["generate", "m", "--prompt", "x", *args])
    with pytest.raises(MoespecError, match=message.replace("(", r"\(")):
        offload_config(a)
        spec_config(a)
