"""`moespec serve`'s resource bounds: the KV cache a batch may hold, and a shutdown that cannot hang."""
import asyncio
import time

import pytest
from fastapi.testclient import TestClient

from moespec import SamplingParams
from moespec.serve.app import Limits, create_app
from moespec.serve.worker import Job
from servers import free_port, wait_healthy

NAME = "tiny"


@pytest.fixture
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def job(loop, prompt_len: int, max_tokens: int, n: int = 1) -> Job:
    return Job([[5] * prompt_len] * n, [SamplingParams(max_new_tokens=max_tokens)] * n, loop)


def test_a_request_that_can_never_fit_the_kv_budget_is_a_400(llm):
    per_row = llm.kv_row_tokens(8, 64) * llm.kv_bytes_per_token
    with TestClient(create_app(llm, NAME, limits=Limits(kv_bytes=int(1.5 * per_row)))) as c:
        ok = c.post("/v1/completions", json={"prompt": [5] * 8, "max_tokens": 64})
        assert ok.status_code == 200, ok.text
        r = c.post("/v1/completions", json={"prompt": [5] * 8, "max_tokens": 64, "n": 2})
        assert r.status_code == 400 and r.json()["error"]["code"] == "kv_budget_exceeded"
        assert "2 sequence(s) x" in r.json()["error"]["message"] and "--kv-memory" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"prompt": [5] * 8, "max_tokens": 400})
        assert r.status_code == 400 and "KV budget" in r.json()["error"]["message"]


def test_jobs_join_the_batch_only_while_its_kv_fits(llm, loop):
    """Every row is sized like the batch's largest job: a long job waits while short ones decode, short ones join
    a batch of short ones, and the waiting job goes first once there is room."""
    short = llm.kv_row_tokens(8, 16) * llm.kv_bytes_per_token
    app = create_app(llm, NAME, start=False, limits=Limits(kv_bytes=4 * short))
    w = app.state.worker
    a, b, long_, c = job(loop, 8, 16), job(loop, 8, 16), job(loop, 8, 40), job(loop, 8, 16)
    for j in (a, b, long_, c):
        w.submit(j)
    assert w._take(16) == [a, b]                  # the long job would size all three rows past the budget
    assert w._take(14, live=2) == []              # still held: nothing behind it overtakes it
    assert w._take(15, live=1) == [long_]         # with one short row left, it fits (2 rows x its size)
    w._cap = 0
    assert w._take(16) == [c]


def test_the_kv_flag_is_checked(text_model):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "moespec.cli", "serve", str(text_model), "--kv-memory", "lots"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--kv-memory: cannot read 'lots' as a size" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_shutdown_is_bounded_while_a_request_decodes(text_model):
    """SIGTERM while a long stream decodes (each engine step slowed to 50 ms: 2,000 tokens would take 100 s): the
    server exits within --shutdown-timeout and a step or two, without a traceback, and the stream ends without [DONE]."""
    import http.client
    import json
    import signal
    import subprocess
    import sys
    import urllib.request
    port = free_port()
    code = ("import sys, time\n"
            "import moespec.models.decoder as d\n"
            "real = d.DecoderLM.forward\n"
            "def slow(self, *a, **k):\n"
            "    time.sleep(0.05)\n"
            "    return real(self, *a, **k)\n"
            "d.DecoderLM.forward = slow\n"
            "from moespec.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    p = subprocess.Popen([sys.executable, "-c", code, "serve", str(text_model), "--port", str(port),
                          "--shutdown-timeout", "2", "--log-level", "warning"], stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(p, base)
        req = urllib.request.Request(base + "/v1/completions", method="POST", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"prompt": "def", "max_tokens": 2000, "ignore_eos": True,
                                                      "stream": True}).encode())
        stream = urllib.request.urlopen(req, timeout=60)
        assert stream.readline().startswith(b"data: ")                # decoding
        t = time.monotonic()
        p.send_signal(signal.SIGTERM)
        try:
            rest = stream.read()                                        # the server ends the stream
        except http.client.IncompleteRead as e:                         # mid-chunk, as uvicorn cancels it
            rest = e.partial
        assert p.wait(timeout=30) in (0, -signal.SIGTERM)     # uvicorn re-raises the signal once it has shut down
        took = time.monotonic() - t
        assert took < 2 + 5, took
        assert b"[DONE]" not in rest
        assert "Traceback" not in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()


