"""The measured M-rows table and per-step overhead of a hardware profile: interpolation, the step model with and
without them (profiles without a table predict exactly as before), JSON round trip, monotone step times."""
import json
from dataclasses import replace

import pytest

from moespec.assets import REFERENCE_MODEL
from moespec.perf.errors import PerfError
from moespec.perf.hardware import PROFILES, Hardware, get_profile
from moespec.perf.model import ModelDesc, known_model
from moespec.perf.step import Offload, decode_tpot, forward_cost, t_target

MIX, QWEN = known_model("mixtral-8x7b"), known_model("qwen3-30b-a3b")
REF = ModelDesc.from_file(REFERENCE_MODEL, name="reference-moe", dtype_bytes=4.0)
CPU = PROFILES["this-machine"]
MiB = 2 ** 20
# c(M) = M / rate(M): 1e-10, 2e-10, 2e-10 s per parameter pair at M = 1, 4, 8; peak 0.1 TFLOPS above M = 8
TABLE = ((MiB, 1, 0.01), (MiB, 4, 0.02), (MiB, 8, 0.04))
HW = replace(CPU, peak_fp32_tflops=0.1, rows_fp32_tflops=TABLE)


def _gbs_to_table(size, gbs, width):
    """(size, M, TFLOPS) rows from weight GB/s by M = 1, 2, ..., 64 (flops = 2 x M x bytes / width)."""
    return tuple((size, m, g * 1e9 * 2 * m / width / 1e12) for m, g in zip((1, 2, 4, 8, 16, 32, 64), gbs))


