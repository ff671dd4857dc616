"""The reference-model pipeline end to end at toy scale: train, export, and load the export everywhere."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow              # minutes of training / building llama.cpp models

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "train_reference.py"
PROMPT = "def load(path):\n"


def run_script(*args, timeout=240):
    # One thread: the toy models gain nothing from more, and on a busy machine extra threads oversubscribe.
    r = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--threads", "1", *map(str, args)],
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("reference")
    run_script("--run", d / "run", "--export", d / "out")
    return d


def test_export_writes_both_folders(tiny):
    for name in ("reference-moe", "reference-draft"):
        f = tiny / "out" / name
        for fn in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                   "tokenizer_config.json", "README.md", "loss_curve.png", "training_log.jsonl"):
            assert (f / fn).is_file(), f / fn
        assert (f / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        kind = "moe" if name.endswith("moe") else "draft"
        assert (f / "training_log.jsonl").read_text() == (tiny / "run" / kind / "log.jsonl").read_text()
        assert (f / "tokenizer.json").read_bytes() == (tiny / "run" / "data" / "tokenizer.json").read_bytes()
    assert not [p for p in (tiny / "out").iterdir() if p.name.startswith(".")], "staging directory left behind"


def test_checkpoint_layout_is_a_standard_qwen3_moe_checkpoint(tiny):
    from safetensors import safe_open
    f = tiny / "out" / "reference-moe"
    cfg = json.loads((f / "config.json").read_text())
    with safe_open(str(f / "model.safetensors"), "pt") as st:
        assert st.metadata() == {"format": "pt"}
        names = set(st.keys())
        assert {st.get_tensor(n).dtype for n in names} == {torch.bfloat16}
    assert not any(n.startswith("lm_head") for n in names)
    E, L = cfg["num_experts"], cfg["num_hidden_layers"]
    for i in range(L):
        p = f"model.layers.{i}."
        assert {p + "mlp.gate.weight", p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"} <= names
        for e in range(E):
            assert {f"{p}mlp.experts.{e}.{w}_proj.weight" for w in ("gate", "up", "down")} <= names
    tok = json.loads((f / "tokenizer.json").read_text())
    vocab = {t["content"]: t["id"] for t in tok["added_tokens"]}
    eos, im_end = vocab["<|endoftext|>"], vocab["<|im_end|>"]
    assert cfg["model_type"] == "qwen3_moe" and cfg["dtype"] == "bfloat16"
    assert cfg["eos_token_id"] == eos == cfg["pad_token_id"] and cfg["bos_token_id"] is None
    assert cfg["max_position_embeddings"] == 4096 and cfg["tie_word_embeddings"] is True
    assert not cfg.get("output_router_logits")
    gen = json.loads((f / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [eos, im_end] and gen["pad_token_id"] == eos and gen["do_sample"] is False
    tc = json.loads((f / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast" and tc["bos_token"] is None
    assert tc["eos_token"] == tc["pad_token"] == "<|endoftext|>" and tc["model_max_length"] == 4096
    assert "<|im_start|>" in tc["chat_template"]
    draft = json.loads((tiny / "out" / "reference-draft" / "config.json").read_text())
    assert draft["model_type"] == "qwen3" and draft["vocab_size"] == cfg["vocab_size"]


@pytest.mark.parametrize("name", ["reference-moe", "reference-draft"])
def test_moespec_and_transformers_give_the_same_greedy_output(tiny, name):
    from transformers import AutoModelForCausalLM

    from moespec import LLM, SamplingParams
    folder = tiny / "out" / name
    llm = LLM(folder, dtype="float32")
    out = llm.generate(PROMPT, SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 24 and isinstance(out.text, str) and out.text
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([out.prompt_token_ids])
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
    assert out.token_ids == ref


def test_card_and_eval_json(tiny):
    f = tiny / "out" / "reference-moe"
    card = (f / "README.md").read_text()
    for heading in ("## Architecture", "## Data", "## Training", "## Evaluation", "## Routing", "## Samples", "## Limits"):
        assert heading in card
    assert "loss_curve.png" in card and "AVX512-BF16" in card and "4096" in card and "not a useful assistant" in card
    assert "Greedy with `repetition_penalty=1.2` (`--repetition-penalty 1.2`), same prompts:" in card
    ev = json.loads((f / "eval.json").read_text())
    for model in ("moe", "draft"):
        r = ev[model]
        assert set(r["heldout"]) == {"stdlib_val", "chat_val"}   # the toy corpus has no site-packages files
        for v in list(r["heldout"].values()) + list(r["unseen_code"].values()):
            assert v["tokens"] > 0 and 0 < v["nats_per_token"] < 10 and 0 < v["bits_per_byte"] < 10
        assert set(r["unseen_code"]) == {"rich", "tokenizers", "safetensors"}
        assert all(u["files"] > 0 for u in r["unseen_code"].values())
        prompts = ["def fibonacci(n):", "class Stack:", "import os\n\n\ndef list_files(path):"]
        assert [(s["prompt"], s["repetition_penalty"]) for s in r["samples"]] == \
            [(p, 1.0) for p in prompts] + [(p, 1.2) for p in prompts]      # plain greedy, then with a penalty
        assert ev["export"][model]["verify"]["max_abs_logit_diff"]["transformers"] <= 1e-4
    rt = ev["moe"]["routing"]
    assert rt["reuse_uniform_random"] == pytest.approx(1 - 1 / 6, abs=1e-3)  # 4 experts, top-2: C(2,2)/C(4,2)
    for layer in rt["layers"]:
        assert sum(layer["share"]) == pytest.approx(1.0, abs=1e-3) and len(layer["share"]) == 4
        for k in ("min_share", "max_share", "dead_experts", "reuse_any", "reuse_same_set", "reuse_any_shuffled"):
            assert k in layer
    assert set(ev["draft_agreement"]) == {"stdlib_val", "chat_val"}
    assert "eval.json" not in {p.name for p in (tiny / "out" / "reference-draft").iterdir()}


def test_stage_export_reexports_a_trained_run(tiny):
    run_script("--run", tiny / "run", "--stage", "export", "--export", tiny / "again")
    for name in ("reference-moe", "reference-draft"):
        a, b = tiny / "out" / name, tiny / "again" / name
        assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
        assert (a / "config.json").read_text() == (b / "config.json").read_text()
    a = json.loads((tiny / "out" / "reference-moe" / "eval.json").read_text())
    b = json.loads((tiny / "again" / "reference-moe" / "eval.json").read_text())
    assert a["moe"]["heldout"] == b["moe"]["heldout"] and a["moe"]["samples"] == b["moe"]["samples"]


def test_continued_pre_training_and_its_card(tiny, tmp_path):
    import shutil

    def continue_run(src, dst, lr):               # same data and draft; the MoE continues from run `src`
        dst.mkdir()
        for part in ("data", "draft"):
            shutil.copytree(tiny / "run" / part, dst / part)
        shutil.copyfile(tiny / "run" / "manifest.tsv", dst / "manifest.tsv")
        r = run_script("--run", dst, "--stage", "moe", "--init-from", src / "moe" / "ckpt.pt", "--lr", lr,
                       "--warmup", "2")
        assert "moe: initialised from" in r.stdout
        return torch.load(dst / "moe" / "ckpt.pt", weights_only=False)
    first = torch.load(tiny / "run" / "moe" / "ckpt.pt", weights_only=False)
    second = continue_run(tiny / "run", tmp_path / "run2", "5e-4")
    third = continue_run(tmp_path / "run2", tmp_path / "run3", "3e-4")       # a run that continued a continued one
    stages = json.loads((tmp_path / "run3" / "moe" / "prior.json").read_text())["stages"]
    assert [(s["step"], s["cfg"]) for s in stages] == [(first["step"], first["cfg"]), (second["step"], second["cfg"])]
    assert all(s["log"] for s in stages)
    assert second["cfg"]["lr"] == 5e-4 and third["cfg"]["lr"] == 3e-4 and third["cfg"]["warmup_steps"] == 2
    run_script("--run", tmp_path / "run3", "--stage", "export", "--export", tmp_path / "out")
    f = tmp_path / "out" / "reference-moe"
    card = (f / "README.md").read_text()
    assert "| stage 1 | from scratch" in card and "| stage 2 | continued from the stage-1 weights" in card
    assert "| stage 3 | continued training from the stage-2 weights" in card
    n1, n2, n3 = (c["step"] * 64 * 4 for c in (first, second, third))   # tiny runs: ctx 64, batch 4
    sys.path.insert(0, str(ROOT / "tools" / "reference"))
    from card import _n
    assert f"| tokens seen | {_n(n1 + n2 + n3)} in all |" in card
    recs = [json.loads(x) for x in (f / "training_log.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in recs if "ce" in x]
    total = first["step"] + second["step"] + third["step"]
    assert steps == sorted(steps) and first["step"] + second["step"] < steps[-1] <= total
    assert recs[-1]["step"] == total and "val_stdlib" in recs[-1]      # the final eval
    assert max(x["tokens"] for x in recs) == n1 + n2 + n3               # counted from the start of stage 1


def test_draft_distilled_from_the_moe_and_its_card(tiny, tmp_path):
    """The draft continues from its released weights, trained against the MoE's next-token distribution."""
    import shutil
    dst = tmp_path / "run"
    dst.mkdir()
    for part in ("data", "moe"):
        shutil.copytree(tiny / "run" / part, dst / part)
    shutil.copyfile(tiny / "run" / "manifest.tsv", dst / "manifest.tsv")
    r = run_script("--run", dst, "--stage", "draft", "--draft-init-from", tiny / "run" / "draft" / "ckpt.pt",
                   "--distill-from", dst / "moe" / "ckpt.pt", "--distill-weight", "0.6", "--draft-lr", "1e-3")
    assert "draft: initialised from" in r.stdout
    ck = torch.load(dst / "draft" / "ckpt.pt", weights_only=False)
    assert ck["cfg"]["distill"] == 0.6 and ck["cfg"]["lr"] == 1e-3
    before = torch.load(tiny / "run" / "draft" / "ckpt.pt", weights_only=False)["model"]
    assert any(not torch.equal(before[k], v) for k, v in ck["model"].items())
    kd = [json.loads(x)["kd"] for x in (dst / "draft" / "log.jsonl").read_text().splitlines() if '"kd"' in x]
    assert kd and all(v > 0 for v in kd)
    run_script("--run", dst, "--stage", "export", "--export", tmp_path / "out")
    card = (tmp_path / "out" / "reference-draft" / "README.md").read_text()
    assert "| stage 2 | continued training from the stage-1 weights" in card
    assert "0.6 × cross-entropy against the MoE's next-token distribution" in card


def test_distill_loss_is_the_cross_entropy_against_the_teacher():
    sys.path.insert(0, str(ROOT / "tools" / "reference"))
    from train import distill_loss
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g)
    p = torch.softmax(t, -1)
    assert torch.allclose(distill_loss(s, t), -(p * torch.log_softmax(s, -1)).sum(-1).mean())
    # minimised by the teacher itself (the gap is the KL divergence); a one-hot teacher gives plain CE
    assert distill_loss(t, t) < distill_loss(s, t)
    hot = torch.full((1, 1, 11), -1e4)
    hot[0, 0, 4] = 0
    ce = torch.nn.functional.cross_entropy(s[:1, :1].reshape(1, 11), torch.tensor([4]))
    assert torch.allclose(distill_loss(s[:1, :1], hot), ce)


def test_stage_export_refuses_a_run_without_checkpoints(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--run", str(tmp_path / "none"), "--stage", "export",
                        "--export", str(tmp_path / "out")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "is not a trained run" in r.stderr and not (tmp_path / "none").exists()
