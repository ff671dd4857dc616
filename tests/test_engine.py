"""The public API end to end: batching, sampling, stopping, errors."""
import json

import pytest
import torch

import hf_models
from moespec import LLM, MoespecError, SamplingParams


PROMPTS = ["def wrap(text, width=70):", "import re", "class TextWrapper:\n    def __init__(self):"]


def test_batched_output_equals_single_prompt_output(llm):
    p = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    batched = llm.generate(PROMPTS, p)
    for prompt, out in zip(PROMPTS, batched):
        alone = llm.generate(prompt, p)[0]
        assert out.token_ids == alone.token_ids
        assert out.text == alone.text == llm.tokenizer.decode(alone.token_ids)


def test_sequences_of_different_lengths_finish_independently(llm):
    ps = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in (3, 17, 9)]
    outs = llm.generate(PROMPTS, ps)
    assert [len(o.token_ids) for o in outs] == [3, 17, 9]
    for prompt, p, out in zip(PROMPTS, ps, outs):
        assert llm.generate(prompt, p)[0].token_ids == out.token_ids


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    p = SamplingParams(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.9, seed=7, ignore_eos=True)
    a = llm.generate(PROMPTS[0], p)[0].token_ids
    assert a == llm.generate(PROMPTS[0], p)[0].token_ids
    batched = llm.generate([PROMPTS[0], PROMPTS[1]], [p, SamplingParams(max_new_tokens=5, seed=1, temperature=1.0)])
    assert batched[0].token_ids == a
    other = llm.generate(PROMPTS[0], SamplingParams(max_new_tokens=20, temperature=1.0, seed=8, ignore_eos=True))
    assert other[0].token_ids != a


def test_eos_list_and_stop_strings(llm):
    greedy = llm.generate(PROMPTS[2], SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True))[0]
    # Any generated token can serve as EOS: generation stops right at its first occurrence.
    tok = greedy.token_ids[5]
    first = greedy.token_ids.index(tok)
    out = llm.generate(PROMPTS[2], SamplingParams(max_new_tokens=30, temperature=0, stop_token_ids=[tok]))[0]
    assert out.token_ids == greedy.token_ids[:first + 1] and out.finish_reason == "stop"
    # A stop string taken from the greedy text cuts the text right before it.
    text = greedy.text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    out = llm.generate(PROMPTS[2], SamplingParams(max_new_tokens=30, temperature=0, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == text[:text.index(stop)]
    assert stop not in out.text


def test_generation_config_eos_list_is_used(text_model):
    llm = LLM(text_model)
    assert llm.eos_token_ids == {0, 2}


def test_streaming_deltas_concatenate_to_the_text(llm):
    p = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    assert "".join(llm.stream(PROMPTS[0], p)) == llm.generate(PROMPTS[0], p)[0].text


def test_chat_template(llm):
    prompt = llm.chat_prompt([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("kwargs, field", [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                                           ({"top_k": -5}, "top_k"), ({"max_new_tokens": 0}, "max_new_tokens")])
def test_invalid_sampling_values_are_named(llm, kwargs, field):
    with pytest.raises(MoespecError, match=field):
        llm.generate("x", SamplingParams(**kwargs))


def test_prompt_longer_than_context(llm):
    with pytest.raises(MoespecError, match="prompt is 600 tokens long but the model's context is 512"):
        llm.generate([1] * 600)


def test_generation_stops_at_the_context_limit(llm):
    out = llm.generate([1] * 500, SamplingParams(max_new_tokens=100, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 12 and out.finish_reason == "length"


def test_bad_model_folders(tmp_path):
    with pytest.raises(MoespecError, match="does not exist"):
        LLM(tmp_path / "nope")
    with pytest.raises(MoespecError, match="no config.json"):
        LLM(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(MoespecError, match="unsupported model_type 'gpt2'; supported: .*mixtral.*qwen3_moe"):
        LLM(tmp_path)


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file
    hf_models.build("mixtral", tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    save_file({k: v for k, v in sd.items() if k != name}, tmp_path / "model.safetensors")
    with pytest.raises(MoespecError, match=f"missing tensor '{name}'"):
        LLM(tmp_path)
    sd[name] = torch.zeros(3, 3)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(MoespecError, match=rf"tensor '{name}' has shape \(3, 3\), expected \(64, 48\)"):
        LLM(tmp_path)


def test_bad_config_field_is_named(tmp_path):
    hf_models.build("olmoe", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_experts_per_tok"] = 99
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoespecError, match="num_experts_per_tok=99"):
        LLM(tmp_path)
