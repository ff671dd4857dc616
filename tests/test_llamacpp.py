"""llama.cpp as a benchmark peer: tools/make_gguf.py converts a checkpoint with llama.cpp's own converter, and
`moespec bench --peer llama.cpp` runs it beside moespec. On float32 weights both engines decode the same greedy
tokens, which checks the converter call, the runner's batching and the comparison at once."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import hf_models
from moespec import LLM, SamplingParams

pytestmark = pytest.mark.slow              # minutes of training / building llama.cpp models

ROOT = Path(__file__).parent.parent
PROMPTS = [[5, 17, 3, 99, 42, 7, 11, 200, 1], [11, 2, 33]]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    """A tiny Mixtral (head_dim 24 != hidden / heads, byte-level BPE) and its float32 GGUF."""
    d = tmp_path_factory.mktemp("lc") / "tiny"
    hf_models.build_text_model(d, family="mixtral")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_gguf.py"), str(d), "--outtype", "f32"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return d, d / "tiny-f32.gguf"


def test_llama_cpp_decodes_the_same_greedy_tokens_as_moespec(gguf):
    from moespec.bench.llamacpp import LlamaCppRunner
    folder, path = gguf
    runner = LlamaCppRunner(path, threads=2, max_batch=2, ctx=64)
    try:
        toks, ttft, decode, extra = runner.generate(PROMPTS, 8)          # both prompts in one batch, ragged
        assert ttft > 0 and decode > 0 and extra == {}
        alone = runner.generate(PROMPTS[1:], 8)[0]
    finally:
        runner.close()
    ref = [o.token_ids for o in LLM(folder, dtype="float32").generate(
        PROMPTS, SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))]
    assert toks == ref and alone == ref[1:]
    assert len(set(ref[0])) > 2                                          # not one token repeated


def test_bench_reports_llama_cpp_beside_moespec(gguf, tmp_path):
    folder, path = gguf
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "moespec.cli", "bench", str(folder), "--dtype", "float32",
                        "--max-new-tokens", "6", "--prompt-len", "8", "--num-prompts", "2", "--batch-size", "1", "2",
                        "--repetitions", "2", "--warmup", "1", "--prefill-len", "16", "--peer", "llama.cpp",
                        "--peer-model", str(path), "--threads", "2", "--output", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert report["machine"]["cpu"] and report["machine"]["threads"] == 2 and report["dtype"] == "float32"
    runs = {(x["engine"], x["test"], x["batch"]): x for x in report["runs"]}
    assert set(runs) == {(e, t, b) for e in ("moespec", "llama.cpp") for t, b in (("tg6", 1), ("tg6", 2), ("pp16", 1))}
    assert runs[("llama.cpp", "tg6", 2)]["peer_model"] == str(path)
    vs = runs[("moespec", "tg6", 2)][f"vs_llama.cpp:{path.name}"]
    assert vs["identical_sequences"] == "4/4" and vs["identical_tokens"] == "24/24" and vs["speedup"] > 0


@pytest.mark.parametrize("args, message", [
    (["--peer", "llama.cpp"], "--peer llama.cpp needs --peer-model FILE.gguf"),
    (["--peer", "llama.cpp", "--peer-model", "/no/such.gguf"], "--peer-model /no/such.gguf is not a file"),
    (["--peer-model", "x.gguf"], "--peer-model is the GGUF file of --peer llama.cpp"),
])
def test_bad_peer_flags_are_clear_errors(args, message, family_dirs):
    r = subprocess.run([sys.executable, "-m", "moespec.cli", "bench", str(family_dirs["mixtral"][0]),
                        "--max-new-tokens", "2", "--num-prompts", "1", "--prefill-len", "0", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"error: {message}" in r.stderr and "Traceback" not in r.stderr, r.stderr
