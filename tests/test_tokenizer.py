"""Tokenizer parity with transformers (the oracle) on two small tokenizers trained here:
a byte-level BPE with a ChatML template (Qwen/GPT style) and a Metaspace BPE with byte fallback and a BOS
post-processor (Llama/Mixtral style)."""

import inspect
import json

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from moespec.errors import MoespecError
from moespec.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('only user and assistant roles') }}{% endif %}"
    "{% endfor %}"
)
UNICODE_CODE = 'def area(r):\n    π = 3.14  # 日本語 ✓\n    return π * r ** 2\n\nprint(f"{area(2):.1f} m²")\n'
SAMPLES = [
    UNICODE_CODE,
    "import os\nfor i in range(10):\n\tprint(i)  # tab & spaces   \n",
    "  leading spaces and <|im_start|>user\nhi<|im_end|> and <s> </s> inline",
    "emoji 🤖🚀 and combining é, CJK 中文, RTL עברית",
    "",
]


def stdlib_corpus() -> list[str]:
    import json.encoder
    import string
    import textwrap

    return [inspect.getsource(m)[:4000] for m in (textwrap, json.encoder, string)]


def build_bytelevel(folder):
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stdlib_corpus(), trainer)
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "bos_token": None,
              "chat_template": CHATML, "model_max_length": 4096}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def build_llama(folder):
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(stdlib_corpus(), trainer)
    # SentencePiece layout: <unk> <s> </s>, then the 256 byte-fallback tokens, then the learned pieces.
    spec = json.loads(tok.to_str())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    spec["model"].update(vocab=vocab, byte_fallback=True, fuse_unk=True)
    for added in spec["added_tokens"]:
        added["id"] = vocab[added["content"]]
    tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False, "special": True},
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "tokenizer_class": "LlamaTokenizer",
        "chat_template": [{"name": "default", "template": LLAMA_TEMPLATE}],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {"bytelevel": build_bytelevel(root / "bytelevel"), "llama": build_llama(root / "llama")}


@pytest.fixture(scope="module")
def pair(folders, request):
    """(ours, transformers') for one folder."""
    from transformers import AutoTokenizer

    folder = folders[request.param]
    return Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(str(folder))


both = pytest.mark.parametrize("pair", ["bytelevel", "llama"], indirect=True)


@pytest.fixture(scope="module")
def bl(folders):
    return Tokenizer.from_folder(folders["bytelevel"])


@pytest.fixture(scope="module")
def llama(folders):
    return Tokenizer.from_folder(folders["llama"])


# -- parity with transformers ---------------------------------------------------------------------------------


@both
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(pair, add_special_tokens):
    ours, hf = pair
    for text in SAMPLES:
        assert ours.encode(text, add_special_tokens) == hf(text, add_special_tokens=add_special_tokens)["input_ids"]


@both
@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(pair, skip):
    ours, hf = pair
    for text in SAMPLES:
        ids = hf(text)["input_ids"]
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_llama_style_bos_only_with_special_tokens(llama):
    assert llama.encode("x = 1")[0] == llama.bos_token_id == 1
    assert llama.encode("x = 1", add_special_tokens=False)[0] != 1
    assert llama.eos_token_id == 2


@both
def test_special_token_properties_match_transformers(pair):
    ours, hf = pair
    assert ours.eos_token_id == hf.eos_token_id
    assert ours.bos_token_id == hf.bos_token_id
    assert ours.all_special_ids == hf.all_special_ids
    assert ours.vocab_size == len(hf)
    assert ours.token_to_id(hf.eos_token) == hf.eos_token_id
    assert ours.token_to_id("<not a token>") is None


