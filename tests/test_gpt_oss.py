"""gpt-oss with its experts in MXFP4, as the hub ships them: the format against transformers' own reader, the experts
kept 4-bit in RAM, in the expert cache and in the disk tier's file, and every mode exact against plain decoding on
them. (The float checkpoint of the family runs every test of test_models.py, test_kv_cache.py and test_families.py.)"""
import json
import subprocess
import sys

import pytest
import torch

import hf_models
from moespec import LLM, SamplingParams
from moespec.config import OffloadConfig
from moespec.experts.packfile import read_header
from moespec.loading import load_model
from moespec.quant.mxfp4 import FP4_VALUES, dequantize_mxfp4, quantize_mxfp4
from test_models import ragged_batch

PROMPTS = [[5, 17, 33, 9, 60, 2, 41], [7, 7, 120, 14], [90, 3, 3, 3, 45, 61, 8, 12, 30]]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
D = I = 64
E, LAYERS = 6, 3


@pytest.fixture(scope="module")
def mx(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    return d, hf_models.build_gpt_oss_mxfp4(d)


@pytest.fixture(scope="module")
def plain(mx):
    return [o.token_ids for o in LLM(mx[0]).generate(PROMPTS, GREEDY)]


def test_dequantize_matches_transformers_reader():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (40, 48), dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 140, (40, 3), dtype=torch.uint8, generator=g)
    ref = convert_moe_packed_tensors(blocks.view(1, 40, 3, 16), scales.view(1, 40, 3), dtype=torch.float32)[0].t()
    assert torch.equal(dequantize_mxfp4(blocks, scales), ref)
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.bfloat16).float(), ref)    # exact in bf16 too


def test_quantize_round_trips_the_grid_and_rounds_to_nearest():
    g = torch.Generator().manual_seed(1)
    grid = torch.tensor(FP4_VALUES)[torch.randint(0, 16, (8, 64), generator=g)]
    grid[:, ::32] = 6.0                                    # each block's largest magnitude sets its scale
    w = grid * torch.exp2(torch.randint(-6, 6, (8, 2), generator=g).float()).repeat_interleave(32, 1)
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(w)), w)
    x = torch.randn(16, 128, generator=g)
    deq = dequantize_mxfp4(*quantize_mxfp4(x))
    # within half a step of the grid: steps are 0.5 up to 2, then 1, then 2, at the block's scale, the smallest
    # power of two that brings the block within 6
    scale = torch.exp2(torch.ceil(torch.log2(x.view(16, 4, 32).abs().amax(-1) / 6))).repeat_interleave(32, 1)
    assert ((deq - x).abs() <= scale * torch.where(x.abs() / scale < 2, 0.25, torch.where(x.abs() / scale < 4, 0.5, 1.0))
            + 1e-7).all()


def test_transformers_reads_the_mxfp4_checkpoint_as_these_weights(mx):
    """The file is the hub's format: transformers' own MXFP4 reader (dequantizing on the CPU) gives the same model."""
    from transformers import AutoModelForCausalLM
    folder, hf = mx
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    toks = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        assert torch.equal(theirs(toks).logits, hf(toks).logits)


def test_mxfp4_logits_and_greedy_match_transformers(mx):
    folder, hf = mx
    m = load_model(folder)
    prompts = ragged_batch(hf.config.vocab_size)
    toks = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
    for i, p in enumerate(prompts):
        toks[i, :len(p)] = torch.tensor(p)
    out = m.forward(toks, m.new_cache(len(prompts), 32)).logits
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0]
        assert (out[i, :len(p)] - ref).abs().max() < 1e-4
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPTS[2]]), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(PROMPTS[2]):].tolist()
    got = LLM(folder).generate(PROMPTS[2], SamplingParams(max_new_tokens=64, temperature=0, ignore_eos=True))[0]
    assert got.token_ids == ref


# one expert: gate+up [2I, D/2] codes + [2I, D/32] scales, down [D, I/2] + [D, I/32], biases [2I] + [D] in float32,
# each field 64-byte aligned
MXFP4_BLOB = 2 * I * D // 2 + D * I // 2 + 2 * I * D // 32 + D * I // 32 + 4 * (2 * I + D)


