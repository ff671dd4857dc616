"""Quantized models through the engine: speculation and offloading stay exact with respect to the quantized
model, the packed file holds the quantized bytes, and the quantization is reported as lossy everywhere."""
import json
import subprocess
import sys

import pytest
import torch

import hf_models
from moespec import LLM, SamplingParams
from moespec.assets import REFERENCE_MODEL
from moespec.config import OffloadConfig
from moespec.experts import packfile
from moespec.quant.scheme import QuantConfig
from packs import edit_header

REFERENCE_DRAFT = REFERENCE_MODEL.parent / "reference-draft"
PROMPTS = ["def add(a, b):\n    return", "import os\n\ndef list_files(path):", "class Stack:\n    def push(self, x):"]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def qmodel(tmp_path_factory):
    """The tiny Qwen3-MoE text model, with experts of width 64 (int4 groups of 32 fit): 4 layers, MoE at 1 and 3."""
    d = tmp_path_factory.mktemp("qtext")
    hf_models.build_text_model(d, moe_intermediate_size=64)
    return d


def tokens(llm, prompts=PROMPTS, params=GREEDY):
    return [o.token_ids for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_speculation_equals_plain_decoding_of_the_quantized_model(method):
    """On the bundled model (tiny random ones repeat one token, where any drafter is trivially right), in float32
    as every exactness claim: the quantized kernels give each row the same bits whatever the batch."""
    q = QuantConfig(method, 64)
    plain = LLM(REFERENCE_MODEL, dtype="float32", quantize=q)
    ref = tokens(plain)
    assert all(len(set(t)) > 4 for t in ref)                           # real text, not one token repeated
    assert [tokens(plain, [p])[0] for p in PROMPTS] == ref              # batch 1 and batch 3 alike
    assert type(plain.model.experts.pool(0).w13[0]).__name__ == ("Int8Weight" if method == "int8" else "Int4Weight")
    for spec in ({"method": "ngram", "num_speculative_tokens": 4},
                 {"method": "self", "num_speculative_tokens": 3, "draft_experts": 4},
                 {"method": "draft_model", "model": str(REFERENCE_DRAFT), "num_speculative_tokens": 3},
                 {"method": "ngram", "num_speculative_tokens": 3, "tree": "2,1,1"}):
        llm = LLM(REFERENCE_MODEL, dtype="float32", quantize=q, speculative=spec)
        assert tokens(llm) == ref, spec
        assert tokens(llm, PROMPTS[:1]) == ref[:1], spec


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_offloaded_quantized_output_equals_resident_quantized_output(method, tier, qmodel, tmp_path):
    q = QuantConfig(method, 32)
    ref = tokens(LLM(qmodel, quantize=q))
    off = OffloadConfig(expert_cache=2, offload=tier, offload_dir=str(tmp_path), prefetch="next-layer")
    llm = LLM(qmodel, quantize=q, offload=off)
    try:
        assert tokens(llm) == ref
        s = llm.expert_stats()
        assert s["misses"] > 0
        # every miss read one quantized blob: the bytes a quantized expert holds, not a bf16 one
        assert s["expert_bytes"] == llm.model.experts.pool(1).blob_bytes
        assert s["bytes_read"] == (s["misses"] + s["prefetch_issued"] + s["preloaded"]) * s["expert_bytes"]
        spec = LLM(qmodel, quantize=q, offload=OffloadConfig(expert_cache=2, offload=tier, offload_dir=str(tmp_path)),
                   speculative={"method": "self", "num_speculative_tokens": 3})
        assert tokens(spec) == ref
        spec.close()
    finally:
        llm.close()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_packed_quantized_experts_read_back_bit_identical(method, qmodel, tmp_path):
    q = QuantConfig(method, 32)
    resident = LLM(qmodel, quantize=q).model.experts
    llm = LLM(qmodel, quantize=q, offload=OffloadConfig(expert_cache=8, offload="disk", offload_dir=str(tmp_path)))
    try:
        store = llm.model.experts.store
        h = store.header
        assert h["quant"] == method and h["group_size"] == (32 if method == "int4" else None)
        assert (h["int4_pack"] is not None) == (method == "int4")
        assert store.path.name.endswith(f"-{q.tag}.experts")
        from moespec.experts.pools import make_pool
        pool = make_pool(store.layout, 8, align=4096)
        for layer in (1, 3):
            store.load(layer, list(range(8)), pool, list(range(8)))
            assert torch.equal(pool.blob, resident.pool(layer).blob)
    finally:
        llm.close()


def test_pack_file_identity_includes_the_quantization(qmodel, tmp_path):
    d = str(tmp_path)
    for q in (None, "int8", QuantConfig("int4", 32), QuantConfig("int4", 64)):
        LLM(qmodel, quantize=q, offload=OffloadConfig(expert_cache=2, offload="disk", offload_dir=d)).close()
    names = sorted(p.name.split("-")[-1] for p in tmp_path.glob("*.experts"))
    assert names == ["bfloat16.experts", "int4g32.experts", "int4g64.experts", "int8.experts"] or \
        names == ["float32.experts", "int4g32.experts", "int4g64.experts", "int8.experts"]
    # An int4 file packed for another CPU class (its packing differs) is rebuilt, never read.
    path = next(tmp_path.glob("*int4g32.experts"))
    raw = bytearray(path.read_bytes())
    edit_header(raw, lambda h: h.update(int4_pack="cpu-other"))
    path.write_bytes(bytes(raw))
    llm = LLM(qmodel, quantize=QuantConfig("int4", 32), offload=OffloadConfig(expert_cache=2, offload="disk",
                                                                              offload_dir=d))
    assert llm.model.experts.store.build_reason == "header mismatch: int4_pack is 'cpu-other', expected " \
        f"{packfile.read_header(path)['int4_pack']!r}"
    llm.close()


def test_stats_and_models_endpoint_say_quantization_is_lossy(qmodel):
    llm = LLM(qmodel, quantize="int8")
    s = llm.generate("x = ", SamplingParams(max_new_tokens=3, temperature=0))[0].stats
    assert s["lossy"] is True and s["lossy_reasons"] == ["int8"] and s["quantize"] == "int8"
    plain = LLM(qmodel).generate("x = ", SamplingParams(max_new_tokens=3, temperature=0))[0].stats
    assert plain["lossy"] is False and plain["lossy_reasons"] == [] and plain["quantize"] == "none"
    from fastapi.testclient import TestClient
    from moespec.serve.app import create_app
    with TestClient(create_app(llm, "q")) as c:
        m = c.get("/v1/models").json()["data"][0]
    assert m["quantization"] == "int8" and m["lossy"] is True


def run(*args):
    return subprocess.run([sys.executable, "-m", "moespec.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_cli_quantize_flags(qmodel, family_dirs):
    r = run("inspect", qmodel, "--json", "--quantize", "int4", "--quantize-group-size", "32")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["quantize"] == "int4" and info["quantize_group_size"] == 32 and info["lossy"] is True
    assert info["checkpoint_dtype"] == info["dtype"] == "float32"
    # hidden 64, width 64: 3*64*64/2 packed bytes + bf16 scale and zero per 32 inputs of each row
    assert info["bytes_per_expert"] == 3 * 64 * 64 // 2 + 2 * 128 * 2 * 2 + 2 * 64 * 2 * 2
    r = run("generate", qmodel, "--prompt", "x", "--max-new-tokens", "4", "--quantize", "int8", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["stats"]["lossy"] is True and r.stderr == ""          # --json: no progress bar, nothing else
    ref = LLM(qmodel, quantize="int8").generate("x", SamplingParams(max_new_tokens=4))[0]
    assert out["token_ids"] == ref.token_ids
    for args, message in [(["--quantize", "int3"], "argument --quantize: invalid choice: 'int3'"),
                          (["--quantize-dense"], "error: --quantize-dense needs --quantize int8 or int4"),
                          (["--quantize", "int4", "--quantize-group-size", "48"], "error: quantize group size 48"),
                          (["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'")]:
        r = run("generate", qmodel, "--prompt", "x", *args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run("generate", family_dirs["mixtral"][0], "--prompt", "1 2", "--quantize", "int4")
    assert r.returncode == 2 and "error: int4 needs in_features divisible by the group size (64)" in r.stderr
