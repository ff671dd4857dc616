"""Weight-only int8 / int4 quantization: the arithmetic against float64, the kernels against dequantized
weights, every family's logits, and the guarantees the engine builds on (row independence, so speculation
over a quantized model equals its plain decoding)."""
import pytest
import torch

import hf_models
from moespec.errors import MoespecError
from moespec.loading import load_model
from moespec.quant.scheme import QuantConfig
from moespec.quant.weights import (Int4Weight, Int8Weight, dequantize_int4, dequantize_int8, pack_int4,
                                   quantize_int4, quantize_int8, unpack_int4)

# Shapes the int4 kernel takes (in_features divisible by the group size 32, out_features by 16) per family.
INT4_SHAPES = {"mixtral": dict(intermediate_size=64),
               "qwen2_moe": dict(hidden_size=64, num_attention_heads=4, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=64, intermediate_size=64),
               "qwen3_moe": dict(moe_intermediate_size=64, intermediate_size=64),
               "olmoe": dict(intermediate_size=64)}
# Relative error ||logits_q - logits|| / ||logits|| allowed on the tiny random models (measured: experts-only int8
# 0.0006-0.0012, int4 0.008-0.015; with --quantize-dense int8 0.010-0.016, int4 0.10-0.16).
TOLERANCE = {("int8", False): 0.01, ("int4", False): 0.05, ("int8", True): 0.05, ("int4", True): 0.3}


def test_int8_round_trip_against_float64():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 80, generator=g) * torch.logspace(-3, 1, 48)[:, None]
    w[3] = 0                                                     # an all-zero row must not divide by zero
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16 and s.shape == (48,)
    w64, s64 = w.double(), s.double()
    assert torch.equal(s, (w64.abs().amax(1) / 127).where(w64.abs().amax(1) > 0, 1.0).to(torch.bfloat16))
    assert torch.equal(q.long(), torch.round(w64 / s64[:, None]).clamp(-128, 127).long())
    err = (dequantize_int8(q, s).double() - w64).abs()
    assert (err <= s64[:, None] / 2 + 1e-12).all()               # half a step, row by row
    assert torch.equal(dequantize_int8(q, s)[3], torch.zeros(80))


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_round_trip_against_float64(group):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 256, generator=g) + torch.linspace(-2, 2, 32)[:, None]
    w[5, :group] = 0.25                                          # a constant group
    q, s, z = quantize_int4(w, group)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and s.shape == z.shape == (32, 256 // group)
    w64 = w.double().view(32, -1, group)
    s64, z64 = s.double()[..., None], z.double()[..., None]
    ref = torch.round((w64 - z64) / s64 + 8).clamp(0, 15).view(32, 256)
    assert torch.equal(q.double(), ref)
    deq = dequantize_int4(q, s, z, group).double().view(32, -1, group)
    assert torch.allclose(deq, (ref.view(32, -1, group) - 8) * s64 + z64, rtol=0, atol=1e-6)
    # within half a step except where bf16 rounding of scale and zero pushed the extremes past 0 or 15
    assert ((deq - w64).abs() <= s64 * 0.5 + (w64.abs() + s64) * 2 ** -7).all()
    assert (deq[5, 0] - 0.25).abs().max() < 1e-2


def test_int4_packing_round_trips_through_the_kernel():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 128, generator=g)
    q, s, z = quantize_int4(w, 32)
    packed, sz = pack_int4(q, s, z)
    assert packed.shape == (64, 64) and packed.dtype == torch.uint8 and sz.shape == (4, 64, 2)
    assert torch.equal(unpack_int4(packed, sz, 32), dequantize_int4(q, s, z, 32).to(torch.bfloat16).float())