def test_experts_stay_mxfp4_in_ram_and_report_their_bytes(mx):
    from moespec.model_info import model_sizes
    from moespec.config import ModelConfig
    folder, _ = mx
    m = load_model(folder)
    pool = m.experts.pool(0)
    assert pool.layout["quant"] == "mxfp4" and pool.blob_bytes == MXFP4_BLOB == 7296
    assert pool.f["p13"].dtype == torch.uint8
    sizes = model_sizes(folder, ModelConfig.from_folder(folder), "auto", None)
    assert sizes["bytes_per_expert"] == MXFP4_BLOB and sizes["bytes_experts"] == MXFP4_BLOB * E * LAYERS
    # float32 experts would take 3 * 64 * 64 * 4 bytes: MXFP4 is 4.25 bits a weight (plus the biases)
    assert MXFP4_BLOB < 0.15 * 3 * D * I * 4
    out = subprocess.run([sys.executable, "-m", "moespec.cli", "inspect", str(folder), "--json"],
                         capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert info["bytes_per_expert"] == MXFP4_BLOB


@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_offloaded_mxfp4_experts_stay_4bit_and_equal_resident(tier, mx, plain, tmp_path):
    folder, _ = mx
    llm = LLM(folder, offload=OffloadConfig(expert_cache=2, offload=tier, offload_dir=str(tmp_path)))
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == plain
    assert outs[0].stats["expert_misses"] > 0
    assert llm.model.experts.pool(0).layout["quant"] == "mxfp4"
    if tier == "disk":
        (f,) = tmp_path.glob("*.experts")
        assert f.name.endswith("-float32-mxfp4.experts")
        h = read_header(f)
        assert h["quant"] == "mxfp4" and h["bias"] is True and h["blob_bytes"] == MXFP4_BLOB
        assert h["stride"] == 8192 and f.stat().st_size == h["data_offset"] + E * LAYERS * 8192 + 4096   # + checksums
    llm.close()


@pytest.mark.parametrize("spec", [{"method": "ngram", "num_speculative_tokens": 3},
                                  {"method": "self", "draft_experts": 3, "num_speculative_tokens": 3}])
def test_speculation_on_mxfp4_experts_equals_plain(spec, mx, plain):
    outs = LLM(mx[0], speculative=spec).generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == plain


def test_requantizing_mxfp4_experts_says_lossy(mx):
    llm = LLM(mx[0], quantize="int8")
    out = llm.generate(PROMPTS[0], GREEDY)[0]
    assert llm.model.experts.pool(0).layout["quant"] == "int8"
    assert out.stats["lossy"] is True and out.stats["lossy_reasons"] == ["int8"] and len(out.token_ids) == 24
    assert LLM(mx[0]).generate(PROMPTS[0], GREEDY)[0].stats["lossy"] is False     # MXFP4 as stored: exact


@pytest.mark.parametrize("cap", ["native", "avx2"])      # avx2: the portable path, built here too
def test_kernel_equals_dequantized_product_and_each_row_alone(cap):
    import torch.nn.functional as F
    from moespec.quant.mxfp4 import build_kernel, kernel
    k = kernel() if cap == "native" else build_kernel("avx2")
    assert k is not None                                     # a compiler is there: the kernel, not the fallback
    g = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (96, 80), dtype=torch.uint8, generator=g)
    scales = torch.randint(118, 132, (96, 5), dtype=torch.uint8, generator=g)
    scales[0, 0], scales[1, 1] = 0, 1                       # 2^-127 (subnormal) and 2^-126
    x = torch.randn(7, 160, generator=g)
    y = k.mxfp4_linear(x, blocks, scales)
    ref = F.linear(x.double(), dequantize_mxfp4(blocks, scales).double())
    assert ((y.double() - ref).abs() <= 1e-5 * ref.abs().amax()).all()
    for i in range(7):                                      # a row computes alike in any batch: verification == decode
        assert torch.equal(k.mxfp4_linear(x[i:i + 1], blocks, scales)[0], y[i])