# measured on the development CPU (one thread, 2026-11-23): weights of 0.25 MiB taken in turn from a 128 MiB
# pool and one 256 MiB weight; 2 rows cost more than two one-row products, small cold matrices stream slower
MEASURED = replace(CPU, mem_bw_gbs=23.7, peak_fp32_tflops=0.0744, peak_bf16_tflops=0.0715, layer_overhead_s=3e-4,
                   rows_fp32_tflops=_gbs_to_table(MiB // 4, (6.8, 5.2, 3.7, 3.4, 2.7, 2.1, 1.3), 4)
                   + _gbs_to_table(256 * MiB, (15.1, 8.8, 5.1, 3.6, 3.2, 2.3, 1.4), 4),
                   rows_bf16_tflops=_gbs_to_table(MiB // 8, (5.0, 2.0, 2.2, 4.0, 3.0, 2.0, 1.0), 2)
                   + _gbs_to_table(128 * MiB, (10.0, 4.2, 4.5, 5.0, 4.0, 3.0, 2.0), 2),
                   step_overhead_s=4e-4)


@pytest.mark.parametrize("rows,expected", [
    (1, 2e6 * 1e-10),                          # a measured row: 2 x params x M / rate
    (4, 2e6 * 2e-10), (8, 2e6 * 2e-10),        # c(8) = 8 / 0.04e12 = c(4): time flat from 4 to 8 rows
    (2.5, 2e6 * 1.5e-10),                      # linear in M between measured rows
    (0.5, 2e6 * 0.5e-10),                      # proportional below the first row
    (10, 2e6 * (2e-10 + 2 / 0.1e12)),          # above the table each further row costs 1 / peak
])
def test_table_interpolation(rows, expected):
    assert HW.matmul_time(1e6, rows, 4.0) == pytest.approx(expected, rel=1e-12)


def test_matrix_size_interpolation():
    # a second size, 4 MiB, twice as fast at every M: c is interpolated linearly in log(size) between them
    two = replace(HW, rows_fp32_tflops=TABLE + tuple((4 * MiB, m, 2 * tf) for _, m, tf in TABLE))
    for rows in (1, 2.5, 8, 10):
        small, big = HW.matmul_time(1e6, rows, 4.0), HW.matmul_time(1e6, rows, 4.0, 4 * MiB)
        if rows <= 8:
            big = small / 2
        else:                                 # above the table the rows beyond 8 cost 1 / peak at either size
            big = 2e6 * (1e-10 + 2 / 0.1e12)
        assert two.matmul_time(1e6, rows, 4.0, MiB / 2) == pytest.approx(small, rel=1e-12)     # below: nearest
        assert two.matmul_time(1e6, rows, 4.0, MiB) == pytest.approx(small, rel=1e-12)
        assert two.matmul_time(1e6, rows, 4.0, 2 * MiB) == pytest.approx((small + big) / 2, rel=1e-12)
        assert two.matmul_time(1e6, rows, 4.0, 4 * MiB) == pytest.approx(big, rel=1e-12)
        assert two.matmul_time(1e6, rows, 4.0, 64 * MiB) == pytest.approx(big, rel=1e-12)       # above: nearest
    # the default matrix size is one matrix of params x width bytes: 1e6 fp32 parameters = 3.8 MiB
    assert two.matmul_time(1e6, 1, 4.0) == two.matmul_time(1e6, 1, 4.0, 4e6)


def test_table_edges():
    assert HW.matmul_time(1e6, 0, 4.0) == 0.0 and HW.matmul_time(0, 4, 4.0) == 0.0
    # no bf16 table: bf16 weights are priced at the bf16 peak, as without any table
    assert HW.matmul_time(1e6, 3, 2.0) == pytest.approx(2 * 1e6 * 3 / (CPU.peak_bf16_tflops * 1e12))
    # a row measured cheaper per weight pass than a smaller one (noise) is raised to it: time never falls
    noisy = replace(HW, rows_fp32_tflops=((MiB, 1, 0.01), (MiB, 2, 0.04), (MiB, 4, 0.02)))
    assert noisy.matmul_time(1e6, 2, 4.0) == pytest.approx(noisy.matmul_time(1e6, 1, 4.0))
    ts = [noisy.matmul_time(1e6, m, 4.0) for m in (0.5, 1, 1.5, 2, 3, 4, 6, 100)]
    assert all(x <= y for x, y in zip(ts, ts[1:]))
    # the efficiency scales a table like the peaks
    assert replace(HW, flops_eff=0.5).matmul_time(1e6, 4, 4.0) == pytest.approx(2 * HW.matmul_time(1e6, 4, 4.0))


def _old_forward_time(model, hw, batch, t, context, logits_per_row=None):
    """The step model before M-rows tables, all experts resident (uniform routing), written out."""
    N, E, K = batch * t, model.experts, model.top_k
    union = E * (1.0 - (1.0 - K / E) ** N) if model.moe_layers else 0.0
    sliding = model.layers - model.full_attn_layers
    kv_len = (model.full_attn_layers * model.kv_len(context + t, True)
              + sliding * model.kv_len(context + t, False)) / model.layers
    pairs = (model.full_attn_layers * t * model.kv_len(context + (t + 1) / 2, True)
             + sliding * t * model.kv_len(context + (t + 1) / 2, False)) / model.layers
    kv = batch * kv_len * model.kv_values * model.kv_bytes_per_value
    attn = batch * pairs * model.attn_pair_flops
    bw, peak = hw.mem_bw_gbs * 1e9 * hw.mem_eff, hw.peak_flops(model.dtype_bytes)
    moe = max((model.moe_layer_dense_bytes + union * model.expert_bytes + kv) / bw,
              (2 * N * (model.attn_params + model.moe_dense_params + K * model.expert_params) + attn) / peak)
    dense = max((model.dense_layer_bytes + kv) / bw, (2 * N * (model.attn_params + model.mlp_params) + attn) / peak)
    rows = t if logits_per_row is None else logits_per_row
    head = max(model.head_bytes / bw, 2 * batch * rows * model.head_params / peak)
    lo = hw.layer_overhead_s
    return model.moe_layers * (moe + lo) + model.dense_layers * (dense + lo) + head + lo


@pytest.mark.parametrize("hw", list(PROFILES.values()) + [replace(CPU, rows_bf16_tflops=TABLE)])
def test_profiles_without_a_table_predict_as_before(hw):
    # (a bf16 table alone leaves fp32 weights on the old formula)
    models = (MIX, REF, known_model("deepseek-v2-lite")) if hw.rows_bf16_tflops is None else (MIX.with_precision(4.0),
                                                                                             REF)
    for model in models:
        for batch, t, context in ((1, 1, 512), (8, 1, 100), (4, 5, 2048), (64, 1, 0)):
            assert forward_cost(model, hw, batch, t, context).time == pytest.approx(
                _old_forward_time(model, hw, batch, t, context), rel=1e-12, abs=0)
        assert decode_tpot(model, hw, 2, 64) == pytest.approx(_old_forward_time(model, hw, 2, 1, 64), rel=1e-12)


def test_step_model_with_a_table():
    # the reference model (fp32, 6 MoE layers, 16 experts, top-2) on the hand-made table at batch 4, t = 1
    hw, m, B, ctx = replace(HW, step_overhead_s=1e-3), REF, 4, 32
    c = forward_cost(m, hw, B, 1, ctx)
    U = 16 * (1 - (1 - 2 / 16) ** 4)
    assert c.union == pytest.approx(U)
    bw, peak = hw.mem_bw, hw.peak_flops(4.0)
    kv = B * (ctx + 1) * m.kv_values * 4
    attn = B * 1 * (ctx + 1) * m.attn_pair_flops
    dense_p = m.attn_params + m.moe_dense_params
    mm = 2 * dense_p * 2e-10 + U * 2 * m.expert_params * (1e-10 + 1e-10 * (4 * 2 / U - 1) / 3)   # rows 4; 8 / U
    layer = max((dense_p * 4 + U * m.expert_bytes) / bw, mm) + max(kv / bw, attn / peak)
    head = max(m.head_bytes / bw, 2 * m.head_params * 2e-10)                                     # 4 logit rows
    expected = m.moe_layers * (layer + hw.layer_overhead_s) + head + hw.layer_overhead_s + 1e-3
    assert c.time == pytest.approx(expected, rel=1e-12)
    assert c.compute_time == pytest.approx(m.moe_layers * layer + head, rel=1e-12)
    # the step overhead is paid once per forward, the rates stay the same
    c0 = forward_cost(m, replace(hw, step_overhead_s=0.0), B, 1, ctx)
    assert c.time - c0.time == pytest.approx(1e-3) and c.compute_time == c0.compute_time
    # at batch 1 with every row at the GEMV rate, the table agrees with the old model on the same bandwidth
    gemv = replace(CPU, rows_fp32_tflops=((MiB, 1, 2 * CPU.mem_bw_gbs / 4 / 1e3), (MiB, 2, 1.0)))
    assert forward_cost(REF, gemv, 1, 1, 0).time == pytest.approx(forward_cost(REF, CPU, 1, 1, 0).time, rel=0.02)


@pytest.mark.parametrize("model", [MIX, QWEN, REF, known_model("gpt-oss-20b"), known_model("deepseek-v2-lite")])
@pytest.mark.parametrize("hw", [HW, MEASURED])
def test_times_monotone_with_a_table(model, hw):
    def c(m, width):                                        # seconds per parameter pair at m rows
        return hw.matmul_time(1, m, width) / 2
    # worst superlinearity of the tables: c(M) / (M c(1))
    rho = max(c(m, w) / (m * c(1, w)) for m in (1, 2, 3, 4, 8, 16, 32, 64, 100) for w in (4.0, 2.0))
    for off in (None, Offload(model.experts / 4)):
        for B in (1, 4, 64):
            ts = [t_target(model, hw, B, t, 512, offload=off) for t in range(1, 18)]
            assert all(x <= y for x, y in zip(ts, ts[1:]))                       # more tokens never faster
            for k in range(1, 17):
                # a product of 2 rows may cost more than 2 one-row products on a measured machine (rho > 1)
                assert (1 - 0.02) / ((k + 1) * max(rho, 1.0)) <= ts[0] / ts[k] <= 1.0
        bs = [t_target(model, hw, B, 1, 512, offload=off) for B in (1, 2, 4, 8, 16, 64)]
        assert all(x <= y for x, y in zip(bs, bs[1:]))
    # the measured table makes a batch of 8 cost more than the single bandwidth and peak said
    if hw is MEASURED and model is REF:
        flat = replace(hw, rows_fp32_tflops=None, rows_bf16_tflops=None)
        assert decode_tpot(REF, hw, 8, 32) > decode_tpot(REF, flat, 8, 32)


def test_json_round_trip_keeps_the_table(tmp_path):
    assert Hardware.from_json(MEASURED.to_json()) == MEASURED
    path = tmp_path / "hw.json"
    MEASURED.to_json(path)
    back = get_profile(str(path))
    assert back == MEASURED and back.rows_fp32_tflops[0][:2] == (MiB // 4, 1)
    assert type(back.rows_fp32_tflops[0][0]) is int and back.step_overhead_s == 4e-4
    assert decode_tpot(REF, back, 8, 32) == decode_tpot(REF, MEASURED, 8, 32)
    # profiles written before the table existed still load, with no table and no step overhead
    old = {k: v for k, v in json.loads(CPU.to_json()).items()
           if k not in ("rows_fp32_tflops", "rows_bf16_tflops", "step_overhead_s")}
    loaded = Hardware.from_json(json.dumps(old))
    assert loaded == CPU and loaded.rows_fp32_tflops is None and loaded.step_overhead_s == 0.0
    for bad in ('[[1, 1, 0]]', '[[0, 1, 1]]', '[[1, 1, 1], [1, 1, 2]]', '[1, 2]', '[["x", 1, 1]]', '[[1, 1]]'):
        with pytest.raises(PerfError, match="rows_fp32_tflops must be a list of \\[matrix bytes, rows, TFLOPS\\]"):
            Hardware.from_json(CPU.to_json().replace('"rows_fp32_tflops": null', f'"rows_fp32_tflops": {bad}'))