def test_the_heap_is_trimmed_as_requests_finish_at_most_once_a_second(llm, monkeypatch):
    """Freed blocks of ever-changing batch shapes go back to the OS (glibc keeps them in RSS otherwise): once when a
    batch ends, and while one decodes at most once a TRIM_EVERY_S as its requests finish."""
    from moespec.serve import worker as wmod
    trims = []
    monkeypatch.setattr(wmod, "release_free_memory", lambda: trims.append(time.monotonic()))
    with TestClient(create_app(llm, NAME)) as c:
        w = c.app.state.worker
        before = len(trims)
        r = c.post("/v1/completions", json={"prompt": [5] * 8, "max_tokens": 4})
        assert r.status_code == 200 and len(trims) > before
        n = len(trims)
        w.trim_heap()
        w.trim_heap()
        assert len(trims) == n                     # just trimmed: not again within the second
        w.trim_heap(force=True)
        assert len(trims) == n + 1
        w._trimmed -= wmod.TRIM_EVERY_S
        w.trim_heap()
        assert len(trims) == n + 2


def test_a_batch_that_never_drains_keeps_nothing_of_finished_requests(llm, loop):
    """Requests keep joining a batch whose long request decodes on: once a short one has finished, neither its job
    nor its sequence is referenced any more (under steady load the batch never ends)."""
    import gc
    import weakref
    app = create_app(llm, NAME, start=False)
    w = app.state.worker
    made, real, real_batch = [], llm.sequences, llm.batch

    def spy(prompts, params):
        seqs = real(prompts, params)
        made.extend(weakref.ref(s) for s in seqs)
        return seqs

    def slow(size, on_text, aborted, *a, **kw):      # >= 10 ms a step: the long request outlives the short ones
        return real_batch(size, on_text, lambda i: (time.sleep(0.01 if i == 0 else 0), aborted(i))[1], *a, **kw)
    llm.sequences, llm.batch = spy, slow
    long_ = Job([[5] * 8], [SamplingParams(max_new_tokens=10_000, ignore_eos=True)], loop)
    try:
        w.submit(long_)
        w.start()
        while not w._running:
            time.sleep(0.01)
        shorts = []
        for _ in range(6):
            j = job(loop, 8, 3)
            w.submit(j)
            shorts.append(weakref.ref(j))
            del j
            time.sleep(0.05)
        deadline = time.time() + 30
        while (len(w._running) > 1 or not w.queue.empty()) and time.time() < deadline:
            time.sleep(0.01)
        assert list(w._running) == [id(long_)], "the short requests never finished"
        gc.collect()
        assert [r() for r in shorts] == [None] * 6                   # no finished job is held
        assert sum(r() is not None for r in made) == 1               # only the long request's sequence is alive
    finally:
        long_.cancelled = True
        llm.sequences, llm.batch = real, real_batch
        w.stop()
        w.join(30)


def test_web_page_and_engine_view(tmp_path):
    """GET / is the page (open: it holds no data, it asks for the key); /v1/engine needs the key and reports the
    experts each MoE layer holds, which a request with a 2-expert cache over the disk tier fills."""
    from fastapi.testclient import TestClient

    from moespec import LLM
    from moespec.config import OffloadConfig
    from moespec.serve.app import Limits, create_app
    llm = LLM(None, dtype="float32", offload=OffloadConfig(expert_cache=2, offload="disk", offload_dir=str(tmp_path)))
    with TestClient(create_app(llm, "ref", limits=Limits(api_key="k"))) as c:
        page = c.get("/")
        assert page.status_code == 200 and "<canvas id=\"heat\"" in page.text and len(page.content) < 300_000
        assert "http" not in page.text.split("<script>")[1]                    # no request leaves the machine
        assert c.get("/v1/engine").status_code == 401
        auth = {"Authorization": "Bearer k"}
        before = c.get("/v1/engine", headers=auth).json()
        assert before["experts"]["capacity"] == 2 and before["experts"]["tier"] == "disk"
        assert all(v == [] for v in before["experts"]["resident"].values())
        c.post("/v1/completions", json={"prompt": "def f(", "max_tokens": 8, "temperature": 0}, headers=auth)
        after = c.get("/v1/engine", headers=auth).json()
        assert all(len(v) == 2 for v in after["experts"]["resident"].values())
        assert all(after["experts"][k] == {str(i): [] for i in range(6)} for k in ("pinned", "draft"))  # LRU, no drafts
        assert after["generated_tokens"] == 8 and after["experts"]["misses"] > 0
        split = after["memory_split"]
        blob = llm.expert_stats()["expert_bytes"]
        assert split["experts"] == 2 * blob * 6 and split["weights"] > 0 and split["budget"] is None
        assert after["experts"]["bytes_per_token"] == after["experts"]["bytes_read"] / 8
    llm.close()
