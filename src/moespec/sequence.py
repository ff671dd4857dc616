"""One sequence being generated: its tokens, text, stop rules and finish reason; and the KV room it needs."""
from __future__ import annotations

from dataclasses import dataclass, field

from .sampling import SamplingParams
from .spec_decode.tree import shape_nodes
from .tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    eos_ids: set[int]
    detok: IncrementalDetokenizer | None = None
    stops: StopStringMatcher | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    t_first: float = 0.0
    t_last: float = 0.0
    error: str | None = None            # why the sequence failed (finish_reason "error"); the others decode on
    released: tuple[int, int] | None = None    # (prompt, new) token counts once `release` dropped the tokens

    def fail(self, why: str) -> None:
        self.finish_reason, self.error = "error", why

    def release(self) -> None:
        """Forget what a finished sequence holds (its caller has its output already); keep counts and timings."""
        self.released = (len(self.prompt_ids), len(self.token_ids))
        self.prompt_ids, self.token_ids, self.text, self.detok, self.stops = [], [], "", None, None

    def append(self, tok: int, now: float) -> str:
        """Add one token; return the text it makes visible; set finish_reason when the sequence ends."""
        self.token_ids.append(tok)
        self.t_first = self.t_first or now
        self.t_last = now
        delta = self.detok.push(tok) if self.detok is not None else ""
        stopped = False
        if self.stops is not None:
            delta, stopped = self.stops.feed(delta)
        if stopped or tok in self.eos_ids or tok in self.params.stop_token_ids:
            self.finish_reason = "stop"
        elif len(self.token_ids) >= self.params.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None and not stopped:
            delta += self._flush()          # release text held back for a partial character or stop string
        self.text += delta
        return delta

    def _flush(self) -> str:
        tail = self.detok.flush() if self.detok is not None else ""
        if self.stops is not None:
            tail, _ = self.stops.feed(tail)
            tail += self.stops.flush()
        return tail


def new_sequence(prompt_ids: list[int], params: SamplingParams, eos_ids: set[int], tokenizer: Tokenizer | None
                 ) -> Sequence:
    eos = set() if params.ignore_eos else set(eos_ids)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens) if tokenizer is not None else None
    stops = StopStringMatcher(params.stop) if params.stop and tokenizer is not None else None
    return Sequence(prompt_ids, params, eos, detok, stops)


def room_left(seq: Sequence, slack: int) -> int:
    """KV slots a row may still fill after its committed tokens: its pending token, the tokens it may still make
    and a draft's worth (`slack`)."""
    return seq.params.max_new_tokens - len(seq.token_ids) + slack + 1


def draft_slack(drafter, draft_len: int) -> int:
    """KV slots a verification writes past a row's pending token: the draft (a static tree: all its nodes)."""
    tree = drafter.tree if drafter is not None else None
    return max(draft_len, shape_nodes(tree)) if tree else draft_len


def kv_capacity(prompt_len: int, max_new_tokens: int, slack: int) -> int:
    """The KV slots a sequence needs from its start (`_prefill`; servers budget KV memory with it)."""
    return prompt_len + max_new_tokens + slack + 1
