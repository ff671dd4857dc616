"""The public API: `LLM(model).generate(prompts, SamplingParams(...))`, as in vLLM."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from .assets import resolve_model
from .config import OffloadConfig
from .spec_config import SpecConfig
from .errors import MoespecError
from .batch import Batch
from .sequence import Sequence, draft_slack, kv_capacity, new_sequence
from .loading import load_model
from .outputs import Output
from .sampling import SamplingParams
from .quant.scheme import QuantConfig
from .tokenizer import Tokenizer


class LLM:
    """A loaded model with its tokenizer and generation defaults.

    >>> llm = LLM("path/to/hf-folder")            # or LLM() for the bundled reference model
    >>> llm.generate("def add(a, b):", SamplingParams(max_new_tokens=16))[0].text
    """

    def __init__(self, model: str | Path | None = None, dtype: str = "auto", device: str = "cpu",
                 max_model_len: int | None = None, offload: OffloadConfig | None = None,
                 speculative: SpecConfig | dict | None = None, quantize: QuantConfig | str | dict | None = None,
                 show_progress: bool | None = None, memory: str | int | None = None, max_batch: int = 1,
                 expert_parallel: int | None = None):
        """dtype: "auto" (the checkpoint's own; float32 for exactness tests), "float32", "bfloat16", "float16".
        offload: keep a cache of experts in fast memory over a RAM or disk tier (see OffloadConfig).
        speculative: draft and verify several tokens per step, losslessly (SpecConfig or its dict form)
            unless it sets a verify budget (verify_budget / verify_budget_mass), which is LOSSY.
        quantize: "int8" / "int4" weight-only quantization of the experts (QuantConfig or its dict form for
            group_size and dense). LOSSY with respect to the checkpoint; speculation stays lossless with
            respect to the quantized model.
        show_progress: progress bars while loading, quantizing and packing (None: when stderr is a terminal).
        memory: the whole process's resident-memory budget ("2GB", "1.5GiB", bytes): the expert cache, the KV cache
            (max_model_len, chosen when not given) and, with quantize="auto", the precision are sized from it
            (moespec/memory.py); `memory_plan` says what was chosen. max_batch: the sequences decoded at once that
            the plan leaves KV room for (a generate call with more prompts is refused).
        expert_parallel: N processes started by torchrun share each MoE layer's experts (parallel/). On ranks other
            than 0 this call serves experts until rank 0 closes, then exits the process; rank 0 carries on."""
        self.spec = SpecConfig.from_dict(speculative) if isinstance(speculative, dict) else \
            (speculative.validate() if speculative is not None else None)
        self.path = resolve_model(model)
        if self.spec is not None and self.spec.method in ("draft_model", "auto") and not self.spec.model:
            from .assets import REFERENCE_DRAFT, REFERENCE_MODEL
            if self.path.resolve() == REFERENCE_MODEL.resolve():      # the bundled model's draft ships beside it
                self.spec = replace(self.spec, model=str(REFERENCE_DRAFT))
            elif self.spec.method == "draft_model":
                raise MoespecError("speculative method draft_model needs a draft model folder (--draft-model PATH)")
        self.memory_plan = None
        if memory is not None:
            from .memory import plan_for_run
            self.memory_plan, quantize, offload, max_model_len = plan_for_run(
                memory, self.path, dtype, quantize, offload, self.spec, max_model_len, max_batch, device)
        elif quantize == "auto":
            raise MoespecError("--quantize auto picks the precision that fits --memory: give --memory too")
        self.offload = offload = _resolve_prefetch(offload, self.spec)
        self.expert_group = self._join(expert_parallel, memory)
        self.quant = QuantConfig.parse(quantize)
        self.model = load_model(self.path, dtype, device, offload=offload, quant=self.quant,
                                show_progress=show_progress, budgeted=memory is not None,
                                remote_experts=self._remote_experts())
        self.config = self.model.cfg
        self.tokenizer = Tokenizer.from_folder(self.path) if (self.path / "tokenizer.json").is_file() else None
        gc = self.path / "generation_config.json"
        self.generation_config = json.loads(gc.read_text()) if gc.is_file() else {}
        self.max_model_len = min(max_model_len or 10**9, self.config.max_position_embeddings)
        eos = self.generation_config.get("eos_token_id", None)
        eos = eos if isinstance(eos, list) else ([eos] if isinstance(eos, int) else list(self.config.eos_token_id))
        if not eos and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos = [self.tokenizer.eos_token_id]
        self.eos_token_ids = set(eos)
        self.budget = self._budget()            # lossy verification expert budget, or None
        self.drafter = self._drafter(dtype, device)
        self.dtype = str(self.model.dtype).removeprefix("torch.")
        # batch size -> controller (draft length "auto"; with method "auto" the drafter too): batch.py
        self.controllers: dict = {}
        if self.drafter is not None and self.spec.tree is not None:
            self.drafter.tree = list(self.spec.tree)     # static draft trees (spec_decode/tree.py)

    def _drafter(self, dtype: str, device: str):
        if self.spec is None:
            return None
        from .spec_decode.factory import make_drafter
        return make_drafter(self.spec, self.model, self.path, self.offload, self.tokenizer,
                            self.max_model_len + 128, dtype, device)

    def _budget(self):
        """The spec's VerifyBudget, checked against the model (it needs experts, and B >= top_k)."""
        b = self.spec.budget() if self.spec is not None else None
        if b is None:
            return None
        if not self.config.is_moe:
            raise MoespecError("a verify budget (verify_budget / verify_budget_mass) needs an MoE model")
        if b.experts is not None and b.experts < self.config.top_k:
            raise MoespecError(f"verify_budget={b.experts} is below the model's top_k={self.config.top_k} (experts "
                               f"per token): use --verify-budget {self.config.top_k} or more")
        return b

    # -- requests -------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise MoespecError(f"model folder {self.path} has no tokenizer.json; pass token ids instead of text")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise MoespecError(f"prompt token id {bad[0]} is outside the vocabulary (size {self.config.vocab_size})")
        if not ids:
            raise MoespecError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise MoespecError(f"prompt is {len(ids)} tokens long but the model's context is {self.max_model_len} "
                               "tokens (it must leave room for at least one new token)")
        return ids

    def chat_prompt(self, messages: list[dict]) -> str:
        """The conversation rendered by the model's chat template, as text (see chat_ids to generate from)."""
        if self.tokenizer is None:
            raise MoespecError(f"model folder {self.path} has no tokenizer, so it has no chat template")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The prompt token ids of a conversation: generate from these, not from chat_prompt's text, whose
        encoding would add a second BOS where the template writes one."""
        if self.tokenizer is None:
            raise MoespecError(f"model folder {self.path} has no tokenizer, so it has no chat template")
        return self.tokenizer.encode_chat(messages)

    def sequences(self, prompts, params) -> list[Sequence]:
        """Validated sequences to decode (a Batch's input): prompts as text or token ids, one SamplingParams for all
        or one each; generation defaults applied, max_new_tokens cut at the context limit."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise MoespecError("no prompts given")
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise MoespecError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        seqs = []
        for prompt, p in zip(prompts, plist):
            p.validate()
            p = p.with_defaults(self.generation_config)
            p.validate()
            ids = self.encode(prompt)
            # Stop at the context limit like vLLM: generation is cut with finish_reason "length".
            p.max_new_tokens = min(p.max_new_tokens, self.max_model_len - len(ids))
            seqs.append(new_sequence(ids, p, self.eos_token_ids, self.tokenizer))
        return seqs

    def generate(self, prompts: str | list[str] | list[int] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 on_text: Callable[[int, str], None] | None = None,
                 aborted: Callable[[int], bool] | None = None,
                 on_finish: Callable[[int, Output], None] | None = None,
                 release_finished: bool = False) -> list[Output]:
        """Generate for one prompt or a batch (text or token ids); one Output per prompt, in order.

        on_text(i, delta) is called with each piece of new text of prompt i as it decodes; aborted(i),
        asked before each step, ends prompt i early (finish_reason "abort") when it returns True;
        on_finish(i, output) is called as soon as prompt i ends (its stats are per sequence only: the batch
        figures, speculation and expert counters, exist once the whole batch is done). release_finished (with
        on_finish): a finished sequence's tokens are dropped once on_finish has its Output, so the Outputs returned
        at the end carry only its stats. To add sequences while a batch decodes, step a `batch()` yourself.
        """
        seqs = self.sequences(prompts, sampling_params)
        batch = self.batch(len(seqs), on_text, aborted, on_finish, release=release_finished)
        batch.add(seqs)
        while batch.step():
            pass
        return batch.outputs()

    def batch(self, size: int, on_text: Callable[[int, str], None] | None = None,
              aborted: Callable[[int], bool] | None = None, on_finish: Callable[[int, Output], None] | None = None,
              keep: bool = True, release: bool = False) -> Batch:
        """A batch to step yourself (batch.py): add(self.sequences(...)), step() until False, adding sequences between
        steps as they arrive (continuous batching), then outputs(). size: the rows it starts with (draft length
        "auto" keeps one controller per batch size); keep / release: Batch's (a server keeps nothing of a finished
        request beyond on_finish)."""
        if self.memory_plan is not None and size > self.memory_plan.batch:
            raise MoespecError(f"{size} prompts at once, but the --memory plan left KV room for "
                               f"{self.memory_plan.batch} (max_batch / --max-num-seqs / --batch-size)")
        return Batch(self, size, on_text, aborted, on_finish, keep, release)

    def stream(self, prompt: str | list[int], sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas of one prompt as they decode (runs the loop in this thread)."""
        import queue
        import threading
        q: queue.Queue = queue.Queue()
        err: list[BaseException] = []

        def run():
            try:
                self.generate(prompt, sampling_params, on_text=lambda i, d: q.put(d))
            except BaseException as e:  # surfaced to the consumer below
                err.append(e)
            q.put(None)
        threading.Thread(target=run, daemon=True).start()
        while (d := q.get()) is not None:
            yield d
        if err:
            raise err[0]

    def kv_row_tokens(self, prompt_len: int, max_new_tokens: int) -> int:
        """KV slots one sequence takes (generate sizes each row for its prompt, the new tokens within the context
        limit, and a draft)."""
        new = min(max_new_tokens, self.max_model_len - prompt_len)
        return kv_capacity(prompt_len, new, draft_slack(self.drafter, self.spec.k_max if self.spec else 0))

    @property
    def kv_bytes_per_token(self) -> int:
        c = self.model.cfg
        return c.num_layers * c.kv_values_per_token * torch.empty((), dtype=self.model.kv_dtype).element_size()

    def expert_stats(self) -> dict:
        """Expert cache counters since load (hits, misses, bytes_read, evictions, stall_s, prefetch_*,
        capacity, per_layer, ...); with every expert resident just {"capacity": E, "tier": "resident"}."""
        return self.model.experts.stats()

    def close(self) -> None:
        """Stop the expert loader threads and close the offload file (no-op without offloading); with expert
        parallelism, stop the other ranks."""
        self.model.experts.close()

    def _remote_experts(self):
        if self.expert_group is None:
            return None
        from .parallel import rank0_experts
        return lambda ck, cfg, weights, layout: rank0_experts(self.expert_group, ck, cfg, weights, layout, self.offload)

    def _join(self, n: int | None, memory):
        """Rank 0's ExpertGroup for --expert-parallel N (None without it); other ranks serve their experts here and
        exit when rank 0 is done."""
        if not n:
            return None
        if memory is not None:
            raise MoespecError("--expert-parallel does not combine with --memory yet: give each rank --expert-cache")
        offload = self.offload
        if offload is not None and offload.offload != "disk":
            raise MoespecError("--expert-parallel offloads to the disk tier only (--offload disk): a RAM tier would "
                               "hold every expert on every rank")
        if offload is not None:         # (prefetching guesses are not sent between ranks yet)
            self.offload = offload = replace(offload, prefetch="none")
        from .parallel import ExpertGroup, follow
        group = ExpertGroup.join(n)
        if group.rank != 0:
            try:
                follow(group, self.path, offload)
            finally:
                group.close()
            raise SystemExit(0)
        import atexit
        atexit.register(lambda: self.model.experts.close() if hasattr(self, "model") else None)
        return group


def _resolve_prefetch(offload: OffloadConfig | None, spec: SpecConfig | None) -> OffloadConfig | None:
    """prefetch "auto" becomes "draft" when drafting with the target itself or a draft model, else "next-layer";
    "draft" needs one of those (the self draft's router picks, or a draft model's hidden states through a fitted
    projection to the target's routers, are the prediction)."""
    if offload is None:
        return None
    offload.validate()
    guided = spec is not None and spec.method in ("self", "draft_model", "auto")
    if offload.prefetch == "auto":
        offload = replace(offload, prefetch="draft" if guided else "next-layer")
    if offload.prefetch == "draft" and not guided:
        raise MoespecError("prefetch 'draft' needs the self drafter or a draft model (--spec self | draft_model): "
                           "the draft's guesses of the target's experts are what it prefetches")
    return offload
