"""Continuous batching: sequences that join a running batch between steps decode exactly as they would
alone (greedy and seeded sampling, with every drafter and with offloading), and over HTTP a short request
sent while a long one streams is answered before the long one ends."""
import json
import threading
import time
import urllib.request

import pytest

from moespec import LLM, OffloadConfig, SamplingParams

PROMPTS = ["def wrap(text, width=70):\n    return wrap(", "import re\nimport os\nimport re\nimport",
           "class A:\n    pass\nclass A:\n", "x = [1, 2, 3]\ny ="]


def params(n, **kw):
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True, **kw)


def joining(llm, first, schedule):
    """Steps a batch as the server's engine thread does: the (prompt, params) pairs of `first` start it; after step c
    the pairs of schedule[c] join, and those of schedule["empty"] the first time the batch has run dry. Returns the
    Outputs and the live rows seen after each step."""
    batch = llm.batch(len(first))
    batch.add(llm.sequences([p for p, _ in first], [sp for _, sp in first]))
    live, c = [], 0
    while True:
        busy = batch.step()
        c += 1
        live.append(batch.live_rows)
        got = schedule.pop("empty", []) if batch.live_rows == 0 else schedule.pop(c, [])
        if got:
            batch.add(llm.sequences([p for p, _ in got], [sp for _, sp in got]))
        elif not busy:
            return batch.outputs(), live


@pytest.mark.parametrize("spec, offload", [
    (None, False),
    ({"method": "ngram", "num_speculative_tokens": 3}, False),
    ({"method": "ngram", "tree": [2, 1, 1]}, False),
    ({"method": "self", "draft_experts": 3, "num_speculative_tokens": 2}, False),
    ({"method": "ngram", "num_speculative_tokens": 3}, True),
])
def test_joining_sequences_decode_as_they_would_alone(text_model, tmp_path, spec, offload):
    off = OffloadConfig(expert_cache=2, offload="disk", offload_dir=str(tmp_path)) if offload else None
    llm = LLM(text_model, speculative=spec, offload=off)
    want = [llm.generate(p, params(n))[0].token_ids for p, n in zip(PROMPTS, (6, 30, 12, 9))]
    # two start; one joins after the 3rd step; the last joins when the batch has run dry
    outs, live = joining(llm, [(PROMPTS[0], params(6)), (PROMPTS[1], params(30))],
                         {3: [(PROMPTS[2], params(12))], "empty": [(PROMPTS[3], params(9))]})
    assert [o.token_ids for o in outs] == want
    assert live[2] >= 1 and 0 in live[:-1]    # one joined a running batch, one a batch run dry
    llm.close()


def test_joining_seeded_samples_are_their_own(text_model):
    llm = LLM(text_model)
    p = [SamplingParams(max_new_tokens=15, temperature=0.9, seed=s, ignore_eos=True, frequency_penalty=0.3)
         for s in (1, 2)]
    alone = [llm.generate(PROMPTS[i], p[i])[0].token_ids for i in range(2)]
    outs, _ = joining(llm, [(PROMPTS[0], p[0])], {2: [(PROMPTS[1], p[1])]})
    assert [o.token_ids for o in outs] == alone


def test_a_short_request_is_answered_while_a_long_one_streams(text_model):
    from servers import free_port, running_server
    port = free_port()
    with running_server([str(text_model), "--port", str(port)], port) as base:
        def post(body):
            return urllib.request.urlopen(urllib.request.Request(
                base + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                headers={"Content-Type": "application/json"}), timeout=120)
        events, started = [], threading.Event()

        def long_stream():
            with post({"prompt": PROMPTS[0], "max_tokens": 480, "temperature": 0, "ignore_eos": True,
                       "stream": True}) as r:
                for line in r:
                    if line.startswith(b"data: {"):
                        events.append((time.perf_counter(), json.loads(line[6:])["choices"][0]["finish_reason"]))
                        started.set()
        t = threading.Thread(target=long_stream)
        t.start()
        assert started.wait(60)
        short = json.load(post({"prompt": PROMPTS[1], "max_tokens": 3, "temperature": 0, "ignore_eos": True}))
        answered = time.perf_counter()
        t.join(120)
        assert short["usage"]["completion_tokens"] == 3
        finished = [ts for ts, reason in events if reason is not None]
        assert finished and answered < finished[0]            # answered while the long request still decoded
        assert sum(1 for ts, _ in events if ts > answered) > 10


def test_the_step_engine_takes_sequences_between_steps(text_model):
    """StepEngine as a server drives it: add, step, add more while it runs, step until nothing is unfinished.
    Each sequence decodes exactly what it decodes alone, and a sequence added to an engine that ran dry starts
    the batch over."""
    from moespec.step_engine import StepEngine
    llm = LLM(text_model)
    alone = [llm.generate(p, params(n))[0].token_ids for p, n in zip(PROMPTS[:3], (12, 6, 5))]
    finished = []
    eng = StepEngine(llm.model, on_finish=lambda i, s: finished.append(i))
    assert not eng.has_unfinished() and not eng.step()
    seqs = llm.sequences([PROMPTS[0]], params(12))
    eng.add(seqs)
    steps = 0
    while eng.step():
        steps += 1
        if steps == 3:
            seqs += llm.sequences([PROMPTS[1]], params(6))
            eng.add(seqs[1:])
    assert not eng.has_unfinished() and steps == 11     # the 12-token row set the pace (its prefill made one)
    assert finished == [1, 0] and eng.seqs == {}        # finished sequences leave the engine
    seqs += llm.sequences([PROMPTS[2]], params(5))
    eng.add(seqs[2:])                                   # the batch ran dry: it starts over from this one
    while eng.step():
        pass
    assert [s.token_ids for s in seqs] == alone and finished == [1, 0, 2]
    assert [s.finish_reason for s in seqs] == ["length"] * 3
