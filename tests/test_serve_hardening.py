"""`moespec serve` under hostile or careless clients: the probes that hurt, each with the status it must get."""
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from moespec import LLM, SamplingParams
from moespec.serve.app import Limits, create_app

NAME = "tiny"


@pytest.fixture(scope="module")
def client(llm):
    with TestClient(create_app(llm, NAME, max_num_seqs=4, limits=Limits(max_body_bytes=64 << 10))) as c:
        yield c


def complete(client, **body):
    return client.post("/v1/completions", json={"prompt": "def add(a, b):", "max_tokens": 4, **body})


@pytest.mark.parametrize("body, words", [
    ({"prompt": ["a", "b", "c"], "n": 2}, "3 prompt(s) x n=2 is 6 sequences, more than this server decodes at once "
                                          "(--max-num-seqs 4)"),
    ({"prompt": ["x"] * 48}, "48 prompt(s) x n=1 is 48 sequences"),
    ({"stop": ["s"] * 100}, "at most 16 stop strings"),
    ({"stop": "x" * 5000}, "at most 1024 characters"),
])
def test_requests_beyond_the_limits_are_400s(client, body, words):
    r = complete(client, **body)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]


@pytest.mark.parametrize("path, raw", [
    ("/v1/completions", b'{"prompt": "caf\\ud800 bar", "max_tokens": 2}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 2}')])
def test_a_lone_surrogate_is_a_400_and_the_server_goes_on(client, path, raw):
    """JSON may escape a lone surrogate ("\\ud800"); the tokenizer cannot take it."""
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid Unicode" in r.json()["error"]["message"], r.text
    assert client.get("/health").json() == {"status": "ok"}


def test_a_body_over_the_limit_is_a_413_declared_or_not(client):
    big = b'{"prompt": "' + b"x" * (100 << 10) + b'"}'
    r = client.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "--max-body-bytes 65536" in r.json()["error"]["message"]

    def chunks():                                  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'
    r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text


@pytest.mark.parametrize("body", [{"temperature": 1e-40}, {"repetition_penalty": 1e-300, "temperature": 0.8},
                                  {"repetition_penalty": 1e300, "temperature": 0.8}])
def test_extreme_sampling_values_decode_instead_of_failing(client, llm, body):
    """A temperature below 1e-5 decodes greedily (vLLM's rule); penalised logits are clamped, never infinite."""
    r = complete(client, seed=3, ignore_eos=True, **body)
    assert r.status_code == 200, r.text
    if body.get("temperature") == 1e-40:
        ref = llm.generate("def add(a, b):", SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True))[0]
        assert r.json()["choices"][0]["text"] == ref.text


def test_model_ids_carry_no_path_and_internal_errors_carry_no_details(llm, caplog):
    app = create_app(llm, NAME, start=False)
    with TestClient(app, raise_server_exceptions=False) as c:
        (m,) = c.get("/v1/models").json()["data"]
        assert str(llm.path) not in str(m) and m["root"] == NAME

        @app.get("/boom")
        async def boom():
            raise RuntimeError("secret detail /home/user/model")
        r = c.get("/boom")
    assert r.status_code == 500
    msg = r.json()["error"]["message"]
    assert "secret" not in msg and "request req-" in msg
    rid = msg.split("request ")[1].split(";")[0]
    assert any(rid in rec.getMessage() and "secret detail" in rec.getMessage() for rec in caplog.records)


def test_the_api_key_guards_every_endpoint_but_the_open_ones(llm):
    app = create_app(llm, NAME, limits=Limits(api_key="s3cret"))
    with TestClient(app) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert c.post("/v1/completions", json={"prompt": "x"}, headers=headers).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
    with TestClient(create_app(llm, NAME, limits=Limits(api_key="k", open_paths=()))) as c:
        assert c.get("/health").status_code == 401


