"""The online controller in the generation loop: the loop obeys each step's draft length (0 = plain),
reports every step's costs, stays lossless, and `--draft-len auto` is wired end to end."""
import json
import subprocess
import sys

import pytest

from moespec import LLM, MoespecError, SamplingParams
from moespec.spec_config import SpecConfig
from moespec.generate import generate

PROMPTS = ["def wrap(text, width=70):\n    return wrap(text, width=70)\n\ndef wrap(", "import re\nimport os\nimport"]


class Scripted:
    """A controller replaying a fixed list of draft lengths and recording what it is told."""

    def __init__(self, ks):
        self.ks, self.i, self.told = ks, 0, []

    def next_step(self):
        k = self.ks[self.i % len(self.ks)]
        self.i += 1
        return None, k

    def record_spec(self, k, draft_s, verify_s, accepted, rows=1, lens=(), width=None):
        self.told.append(("spec", k, accepted, rows, draft_s >= 0 and verify_s > 0, tuple(lens), width))

    def record_plain(self, step_s, rows=1):
        self.told.append(("plain", 0, 0, rows, step_s > 0))


@pytest.mark.parametrize("method", ["ngram", "self"])
def test_the_loop_follows_the_controller_and_stays_lossless(text_model, method):
    p = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    llm = LLM(text_model)
    plain = [o.token_ids for o in llm.generate(PROMPTS, p)]
    spec = LLM(text_model, speculative={"method": method, "num_speculative_tokens": 5})
    script = Scripted([0, 0, 3, 1, 0, 5, 2])
    seqs = spec.sequences(PROMPTS, p)
    timing = generate(spec.model, seqs, None, spec.drafter, 5, controller=script)
    assert [s.token_ids for s in seqs] == plain
    kinds = [t[0] for t in script.told]
    assert kinds[:7] == ["plain", "plain", "spec", "spec", "plain", "spec", "spec"]
    assert [t[1] for t in script.told[:7]] == [0, 0, 3, 1, 0, 5, 2]
    assert all(t[3] == 2 and t[4] for t in script.told)            # both rows live, real timings
    assert timing["spec"].plain_steps == kinds.count("plain")
    assert sum(t[2] for t in script.told) == timing["spec"].accepted
    for t in script.told:                  # each row's accepted drafts, within k; the forward's width, within k + 1
        assert t[0] == "plain" or (len(t[5]) == 2 and sum(t[5]) == t[2] and max(t[5]) <= t[1] and 1 <= t[6] <= t[1] + 1)


def test_auto_draft_length_is_lossless_and_reports_the_controller(text_model):
    p = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    plain = LLM(text_model).generate(PROMPTS, p)
    llm = LLM(text_model, speculative={"method": "ngram", "num_speculative_tokens": "auto",
                                       "max_speculative_tokens": 6})
    out = llm.generate(PROMPTS, p)
    assert [o.token_ids for o in out] == [o.token_ids for o in plain]
    s = out[0].stats
    assert s["draft_len"] == "auto" and len(s["accepted_per_position"]) == 6
    # the first two steps are plain (the controller measures T(1) first), then it speculates
    assert s["plain_steps"] >= 2 and s["draft_steps"] > 0
    assert set(s["controller"]) >= {"enabled", "acceptance", "best_k", "predicted_speedup", "switches"}


def test_draft_length_settings_are_checked(text_model):
    with pytest.raises(MoespecError, match="or 'auto'"):
        SpecConfig(num_speculative_tokens="long").validate()
    with pytest.raises(MoespecError, match="max_speculative_tokens"):
        SpecConfig(num_speculative_tokens="auto", max_speculative_tokens=0).validate()
    assert SpecConfig(num_speculative_tokens="3").validate().num_speculative_tokens == 3

    def run(*args):
        return subprocess.run([sys.executable, "-m", "moespec.cli", "generate", str(text_model), "--prompt",
                               PROMPTS[0], "--max-new-tokens", "10", "--temperature", "0", "--ignore-eos", "--json",
                               *args], capture_output=True, text=True, timeout=120)
    r = run("--spec", "ngram", "--draft-len", "auto")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stats"]["draft_len"] == "auto"
    r = run("--spec", "ngram", "--draft-len", "lots")
    assert r.returncode == 2 and "--draft-len must be a positive integer or auto, got 'lots'" in r.stderr
