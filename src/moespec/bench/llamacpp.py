"""llama.cpp as a benchmark peer (`moespec bench --peer llama.cpp --peer-model FILE.gguf`).

Runs the same token-id prompts greedily through llama-cpp-python's low-level API (the optional extra
`pip install llama-cpp-python`): one context with a sequence per batch row, each step one `llama_decode`
of a token per live row, the argmax of each row's logits taken here (as moespec's greedy step does). TTFT is
the prefill of the whole batch (every prompt in one decode call, logits at each prompt's last token); TPOT
the mean time per further step. The GGUF of a checkpoint comes from tools/make_gguf.py.
"""
from __future__ import annotations

import ctypes
import functools
import time
from pathlib import Path

import numpy as np

from ..errors import MoespecError


def _import():
    try:
        import llama_cpp
    except ImportError:
        raise MoespecError("--peer llama.cpp needs llama-cpp-python: pip install 'llama-cpp-python==0.3.36' "
                           "(it compiles llama.cpp for this CPU in a few minutes)") from None
    return llama_cpp


class LlamaCppRunner:
    """One GGUF file loaded once; `generate` as the other runners' (same prompts, greedy, EOS ignored)."""
    engine = "llama.cpp"

    def __init__(self, gguf: str | Path, threads: int, max_batch: int, ctx: int):
        lc = self.lc = _import()
        path = Path(gguf)
        if not path.is_file():
            raise MoespecError(f"--peer-model {path} is not a file (make one with tools/make_gguf.py)")
        lc.llama_log_set(_quiet(lc), ctypes.c_void_p())
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise MoespecError(f"llama.cpp could not load {path}")
        cp = lc.llama_context_default_params()
        cp.n_ctx = ctx * max_batch
        cp.n_batch = cp.n_ubatch = max(512, ctx * max_batch)
        cp.n_seq_max = max_batch
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise MoespecError(f"llama.cpp could not create a context for {path} (n_ctx {cp.n_ctx})")
        self.vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(cp.n_batch, 0, max_batch)
        self.path, self.threads = path, threads

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, position, sequence, wants logits)."""
        b = self.batch
        for i, (tok, pos, seq, want) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise MoespecError("llama_decode failed (context too small for this batch?)")

    def _argmax(self, i: int) -> int:
        ptr = self.lc.llama_get_logits_ith(self.ctx, i)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.vocab,))))

    def generate(self, prompts: list[list[int]], new: int) -> tuple[list[list[int]], float, float, dict]:
        """Greedy tokens of each prompt, prefill seconds, decode seconds (steps after the first token), {}."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        entries, last = [], []
        for s, p in enumerate(prompts):
            entries += [(t, j, s, j == len(p) - 1) for j, t in enumerate(p)]
            last.append(len(entries) - 1)
        t0 = time.perf_counter()
        self._decode(entries)
        out = [[self._argmax(i)] for i in last]
        t1 = time.perf_counter()
        for step in range(1, new):
            self._decode([(o[-1], len(p) + step - 1, s, True) for s, (p, o) in enumerate(zip(prompts, out))])
            for s, o in enumerate(out):
                o.append(self._argmax(s))
        return out, t1 - t0, time.perf_counter() - t1, {}

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lc.llama_batch_free(self.batch)
            self.lc.llama_free(self.ctx)
            self.lc.llama_model_free(self.model)
            self.ctx = None


@functools.cache
def _quiet(lc):
    """A log callback that drops llama.cpp's load messages (a report should not drown in them); cached because
    llama.cpp keeps calling it for the life of the process."""
    return lc.llama_log_callback(lambda level, text, user_data: None)
