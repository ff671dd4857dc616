"""gpt-oss's harmony replies: the analysis channel as reasoning_content, the rest as content, split as text arrives
(moespec/harmony.py), through the chat endpoint of a gpt-oss model that writes a fixed harmony reply."""
import json

import pytest
from fastapi.testclient import TestClient

import hf_models
from moespec import LLM
from moespec.serve.app import create_app
from moespec.harmony import HarmonyParser, split_harmony

REPLY = ("<|channel|>analysis<|message|>We think <|x| a <b>.<|end|>"
         "<|start|>assistant<|channel|>final<|message|>Hello!<|return|>")


@pytest.mark.parametrize("step", [1, 2, 3, 5, 7, 1000])
def test_parser_splits_reasoning_from_content_however_the_text_arrives(step):
    p, reasoning, content = HarmonyParser(), "", ""
    for i in range(0, len(REPLY), step):
        r, c = p.feed(REPLY[i:i + step])
        reasoning, content = reasoning + r, content + c
    r, c = p.finish()
    assert (reasoning + r, content + c) == ("We think <|x| a <b>.", "Hello!")


def test_parser_cases():
    assert split_harmony("plain text, no header <|end|>") == ("", "plain text, no header <|end|>")
    assert split_harmony("<|channel|>final<|message|>cut short <|") == ("", "cut short <|")      # no end marker
    assert split_harmony("<|channel|>analysis<|message|>only thinking") == ("only thinking", "")
    assert split_harmony("<|channel|>analysis<|message|>a<|start|>assistant<|channel|>final<|message|>b") == ("a", "b")
    # a tool call's preamble (commentary) is content; a header with a recipient and a constraint is read past
    assert split_harmony("<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}<|call|>") == ("", "{}")
    assert split_harmony("<|channel|>final<|me") == ("", "")                               # an unfinished header


@pytest.fixture(scope="module")
def scripted_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("harmony")
    hf_models.build_scripted_gpt_oss(d, ["<|channel|>", "final", "<|message|>", "Hello", "<|return|>"])
    return d


@pytest.fixture(scope="module")
def scripted(scripted_dir):
    return LLM(scripted_dir)


def test_chat_reply_is_the_final_channel(scripted):
    with TestClient(create_app(scripted, "oss")) as c:
        r = c.post("/v1/chat/completions", json={"model": "oss", "max_tokens": 10,
                                                 "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        msg = r.json()["choices"][0]
        assert msg["message"] == {"role": "assistant", "content": "Hello", "reasoning_content": ""}
        assert msg["finish_reason"] == "stop"
        # the same model through /v1/completions: the text as decoded, special tokens skipped
        r = c.post("/v1/completions", json={"model": "oss", "prompt": "<|start|>assistant", "max_tokens": 10})
        assert r.json()["choices"][0]["text"] == "finalHello"


def test_chat_stream_sends_the_final_channel_as_content(scripted):
    with TestClient(create_app(scripted, "oss")) as c:
        with c.stream("POST", "/v1/chat/completions", json={
                "model": "oss", "max_tokens": 10, "stream": True,
                "messages": [{"role": "user", "content": "hi"}]}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0]["role"] == "assistant"
    assert "".join(d.get("content", "") for d in deltas) == "Hello"
    assert not any("<|" in d.get("content", "") for d in deltas)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_cli_chat_prints_the_answer(scripted_dir):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "moespec.cli", "chat", str(scripted_dir), "--max-new-tokens", "10"],
                       input="hi\n\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "> Hello\n>", r.stdout