def test_a_request_past_its_timeout_is_cancelled_with_a_408(llm):
    app = create_app(llm, NAME, limits=Limits(request_timeout_s=0.5))
    with TestClient(app) as c:
        r = complete(c, max_tokens=100000 // 1000, ignore_eos=True)       # fast enough: done in time
        assert r.status_code == 200
        worker = app.state.worker
        slow = worker.llm.batch
        worker.llm.batch = lambda *a, **k: (time.sleep(2.0), slow(*a, **k))[1]     # a stuck engine
        try:
            r = complete(c, max_tokens=4)
        finally:
            worker.llm.batch = slow
        assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"


def test_a_non_streaming_request_whose_client_left_is_cancelled(llm):
    """A real server and a client that sends a long non-streaming request, then closes its socket: the engine
    is told (aborted) and stops decoding for it, as for a stream whose client went away."""
    import socket

    import uvicorn
    app = create_app(llm, NAME)
    seen = []
    real = llm.batch

    def spy(size, on_text, aborted, *a, **kw):
        def slow_aborted(i):          # about 10 ms per token: the tiny model would finish before the client leaves
            time.sleep(0.01)
            seen.append(aborted(i))
            return seen[-1]
        return real(size, on_text, slow_aborted, *a, **kw)
    app.state.worker.llm.batch = spy
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        while not server.started:
            time.sleep(0.05)
        body = b'{"prompt": "x", "max_tokens": 400, "ignore_eos": true}'
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            time.sleep(1.0)                       # decoding has started; the client goes away
        deadline = time.time() + 10
        while time.time() < deadline and not any(seen):
            time.sleep(0.1)
        assert any(seen), "the engine was never told the client left"
    finally:
        app.state.worker.llm.batch = real
        server.should_exit = True
        t.join(10)


@pytest.mark.parametrize("flag, message", [(["--max-body-bytes", "10"], "--max-body-bytes 10 is too small"),
                                           (["--request-timeout", "0"], "--request-timeout 0 must be a positive")])
def test_hardening_flags_are_checked(text_model, flag, message):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "moespec.cli", "serve", str(text_model), *flag], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("field, value, message", [
    ("max_position_embeddings", "4096", "max_position_embeddings='4096' must be a positive integer"),
    ("max_position_embeddings", 10 ** 8, "is implausible"),
    ("rms_norm_eps", -1, "rms_norm_eps=-1 must be a positive number"),
    ("num_key_value_heads", 1.5, "num_key_value_heads=1.5 must be a positive integer"),
])
def test_config_values_are_checked_not_trusted(text_model, tmp_path, field, value, message):
    import json
    import shutil

    from moespec.errors import MoespecError
    d = tmp_path / "m"
    shutil.copytree(text_model, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoespecError, match=message):
        LLM(d)


def test_a_shard_outside_the_model_folder_is_refused(text_model, tmp_path):
    import json
    import shutil

    from moespec.errors import MoespecError
    d = tmp_path / "m"
    shutil.copytree(text_model, d)
    shutil.move(d / "model.safetensors", tmp_path / "elsewhere.safetensors")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "elsewhere.safetensors"), "pt") as f:
        names = list(f.keys())
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "../elsewhere.safetensors" for n in names}}))
    with pytest.raises(MoespecError, match="which is not a file inside the model folder"):
        LLM(d)


