"""Offloading through the public API: OffloadConfig, capacity specs, LLM stats."""
import pytest

from moespec import LLM, MoespecError, SamplingParams
from moespec.config import OffloadConfig
from moespec.experts import parse_capacity

MiB = 2**20


@pytest.mark.parametrize("spec, slots", [(None, 8), (3, 3), ("5", 5), ("100", 8), ("25%", 2), ("12.5%", 1),
                                         ("10%", 1), ("100%", 8), ("12MiB", 3), ("4MiB", 1), ("13MB", 3),
                                         ("1GiB", 8), ("8 mib", 2)])
def test_capacity_specs(spec, slots):
    assert parse_capacity(spec, num_experts=8, moe_layers=4, slot_bytes=MiB) == slots


@pytest.mark.parametrize("spec, message", [("0", "no slots"), ("1MiB", "less than one expert per MoE layer"),
                                           ("3 parsecs", "unknown unit"), ("lots", "not N, N% or a byte size"),
                                           ("0%", "no slots"), ("2.5", "whole number")])
def test_bad_capacity_specs_are_named(spec, message):
    with pytest.raises(MoespecError, match=message):
        parse_capacity(spec, num_experts=8, moe_layers=4, slot_bytes=MiB)


@pytest.mark.parametrize("kw, message", [({"offload": "tape"}, "offload='tape'"), ({"policy": "fifo"}, "policy"),
                                         ({"prefetch": "all"}, "prefetch"), ({"policy": "static"}, "routing profile"),
                                         ({"io_threads": 0}, "io_threads")])
def test_bad_offload_configs_are_named(kw, message):
    with pytest.raises(MoespecError, match=message):
        OffloadConfig(**kw).validate()


def test_llm_with_offload_reports_expert_stats(family_dirs, tmp_path):
    folder = family_dirs["olmoe"][0]
    prompt = [3, 14, 15, 92, 65, 35]
    p = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    plain = LLM(folder)
    base = plain.generate(prompt, p)[0]
    assert "expert_hits" not in base.stats and plain.expert_stats()["tier"] == "resident"
    llm = LLM(folder, offload=OffloadConfig(expert_cache="25%", offload="disk", offload_dir=str(tmp_path),
                                            prefetch="next-layer"))
    try:
        out = llm.generate([prompt, prompt[:3]], p)
        assert llm.generate(prompt, p)[0].token_ids == base.token_ids
        s = out[0].stats
        assert s["cache_capacity"] == 2 and s["expert_misses"] > 0
        assert s["expert_bytes_read"] > 0 and s["stall_s"] >= 0 and s["expert_hits"] >= 0
        total = llm.expert_stats()
        assert total["misses"] >= s["expert_misses"] and total["capacity"] == 2
        assert set(total["per_layer"]) == set(llm.config.moe_layer_ids)
        assert total["hits"] == sum(v["hits"] for v in total["per_layer"].values())
    finally:
        llm.close()


def test_one_reading_of_sizes_for_every_flag():
    """--expert-cache 2G and --memory 2G / plan --memory 2G mean the same bytes (a bare G is GiB, as for a card)."""
    from moespec.perf.units import parse_size
    for text in ("24M", "24MB", "24MiB", "1.5G"):
        assert parse_capacity(text, num_experts=10**12, moe_layers=1, slot_bytes=1) == parse_size(text), text
    assert parse_capacity("8M", num_experts=10**9, moe_layers=1, slot_bytes=1) == 8 * 2**20
