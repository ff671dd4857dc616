"""`moespec serve`: the OpenAI API as clients use it. Replies equal the Python API's output token for token,
streams concatenate to the non-streamed text, errors are OpenAI error objects with the right status."""
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from fastapi.testclient import TestClient

from moespec import LLM, SamplingParams
from moespec.serve.app import create_app
from servers import free_port, running_server

NAME = "tiny"


@pytest.fixture(scope="module")
def client(llm):
    with TestClient(create_app(llm, NAME)) as c:
        yield c


def greedy(llm, prompt, n, **kw):
    return llm.generate(prompt, SamplingParams(max_new_tokens=n, temperature=0, **kw))[0]


def sse(response) -> list:
    """The data payloads of an event stream, [DONE] last."""
    out = [line[len("data: "):] for line in response.text.split("\n") if line.startswith("data: ")]
    assert out[-1] == "[DONE]"
    return [json.loads(x) for x in out[:-1]]


def test_models_and_health(client, llm):
    r = client.get("/v1/models")
    assert r.status_code == 200
    (m,) = r.json()["data"]
    assert m["id"] == NAME and m["object"] == "model" and m["max_model_len"] == llm.max_model_len
    assert client.get("/health").json() == {"status": "ok"}


def test_completion_equals_the_python_api(client, llm):
    r = client.post("/v1/completions", json={"model": NAME, "prompt": "def add(a, b):", "max_tokens": 12,
                                             "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = greedy(llm, "def add(a, b):", 12, ignore_eos=True)
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == ref.text and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(ref.prompt_token_ids), "completion_tokens": 12,
                             "total_tokens": len(ref.prompt_token_ids) + 12}


def test_chat_completion_and_its_stream_agree(client, llm):
    req = {"model": NAME, "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
           "max_completion_tokens": 10, "temperature": 0, "ignore_eos": True}
    r = client.post("/v1/chat/completions", json=req)
    assert r.status_code == 200, r.text
    body = r.json()
    ref = greedy(llm, llm.chat_ids([{"role": "user", "content": "hello"}]), 10, ignore_eos=True)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ref.text}
    assert body["usage"]["completion_tokens"] == 10
    s = client.post("/v1/chat/completions", json={**req, "stream": True, "stream_options": {"include_usage": True}})
    assert s.headers["content-type"].startswith("text/event-stream")
    chunks = sse(s)
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == ref.text
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == body["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])


def test_completion_stream_batch_of_prompts_and_n(client, llm):
    r = client.post("/v1/completions", json={"prompt": ["import os", "class A:"], "n": 2, "max_tokens": 6,
                                             "temperature": 0.9, "seed": 7, "ignore_eos": True, "stream": True})
    chunks = sse(r)
    texts = {}
    for c in chunks:
        (ch,) = c["choices"]
        texts[ch["index"]] = texts.get(ch["index"], "") + ch["text"]
    assert sorted(texts) == [0, 1, 2, 3]
    for i, prompt in enumerate(["import os", "class A:"]):     # choice j of prompt i: seed + j
        for j in range(2):
            ref = llm.generate(prompt, SamplingParams(max_new_tokens=6, temperature=0.9, seed=7 + j,
                                                      ignore_eos=True))[0]
            assert texts[2 * i + j] == ref.text


@pytest.mark.parametrize("path, body, status, words", [
    ("/v1/completions", {"model": "other", "prompt": "x"}, 404, "`other` does not exist"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 3}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt is empty"),
    ("/v1/completions", {"prompt": "x " * 600}, 400, "context"),
    ("/v1/completions", {"prompt": "x", "logprobs": 2}, 400, "logprobs is not supported"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty=2.5"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty=0"),
    ("/v1/completions", {"prompt": "x", "n": 99}, 400, "n must be between 1 and 16"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "'image_url' is not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     400, "tools is not supported"),
    ("/v1/nothing", {}, 404, "Not Found"),
])
def test_errors_are_openai_error_objects(client, path, body, status, words):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and set(err) == {"message", "type", "param", "code"}


def test_invalid_json_is_a_400(client):
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_waiting_requests_decode_as_one_batch_and_overload_is_503(llm):
    app = create_app(llm, NAME, max_waiting=2, start=False)      # engine not started: requests wait
    worker, calls = app.state.worker, []
    real = llm.batch
    llm.batch = lambda size, *a, **k: (calls.append(size), real(size, *a, **k))[1]
    try:
        import threading
        with TestClient(app) as c:
            replies = {}

            def post(p):
                replies[p] = c.post("/v1/completions", json={"prompt": p, "max_tokens": 5, "temperature": 0,
                                                            "ignore_eos": True})
            threads = [threading.Thread(target=post, args=(p,)) for p in ("def f():", "import sys")]
            for t in threads:
                t.start()
            while worker.queue.qsize() < 2:
                time.sleep(0.01)
            third = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert third.status_code == 503 and "overloaded" in third.json()["error"]["message"]
            worker.start()
            for t in threads:
                t.join()
    finally:
        llm.batch = real
    assert calls == [2]                                   # both waiting requests in one batch
    for p, r in replies.items():
        assert r.json()["choices"][0]["text"] == greedy(llm, p, 5, ignore_eos=True).text


def test_metrics_count_requests_tokens_and_speculation(text_model):
    spec = LLM(text_model, speculative={"method": "ngram", "num_speculative_tokens": 3},
               offload=__import__("moespec").OffloadConfig(expert_cache=2, offload="ram"))
    with TestClient(create_app(spec, NAME)) as c:
        r = c.post("/v1/completions", json={"prompt": "a = 1\nb = 2\na = 1\nb =", "max_tokens": 9,
                                            "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200
        text = c.get("/metrics").text
    spec.close()

    def value(line_start):
        (line,) = [x for x in text.splitlines() if x.startswith(line_start)]
        return float(line.rsplit(" ", 1)[1])
    assert value('moespec:generation_tokens_total{model_name="tiny"}') == 9
    assert value('moespec:request_success_total{finished_reason="length",model_name="tiny"}') == 1
    drafted = value('moespec:spec_decode_num_draft_tokens_total{model_name="tiny"}')
    accepted = value('moespec:spec_decode_num_accepted_tokens_total{model_name="tiny"}')
    assert drafted > 0 and 0 <= accepted <= drafted
    assert sum(value(f'moespec:spec_decode_num_accepted_tokens_per_pos_total{{model_name="tiny",position="{p}"}}')
               for p in range(3)) == accepted
    assert value('moespec:expert_cache_misses_total{model_name="tiny"}') > 0
    assert value('moespec:expert_bytes_loaded_total{model_name="tiny",tier="ram"}') > 0
    assert value('moespec:time_to_first_token_seconds_count{model_name="tiny"}') == 1


def test_an_aborted_row_stops_and_the_others_are_unchanged(llm):
    asked, finished = [0], {}

    def aborted(i):                     # asked once per step after the step's tokens: row 0 ends at 4 tokens
        asked[0] += i == 0
        return i == 0 and asked[0] > 3
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    outs = llm.generate(["def f():", "import sys"], params, aborted=aborted,
                        on_finish=lambda i, o: finished.setdefault(i, o.finish_reason))
    assert outs[0].finish_reason == "abort" and finished == {0: "abort", 1: "length"}
    assert outs[0].token_ids == greedy(llm, "def f():", 12, ignore_eos=True).token_ids[:4]
    assert outs[1].token_ids == greedy(llm, "import sys", 12, ignore_eos=True).token_ids


def test_moespec_serve_from_the_command_line(text_model):
    """As a user runs it: start the server, wait for /health, ask a chat completion, stop it."""
    port = free_port()
    with running_server([str(text_model), "--served-model-name", "m"], port, {"MOESPEC_PORT": str(port)}) as base:
        req = urllib.request.Request(base + "/v1/chat/completions", method="POST",
                                     headers={"Content-Type": "application/json"},
                                     data=json.dumps({"model": "m", "max_tokens": 4, "temperature": 0, "ignore_eos": True,
                                                      "messages": [{"role": "user", "content": "hi"}]}).encode())
        body = json.load(urllib.request.urlopen(req, timeout=60))
        assert body["model"] == "m" and body["usage"]["completion_tokens"] == 4
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "/v1/models/x", timeout=5)
        assert e.value.code == 404 and "error" in json.load(e.value)


@pytest.mark.parametrize("flag, message", [(["--threads", "0"], "error: --threads 0 is out of range"),
                                           (["--port", "70000"], "error: --port 70000 is out of range"),
                                           (["--max-num-seqs", "0"], "error: --max-num-seqs 0 is out of range")])
def test_serve_flags_are_checked(text_model, flag, message):
    r = subprocess.run([sys.executable, "-m", "moespec.cli", "serve", str(text_model), *flag], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