@pytest.mark.parametrize("kind", ["int8", "int8-odd", "int4"])
def test_kernels_multiply_by_the_dequantized_weight(kind):
    g = torch.Generator().manual_seed(3)
    in_f = 40 if kind == "int8-odd" else 128        # 40: not a multiple of 16, the int8 kernel's need: fallback path
    w = torch.randn(96, in_f, generator=g) * 0.05
    x = torch.randn(5, in_f, generator=g)
    qw = Int4Weight.from_float(w, 32) if kind == "int4" else Int8Weight.from_float(w)
    assert (kind == "int8-odd") != getattr(qw, "fast", True)
    ref = x.double() @ qw.dequantize().double().t()
    out = qw.linear(x)
    assert out.dtype == x.dtype and out.shape == (5, 96)
    # activations enter the kernel as bf16 and results leave as bf16: about 2^-8 relative
    assert ((out.double() - ref).abs() <= 2 ** -7 * (x.abs().double() @ qw.dequantize().abs().double().t()) + 1e-6).all()


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_each_row_is_computed_alone(kind):
    """A row's product does not depend on how many rows are multiplied with it: what makes verification of k+1
    tokens agree bit for bit with decoding them one at a time."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(256, 256, generator=g) * 0.05
    qw = Int4Weight.from_float(w, 64) if kind == "int4" else Int8Weight.from_float(w)
    x = torch.randn(33, 256, generator=g).to(torch.bfloat16)
    full = qw.linear(x)
    for m in (1, 2, 5, 16, 17):
        assert torch.equal(qw.linear(x[:m]), full[:m])
    assert torch.equal(torch.cat([qw.linear(x[i:i + 1]) for i in range(33)]), full)


@pytest.fixture(scope="module")
def int4_dirs(tmp_path_factory):
    out = {}
    for fam, shape in INT4_SHAPES.items():
        d = tmp_path_factory.mktemp(f"q-{fam}")
        hf_models.build(fam, d, **shape)
        out[fam] = d
    return out


@pytest.mark.parametrize("family", list(INT4_SHAPES))
@pytest.mark.parametrize("method, dense", list(TOLERANCE))
def test_quantized_logits_stay_close_to_the_float_model(family, method, dense, int4_dirs):
    folder = int4_dirs[family]
    toks = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(5))
    ref_model = load_model(folder)
    ref = ref_model.forward(toks, ref_model.new_cache(2, 16)).logits
    m = load_model(folder, quant=QuantConfig(method, 32, dense))
    out = m.forward(toks, m.new_cache(2, 16)).logits
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < TOLERANCE[(method, dense)], rel
    pool = m.experts.pool(m.cfg.moe_layer_ids[0])
    assert type(pool.w13[0]).__name__ == ("Int8Weight" if method == "int8" else "Int4Weight")
    head = type(m.w.lm_head).__name__
    assert head == ("Tensor" if not dense else "Int8Weight" if method == "int8" or m.cfg.vocab_size % 16 else "Int4Weight")


def test_quantized_pools_hold_half_and_a_quarter_of_the_bytes(int4_dirs):
    folder = int4_dirs["mixtral"]               # hidden 64, expert width 64
    sizes = {}
    for q in (None, "int8", "int4"):
        m = load_model(folder, dtype="bfloat16", quant=q)
        pool = m.experts.pool(0)
        sizes[q] = pool.blob_bytes if q else 3 * 64 * 64 * 2
    assert sizes[None] == 24576
    # int8: 3*64*64 weights + bf16 scales (128 + 64), each field padded to 64 bytes
    assert sizes["int8"] == 3 * 64 * 64 + 2 * 128 + 2 * 64
    # int4 (default group 64): half a byte per weight + a bf16 scale and zero per 64 inputs of each row
    assert sizes["int4"] == 3 * 64 * 64 // 2 + (128 * 2 * 2) + (64 * 2 * 2)


def test_bad_quantization_settings_are_clear_errors(family_dirs, int4_dirs):
    with pytest.raises(MoespecError, match="quantize='int3' is not one of: none, int8, int4"):
        QuantConfig.parse("int3")
    with pytest.raises(MoespecError, match="group size 48 is not one of: 32, 64, 128, 256"):
        QuantConfig.parse({"method": "int4", "group_size": 48})
    with pytest.raises(MoespecError, match="unknown field"):
        QuantConfig.parse({"method": "int8", "bits": 8})
    with pytest.raises(MoespecError, match="--quantize-dense needs --quantize int8 or int4"):
        QuantConfig("none", dense=True).validate()
    # The tiny Mixtral's experts are [96, 64] and [64, 48]: 48 inputs do not split into groups of 32.
    with pytest.raises(MoespecError, match=r"int4 needs in_features divisible by the group size \(32\).*\[64, 48\]"):
        load_model(family_dirs["mixtral"][0], quant=QuantConfig("int4", 32))
    assert QuantConfig.parse("none") is None and QuantConfig.parse(None) is None


def test_dense_model_quantizes_only_with_dense(tmp_path):
    hf_models.build("qwen3", tmp_path / "d")
    with pytest.raises(MoespecError, match="no routed experts to quantize; add --quantize-dense"):
        load_model(tmp_path / "d", quant="int8")
    m = load_model(tmp_path / "d", quant=QuantConfig("int8", dense=True))
    assert isinstance(m.w.layers[0].mlp.w13, Int8Weight)


def test_large_int8_products_may_dequantize_but_stay_close():
    """Prefill-sized products (dequant_rows or more rows) may run dequantize-then-GEMM where that is faster here;
    below 256 rows the kernel always runs, so verification and decoding agree bit for bit."""
    from moespec.quant.weights import DEQUANT_MIN_ROWS
    g = torch.Generator().manual_seed(6)
    qw = Int8Weight.from_float(torch.randn(256, 512, generator=g) * 0.05)
    assert qw.dequant_rows is None or qw.dequant_rows >= DEQUANT_MIN_ROWS
    x = torch.randn(600, 512, generator=g).to(torch.bfloat16)
    big = qw.linear(x)
    rows = torch.cat([qw.linear(x[i:i + 100]) for i in range(0, 600, 100)])   # 100-row products: the kernel
    assert torch.equal(rows[:100], qw.linear(x[:100]))
    assert torch.allclose(big.float(), rows.float(), rtol=2 ** -6, atol=1e-2)
    qw.dequant_rows = 300                                                       # force the other path
    assert torch.allclose(qw.linear(x).float(), rows.float(), rtol=2 ** -6, atol=1e-2)