@pytest.mark.parametrize("pair", ["bytelevel"], indirect=True)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chatml_template_matches_transformers(pair, add_generation_prompt):
    ours, hf = pair
    chats = [
        [{"role": "user", "content": "Write a function that adds two numbers."}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "hi ✓"},
            {"role": "assistant", "content": "hello", "tool_calls": None},
            {"role": "user", "content": "bye"},
        ],
    ]
    for chat in chats:
        expected = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(chat, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize("pair", ["llama"], indirect=True)
def test_template_list_form_and_bos_variable_match_transformers(pair):
    ours, hf = pair
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    expected = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(chat) == expected
    assert expected.startswith("<s>[INST] a [/INST]b</s>")


def test_template_errors_and_extras(llama, bl, folders, tmp_path):
    with pytest.raises(MoespecError, match="only user and assistant"):
        llama.apply_chat_template([{"role": "system", "content": "x"}])
    with pytest.raises(MoespecError, match="messages is empty"):
        bl.apply_chat_template([])
    # chat_template.jinja wins over the config; extra variables reach the template
    folder = tmp_path / "jinja"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((folders["bytelevel"] / name).read_bytes())
    (folder / "chat_template.jinja").write_text(
        "{% generation %}{{ messages[0]['content'] | tojson }}{% endgeneration %}|{{ eos_token }}|{{ flag }}"
    )
    assert Tokenizer.from_folder(folder).apply_chat_template([{"role": "user", "content": "é<"}], flag=1) == (
        '"é<"|<|endoftext|>|1'
    )


def test_missing_files_and_templates(tmp_path, folders):
    with pytest.raises(MoespecError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((folders["bytelevel"] / "tokenizer.json").read_bytes())
    tok = Tokenizer.from_folder(tmp_path)  # no tokenizer_config.json: plain tokenizer, no template
    assert tok.eos_token_id is None
    with pytest.raises(MoespecError, match="model has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_round_trip_unicode_source_exact(bl, llama):
    for tok in (bl, llama):
        for text in SAMPLES[:2] + [SAMPLES[3]]:
            assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


# -- IncrementalDetokenizer ---------------------------------------------------------------------------------------


def stream(tok, ids, **kw):
    detok = IncrementalDetokenizer(tok, **kw)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    return deltas, detok


@pytest.mark.parametrize("name", ["bl", "llama"])
def test_deltas_concatenate_to_full_decode(name, request):
    tok = request.getfixturevalue(name)
    text = UNICODE_CODE * 3 + "<|im_end|>" + SAMPLES[3]
    ids = tok.encode(text, add_special_tokens=False)
    for skip in (True, False):
        deltas, detok = stream(tok, ids, skip_special_tokens=skip)
        assert "".join(deltas) == detok.text == tok.decode(ids, skip_special_tokens=skip)
        assert deltas[-1] == ""  # nothing was left held back
        assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("name", ["bl", "llama"])
def test_multibyte_char_split_across_tokens_is_held_back(name, request):
    tok = request.getfixturevalue(name)
    ids = tok.encode("x日", add_special_tokens=False)
    assert len(ids) >= 3  # '日' is 3 bytes that the tiny vocab cannot merge
    deltas, _ = stream(tok, ids)
    # the last three ids are the bytes of '日': nothing until the third, no U+FFFD ever
    assert "".join(deltas[:-4]) == "x" and deltas[-4:] == ["", "", "日", ""]


def test_broken_utf8_at_the_end_is_released_by_flush(bl):
    ids = bl.encode("ok日", add_special_tokens=False)[:-1]  # cut inside the character
    deltas, detok = stream(bl, ids)
    assert "".join(deltas[:-1]) == "ok" and deltas[-1] == "\ufffd"
    assert detok.text == bl.decode(ids)


def test_prompt_ids_give_context(llama):
    # Alone, a first generated piece like "▁return" decodes without its space (Metaspace strips it);
    # after the prompt it must keep it.
    full = llama.encode("x = 1\nreturn x + 1")
    in_context = [
        i for i in range(2, len(full))
        if llama.decode(full[i:]) != llama.decode(full)[len(llama.decode(full[:i])) :]
    ]
    assert in_context
    prompt, gen = full[: in_context[0]], full[in_context[0] :]
    deltas, _ = stream(llama, gen, prompt_ids=prompt)
    assert "".join(deltas) == llama.decode(full)[len(llama.decode(prompt)) :]


def test_cost_per_token_does_not_grow(bl):
    class Counting:
        def __init__(self, inner):
            self.inner, self.longest = inner, 0

        def decode_raw(self, ids, skip_special_tokens=True):
            self.longest = max(self.longest, len(ids))
            return self.inner.decode_raw(ids, skip_special_tokens)

    counting = Counting(bl)
    ids = bl.encode(UNICODE_CODE * 20, add_special_tokens=False)
    detok = IncrementalDetokenizer(counting)
    out = "".join(detok.push(i) for i in ids) + detok.flush()
    assert out == bl.decode(ids)
    assert len(ids) > 500 and counting.longest <= IncrementalDetokenizer._MAX_WINDOW + IncrementalDetokenizer._MAX_PENDING


# -- StopStringMatcher ---------------------------------------------------------------------------------------------


def run_stops(stops, deltas):
    m = StopStringMatcher(stops)
    out, stopped = [], False
    for d in deltas:
        text, stopped = m.feed(d)
        out.append(text)
        if stopped:
            break
    return out, stopped, m


def test_stop_string_split_across_deltas():
    out, stopped, _ = run_stops(["</answer>"], ["The result is 4", "</ans", "wer> trailing"])
    assert out == ["The result is 4", "", ""] and stopped


def test_stop_text_before_stop_in_same_delta_is_emitted():
    out, stopped, _ = run_stops(["STOP", "\n\n"], ["a\n", "b STOP c\n\n"])
    assert "".join(out) == "a\nb " and stopped


def test_false_partial_match_is_released():
    out, stopped, m = run_stops(["###"], ["x #", "# y", " z#"])
    assert out == ["x ", "## y", " z"] and not stopped
    assert m.flush() == "#"
    assert m.flush() == ""


def test_flush_after_stop_is_empty_and_feed_is_ignored():
    _, stopped, m = run_stops(["END"], ["abcEN", "Dxyz"])
    assert stopped and m.flush() == "" and m.feed("more") == ("", True)


def test_overlapping_prefixes_and_bad_stops():
    out, stopped, _ = run_stops(["aab"], ["a", "a", "a", "b"])
    assert "".join(out) == "a" and stopped
    with pytest.raises(MoespecError, match="stop="):
        StopStringMatcher(["ok", ""])


def test_config_tokens_missing_from_tokenizer_json_are_added_like_transformers(folders, tmp_path):
    from transformers import AutoTokenizer

    config = json.loads((folders["llama"] / "tokenizer_config.json").read_text())
    config.update(eos_token="<|eot|>", tool_token="<|tool|>", clean_up_tokenization_spaces=True)
    config["chat_template"] = "{{ eos_token }}{{ tool_token }}{{ messages[0].content }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer.json").write_bytes((folders["llama"] / "tokenizer.json").read_bytes())
    ours, hf = Tokenizer.from_folder(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    text = "a , b<|eot|> c<|tool|>"
    assert ours.encode(text) == hf(text)["input_ids"]
    assert ours.decode(ours.encode(text)) == hf.decode(hf(text)["input_ids"], skip_special_tokens=True)
    assert (ours.eos_token_id, ours.all_special_ids, ours.vocab_size) == (hf.eos_token_id, hf.all_special_ids, len(hf))
    chat = [{"role": "user", "content": "q"}]
    assert ours.apply_chat_template(chat) == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


@both
def test_chat_ids_match_transformers_and_add_no_second_bos(pair):
    ours, hf = pair
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    expected = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    assert ours.encode_chat(chat) == expected
    if hf.bos_token_id is not None and expected[0] == hf.bos_token_id:   # the llama template writes <s> itself
        assert ours.encode(ours.apply_chat_template(chat))[:2] == [hf.bos_token_id] * 2   # what encode(text) did
