"""Repetition, presence and frequency penalties: the pure function by hand, greedy decoding equal to
transformers' repetition penalty, and speculative decoding (every drafter, chains and trees) still equal
to plain decoding with the same penalties."""
import pytest
import torch

import hf_models
from moespec import LLM, MoespecError, SamplingParams
from moespec.sampling import apply_penalties

PROMPTS = ["def wrap(text, width=70):\n    return wrap(text, width=70)\n\ndef wrap(",
           "import re\nimport os\nimport re\nimport", "class A:\n    pass\nclass A:\n"]


def resolved(**kw):
    return SamplingParams(**kw).with_defaults({})


def test_penalties_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    # repetition: seen tokens (prompt 0, output 1 and 3): positive logits divided, negative multiplied
    out = apply_penalties(logits, [0], [[1, 3]], resolved(repetition_penalty=2.0))
    assert out.tolist() == [[1.0, -2.0, 0.5, 1.5, -2.0]]
    # frequency per occurrence and presence once, output tokens only (the prompt's token 0 is untouched)
    out = apply_penalties(logits, [0], [[3, 3, 1]], resolved(frequency_penalty=0.5, presence_penalty=0.25))
    assert out.tolist() == [[2.0, -1.75, 0.5, 1.75, -2.0]]
    # one row per history (a verification's positions)
    out = apply_penalties(logits.repeat(2, 1), [], [[], [4]], resolved(presence_penalty=1.0))
    assert out[0].tolist() == logits[0].tolist() and out[1, 4] == -3.0
    assert not resolved().has_penalties and resolved(repetition_penalty=1.1).has_penalties


def test_generation_config_repetition_penalty_is_the_default():
    assert SamplingParams().with_defaults({"repetition_penalty": 1.3}).repetition_penalty == 1.3
    assert SamplingParams(repetition_penalty=1.0).with_defaults({"repetition_penalty": 1.3}).repetition_penalty == 1.0


@pytest.mark.parametrize("field, value", [("repetition_penalty", 0.0), ("repetition_penalty", float("nan")),
                                          ("presence_penalty", 3.0), ("frequency_penalty", -2.5)])
def test_bad_penalties_are_named(text_model, field, value):
    with pytest.raises(MoespecError, match=f"invalid sampling value: {field}="):
        LLM(text_model).generate("x", SamplingParams(**{field: value}))


def test_greedy_with_repetition_penalty_equals_transformers(tmp_path):
    hf = hf_models.build("mixtral", tmp_path)
    prompt = [5, 9, 5, 17, 3, 5, 9]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                          repetition_penalty=1.5, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    out = LLM(tmp_path).generate(prompt, SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True,
                                                        repetition_penalty=1.5))[0]
    assert out.token_ids == ref
    plain = LLM(tmp_path).generate(prompt, SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True))[0]
    assert plain.token_ids != ref                       # the penalty changed the output


@pytest.mark.parametrize("spec", [
    {"method": "ngram", "num_speculative_tokens": 4},
    {"method": "ngram", "tree": [2, 2, 1]},
    {"method": "self", "draft_experts": 3, "num_speculative_tokens": 3},
    {"method": "self", "draft_experts": 3, "tree": [2, 1, 1]},
])
def test_speculation_with_penalties_equals_plain_decoding(text_model, spec):
    # mild penalties: outputs change, yet some drafts (repeats, for prompt lookup) are still accepted, so
    # positions past an accepted draft token are checked with that token in their history
    p = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True, repetition_penalty=1.05,
                       presence_penalty=0.05, frequency_penalty=0.05)
    plain = LLM(text_model).generate(PROMPTS, p)
    unpenalised = LLM(text_model).generate(PROMPTS, SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in plain] != [o.token_ids for o in unpenalised]
    out = LLM(text_model, speculative=spec).generate(PROMPTS, p)
    assert [o.token_ids for o in out] == [o.token_ids for o in plain]
    assert out[0].stats["accepted_tokens"] > 0 and max(len(o.token_ids) for o in out) == 30


def test_sampled_speculation_with_penalties_is_reproducible(text_model):
    p = SamplingParams(max_new_tokens=20, temperature=0.8, seed=3, ignore_eos=True, frequency_penalty=0.5)
    llm = LLM(text_model, speculative={"method": "ngram", "num_speculative_tokens": 3})
    a, b = llm.generate(PROMPTS[1], p)[0], llm.generate(PROMPTS[1], p)[0]
    assert a.token_ids == b.token_ids and len(a.token_ids) == 20