def test_rope_tables_grow_with_the_positions_used(text_model, tmp_path):
    """A config's max_position_embeddings is not allocated up front; the grown table is the same table."""
    import json
    import shutil
    d = tmp_path / "m"
    shutil.copytree(text_model, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["max_position_embeddings"] = 200_000
    (d / "config.json").write_text(json.dumps(cfg))
    m = LLM(d).model
    assert m.cos.shape[0] == 4096 + 256
    before = m.cos.clone()
    m._grow_rope(10_000)
    assert m.cos.shape[0] >= 10_000 and torch.equal(m.cos[:before.shape[0]], before)
    kv = m.new_cache(1, 8)
    pos = torch.tensor([[20_000, 20_001]])                 # positions far past the first table
    m.forward(torch.tensor([[3, 4]]), kv, positions=pos)
    assert m.cos.shape[0] > 20_001


def test_a_sequence_that_fails_ends_alone_and_the_batch_decodes_on(llm):
    """One row's text callback (or detokenizer, or stop matcher) raising fails that row only: finish_reason
    "error" with the reason, and every other row equals its own run alone."""
    prompts = ["def add(a, b):", "import os", "class Stack:"]
    greedy_ = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    alone = [llm.generate(p, greedy_)[0].token_ids for p in prompts]

    def on_text(i, delta):
        if i == 1:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a bad byte")
    outs = llm.generate(prompts, greedy_, on_text=on_text)
    assert outs[1].finish_reason == "error" and "a bad byte" in outs[1].stats["error"]
    assert [outs[0].token_ids, outs[2].token_ids] == [alone[0], alone[2]]


def test_non_finite_logits_fail_their_row_only():
    from moespec.sampling import sample
    logits = torch.zeros(3, 10)
    logits[1, 4] = float("nan")
    logits[0, 7] = 5.0
    logits[2, 2] = 5.0
    params = [SamplingParams(temperature=t).with_defaults({}) for t in (0, 0.7, 0)]
    failed = []
    out = sample(logits, params, [None, torch.Generator().manual_seed(0), None], failed=failed)
    assert out.tolist()[0] == 7 and out.tolist()[2] == 2
    assert failed == [(1, "the model produced non-finite logits (NaN or infinity) for this sequence")]


def test_the_server_answers_a_failed_request_500_and_the_others_200(llm):
    """Two requests decode together; one's text handling fails: it gets a 500 naming why, the other its reply."""
    import asyncio
    app = create_app(llm, NAME, start=False)
    worker = app.state.worker
    real = worker.llm.batch

    def faulty(size, on_text, *a, **kw):          # the batch's text callback fails for the first request
        def boom(i, delta):
            if i == 0:
                raise ValueError("stop matcher broke")
            on_text(i, delta)
        return real(size, boom, *a, **kw)
    worker.llm.batch = faulty

    async def run():
        import httpx
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            a = asyncio.create_task(c.post("/v1/completions", json={"prompt": "def add(a, b):", "max_tokens": 6,
                                                                    "temperature": 0, "ignore_eos": True}))
            await asyncio.sleep(0.2)
            b = asyncio.create_task(c.post("/v1/completions", json={"prompt": "import os", "max_tokens": 6,
                                                                    "temperature": 0, "ignore_eos": True}))
            await asyncio.sleep(0.2)
            worker.start()
            return await a, await b
    try:
        ra, rb = asyncio.run(run())
    finally:
        worker.llm.batch = real
        worker.stop()
    assert ra.status_code == 500 and "stop matcher broke" in ra.json()["error"]["message"], ra.text
    ref = llm.generate("import os", SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))[0]
    assert rb.status_code == 200 and rb.json()["choices"][0]["text"] == ref.text


def test_finished_requests_leave_nothing_behind_in_the_running_batch(llm):
    prompts = ["def add(a, b):", "import os"]
    seen = []
    outs = llm.generate(prompts, [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in (3, 9)],
                        on_finish=lambda i, o: seen.append((i, o.token_ids)), release_finished=True)
    assert [len(t) for _, t in sorted(seen)] == [3, 9]                 # on_finish had the whole output
    assert outs[0].token_ids == [] and outs[0].stats["new_tokens"] == 3   # then it was dropped


def test_a_read_error_mid_decode_is_a_5xx_and_health_says_degraded(family_dirs, tmp_path):
    """The disk tier fails while a request decodes: that request gets a 500 naming the read error, no hang; /health
    reports degraded; once reads work again the server answers normally."""
    from moespec.config import OffloadConfig
    llm = LLM(family_dirs["mixtral"][0], offload=OffloadConfig(expert_cache=1, offload="disk",
                                                               offload_dir=str(tmp_path), io_timeout_s=10))
    store = llm.model.experts.store
    real = store.load
    calls = {"n": 0}

    def failing(*a):
        calls["n"] += 1
        if calls["n"] > 20:
            raise OSError(5, "Input/output error")
        return real(*a)
    with TestClient(create_app(llm, NAME)) as c:
        store.load = failing
        t = time.time()
        r = complete(c, max_tokens=60, ignore_eos=True, prompt=[5, 17, 3, 99])
        assert r.status_code == 500 and "Input/output error" in r.json()["error"]["message"], r.text
        assert time.time() - t < 30
        h = c.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "degraded" and "Input/output" in h.json()["error"]
        store.load = real
        assert complete(c, max_tokens=4, prompt=[5, 17, 3]).status_code == 200
    llm.close()



@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": [5, 6, 7], "max_tokens": None}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": None,
                              "max_completion_tokens": None}),
])
def test_a_request_without_max_tokens_takes_the_models_default(llm, path, body):
    """Found by the schema fuzzer: max_tokens null reached the KV sizing unset (a 500)."""
    from moespec.sampling import SamplingParams
    with TestClient(create_app(llm, NAME, limits=Limits(kv_bytes=1 << 30))) as c:
        r = c.post(path, json={**body, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    want = SamplingParams().with_defaults(llm.generation_config).max_new_tokens
    assert r.json()["usage"]["completion_tokens"] == min(want, llm.max_model_len - r.json()["usage"]["prompt_tokens"])
