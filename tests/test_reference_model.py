"""The bundled reference models (src/moespec/assets/reference-{moe,draft}) as users get them.

They are exported at the end of `tools/train_reference.py --run runs/reference --export src/moespec/assets`.
To develop these tests against another export, point MOESPEC_TEST_REFERENCE_DIR at the folder holding
its reference-moe/ and reference-draft/ (the recipe-specific assertions then read the export's own config).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moespec.assets import ASSETS, REFERENCE_DRAFT, REFERENCE_MODEL

OVERRIDE = os.environ.get("MOESPEC_TEST_REFERENCE_DIR")
BASE = Path(OVERRIDE) if OVERRIDE else ASSETS
MOE, DRAFT = BASE / "reference-moe", BASE / "reference-draft"
PROMPTS = ["def fibonacci(n):\n", "import json\n\n\nclass Config:\n", "    for i in range(len(items)):\n"]
# The recipe in tools/train_reference.py (MOE, DRAFT); an override export is checked against its own config.
RECIPE = {"family": "qwen3_moe", "layers": 6, "hidden_size": 256, "experts": 16, "top_k": 2, "vocab_size": 8192}


def test_bundled_paths():
    assert REFERENCE_MODEL == ASSETS / "reference-moe" and REFERENCE_DRAFT == ASSETS / "reference-draft"
    for f in (MOE, DRAFT):
        assert (f / "config.json").is_file(), f"{f} is missing: export the trained reference run into {BASE}"


@pytest.mark.parametrize("folder", [MOE, DRAFT], ids=["moe", "draft"])
def test_transformers_and_moespec_greedy_outputs_are_identical(folder):
    from transformers import AutoModelForCausalLM

    from moespec import LLM, SamplingParams
    llm = LLM(None if folder == REFERENCE_MODEL else folder, dtype="float32")
    assert llm.path == folder
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    params = SamplingParams(max_new_tokens=32, temperature=0, ignore_eos=True)
    for prompt in PROMPTS:
        out = llm.generate(prompt, params)[0]
        ids = torch.tensor([out.prompt_token_ids])
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
        assert out.token_ids == ref, prompt
        assert out.text == llm.tokenizer.decode(ref)


def test_tokenizer_round_trips_source_code_exactly():
    import json.decoder as mod

    from moespec.tokenizer import Tokenizer
    tok = Tokenizer.from_folder(MOE)
    texts = [Path(mod.__file__).read_text(encoding="utf-8"),
             "naïve = 'café – 日本語 🐍'\n\tif x != y:  # ünïcödé, tabs\r\n        return None\n"]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert len(ids) < len(text.encode())          # it compresses (it is a trained BPE, not bytes)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(chat).count(tok.token_to_id("<|im_start|>")) == 2
    assert tok.eos_token == "<|endoftext|>" and tok.bos_token is None
    assert (DRAFT / "tokenizer.json").read_bytes() == (MOE / "tokenizer.json").read_bytes()


def test_inspect_without_model_describes_the_bundled_model():
    env = dict(os.environ)
    env.pop("MOESPEC_MODEL", None)
    if OVERRIDE:
        env["MOESPEC_MODEL"] = str(MOE)   # stands in for "no MODEL" while developing against another export
    r = subprocess.run([sys.executable, "-m", "moespec.cli", "inspect", "--json"], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert Path(info["path"]) == MOE.resolve()
    cfg = json.loads((MOE / "config.json").read_text())
    expect = RECIPE if not OVERRIDE else {"family": "qwen3_moe", "layers": cfg["num_hidden_layers"],
                                         "hidden_size": cfg["hidden_size"], "experts": cfg["num_experts"],
                                         "top_k": cfg["num_experts_per_tok"], "vocab_size": cfg["vocab_size"]}
    assert {k: info[k] for k in expect} == expect
    # --dtype auto: the checkpoint is bf16, so the run is too (2 bytes per parameter)
    assert info["checkpoint_dtype"] == info["dtype"] == cfg["dtype"] == "bfloat16"
    assert info["moe_layers"] == info["layers"] and info["bytes_per_expert"] == 3 * info["hidden_size"] * \
        cfg["moe_intermediate_size"] * 2
    assert info["quantize"] == "none" and info["lossy"] is False
    r = subprocess.run([sys.executable, "-m", "moespec.cli", "inspect"], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0 and "qwen3_moe" in r.stdout and "bytes_per_expert" in r.stdout


def test_sizes_on_disk():
    assert (MOE / "model.safetensors").stat().st_size <= 64 * 2**20
    assert (DRAFT / "model.safetensors").stat().st_size <= 5 * 10**6


def test_card_and_measurements_ship_with_the_model():
    card = (MOE / "README.md").read_text()
    assert "not a useful assistant" in card and "Preview export" not in card
    for f in ("loss_curve.png", "training_log.jsonl", "eval.json", "generation_config.json", "tokenizer_config.json"):
        assert (MOE / f).is_file(), f
    ev = json.loads((MOE / "eval.json").read_text())
    cap = ev["max_tokens_per_set"]        # a capped evaluation must say so in the card
    assert cap is None or f"capped at {cap:,} tokens per set" in card
    assert set(ev["moe"]["heldout"]) >= {"stdlib_val", "chat_val"} and ev["moe"]["routing"]["layers"]
    assert (DRAFT / "README.md").is_file() and (DRAFT / "loss_curve.png").is_file()
