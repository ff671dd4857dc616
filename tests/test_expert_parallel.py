"""Expert parallelism with two processes on this machine (gloo over loopback, launched by torchrun as users do): output
token-identical to one process, with and without speculation, at batch 1 and 4, and named failures, never a hang."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moespec import LLM, SamplingParams

RUN = str(Path(__file__).with_name("ep_run.py"))
PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:", "x = [1, 2"]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)


def torchrun(*args, env=None, timeout=300, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout)


def ep_tokens(model: str, spec: dict | None, n: int, env: dict | None = None) -> dict:
    r = torchrun(RUN, model, json.dumps(spec), str(n), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("spec, n", [(None, 1), (None, 4), ({"method": "ngram", "num_speculative_tokens": 3}, 4),
                                     ({"method": "self", "draft_experts": 8, "num_speculative_tokens": 3}, 1)])
def test_two_processes_equal_one_on_the_bundled_model(spec, n):
    one = [o.token_ids for o in LLM(None, dtype="float32", speculative=spec).generate(PROMPTS[:n], GREEDY)]
    got = ep_tokens("-", spec, n)
    assert got["tokens"] == one
    assert got["stats"]["tier"] == "expert-parallel" and got["stats"]["ranks"] == 2
    assert got["stats"]["dispatches"] > 0 and got["stats"]["dispatch_bytes"] > 0


def test_each_rank_offloads_its_share_to_disk(tmp_path):
    """Every rank keeps a cache of 2 experts per layer over the disk tier and loads only the experts it holds."""
    one = [o.token_ids for o in LLM(None, dtype="float32").generate(PROMPTS, GREEDY)]
    off = {"expert_cache": 2, "offload": "disk", "offload_dir": str(tmp_path)}
    got = ep_tokens("-", {"method": "ngram", "num_speculative_tokens": 3}, 4, env={"EP_OFFLOAD": json.dumps(off)})
    assert got["tokens"] == one
    assert got["stats"]["local_tier"] == "disk" and got["stats"]["misses"] > 0 and got["stats"]["capacity"] == 2


@pytest.mark.parametrize("family", ["gpt_oss", "llama4_text"])   # expert biases + clamped SwiGLU; input-weighted
def test_two_processes_equal_one_on_other_families(family, family_dirs):
    folder = family_dirs[family][0]
    ids = [[5, 17, 33, 9, 60, 2, 41], [7, 7, 120, 14]]
    one = [o.token_ids for o in LLM(folder).generate(ids, GREEDY)]
    r = torchrun(RUN, str(folder), "null", "2", env={"EP_IDS": json.dumps(ids)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["tokens"] == one


def test_a_rank_that_dies_stops_rank_0_with_a_named_error(tmp_path):
    p = torchrun(RUN, "-", "null", "1", env={"EP_PID_DIR": str(tmp_path), "EP_TOKENS": "100000",
                                              "MOESPEC_EP_TIMEOUT_S": "20"}, wait=False)
    try:
        for _ in range(600):
            if (tmp_path / "rank1").exists() and (tmp_path / "rank0").exists():
                break
            time.sleep(0.1)
        time.sleep(8)                                           # loaded and decoding
        os.kill(int((tmp_path / "rank1").read_text()), signal.SIGKILL)
        t = time.monotonic()
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert time.monotonic() - t < 90
    assert p.returncode != 0
    assert "expert parallelism:" in err and "a rank has stopped" in err


def test_a_rank_with_another_checkpoint_is_refused(family_dirs):
    r = torchrun(RUN, "-", "null", "1", str(family_dirs["mixtral"][0]))
    assert r.returncode != 0
    assert "expert-parallel ranks [1] load a checkpoint other than rank 0's" in r.stderr


def test_without_torchrun_the_error_says_how_to_launch():
    r = subprocess.run([sys.executable, "-m", "moespec.cli", "generate", "--expert-parallel", "2", "--prompt", "x"],
                       capture_output=True, text=True, timeout=120, env={k: v for k, v in os.environ.items()
                                                                         if k not in ("WORLD_SIZE", "RANK")})
    assert r.returncode == 2
    assert "torchrun --nproc-per-node 2 -m moespec.cli" in r.stderr and "Traceback" not in r.stderr
