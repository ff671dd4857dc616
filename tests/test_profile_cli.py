"""`moespec profile`: a routing profile from a workload, usable by --expert-policy static."""
import json

from moespec import LLM, SamplingParams
from moespec.cli import main
from moespec.config import OffloadConfig
from moespec.experts import load_profile
from moespec.experts.policy import hot_set


def test_profile_counts_every_routed_token_and_drives_the_static_policy(text_model, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\n    return a + b\n\nimport os\nimport sys\n\nclass Stack:\n")
    out = tmp_path / "profile.json"
    assert main(["profile", str(text_model), "--prompts", str(prompts), "--max-new-tokens", "5",
                 "--expert-cache", "2", "--output", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    llm = LLM(text_model)
    cfg = llm.config
    counts = load_profile(out, cfg.moe_layer_ids, cfg.num_experts)
    assert summary["tokens"] > 3 * 5 and summary["hot_set_slots"] == 2
    for layer in cfg.moe_layer_ids:                  # every position routes to K experts in every MoE layer
        assert sum(counts[layer]) == summary["tokens"] * cfg.top_k
    for row in summary["layers"]:                     # the hot set's share is the top-2 counts' share
        c = sorted(counts[row["layer"]], reverse=True)
        assert row["hot_set_share"] == (c[0] + c[1]) / sum(c)
    # The profile drives the static policy, and the tokens stay those of the resident engine.
    p = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    static = LLM(text_model, offload=OffloadConfig(expert_cache=3, policy="static", hot_profile=str(out)))
    assert static.generate("import os\n", p)[0].token_ids == llm.generate("import os\n", p)[0].token_ids
    for layer in cfg.moe_layer_ids:                  # the profile's hottest experts were preloaded and kept
        pinned = hot_set(counts[layer], 3, cfg.top_k)
        assert pinned and all(counts[layer][e] >= max(counts[layer][x] for x in range(cfg.num_experts)
                                                     if x not in pinned) for e in pinned)
        assert set(pinned) <= set(static.model.experts.cached(layer).tolist())


def test_profile_errors_name_the_problem(text_model, tmp_path, capsys):
    assert main(["profile", str(text_model), "--prompts", "nonsense", "--output", str(tmp_path / "p.json")]) == 2
    assert "--prompts 'nonsense': not a prompt set" in capsys.readouterr().err
    assert main(["profile", str(text_model), "--prompts", "random", "--output", str(tmp_path / "no" / "p.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
