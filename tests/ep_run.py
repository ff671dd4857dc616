"""Run under torchrun by test_expert_parallel.py: generate with --expert-parallel from every rank's process.

    torchrun --standalone --nproc-per-node 2 tests/ep_run.py MODEL SPEC_JSON N_PROMPTS [OTHER_MODEL_FOR_RANK_1]

Rank 0 prints the token ids as JSON; each rank writes its pid to $EP_PID_DIR/rank<r> when that is set. $EP_IDS: the
prompts as token-id lists (JSON) instead of the text prompts; $EP_TOKENS: new tokens per prompt (24); $EP_OFFLOAD: an
OffloadConfig (JSON) every rank offloads its experts with.
"""
import json
import os
import sys

from moespec import LLM, SamplingParams
from moespec.config import OffloadConfig

PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:", "x = [1, 2"]

rank = int(os.environ["RANK"])
if os.environ.get("EP_PID_DIR"):
    with open(os.path.join(os.environ["EP_PID_DIR"], f"rank{rank}"), "w") as f:
        f.write(str(os.getpid()))
model = sys.argv[4] if len(sys.argv) > 4 and rank == 1 else sys.argv[1]
spec = json.loads(sys.argv[2]) or None
off = json.loads(os.environ["EP_OFFLOAD"]) if os.environ.get("EP_OFFLOAD") else None   # each rank's own cache
llm = LLM(None if model == "-" else model, dtype="float32", speculative=spec, expert_parallel=2,
          offload=OffloadConfig(**off) if off else None)
prompts = json.loads(os.environ["EP_IDS"]) if os.environ.get("EP_IDS") else PROMPTS     # token ids: tiny test models
outs = llm.generate(prompts[:int(sys.argv[3])], SamplingParams(max_new_tokens=int(os.environ.get("EP_TOKENS", "24")),
                                                                temperature=0, ignore_eos=True))
print(json.dumps({"tokens": [o.token_ids for o in outs], "stats": llm.model.experts.stats()}))
llm.close()
