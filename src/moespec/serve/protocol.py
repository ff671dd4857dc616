"""The OpenAI request and response shapes `moespec serve` speaks, as pydantic models and pure builders.

Requests accept the fields OpenAI clients send (unknown ones are ignored, as OpenAI does); fields whose
meaning moespec cannot honour (logprobs, penalties, tools, ...) are refused with a 400 naming them rather
than silently ignored. Streamed chunks are `chat.completion.chunk` / `text_completion`, non-streamed
replies `chat.completion` / `text_completion` (clients break when these are mixed up).
"""
from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..sampling import SamplingParams

MAX_N = 16          # choices per request: each is a sequence of the batch


class ApiError(Exception):
    """An OpenAI error object with its HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code if self.code is not None else self.status}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None               # vLLM's extension, as is everything below `n`
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    def _refuse_unsupported(self, extra: dict) -> None:
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported by moespec", param="logit_bias")
        for name, value in extra.items():
            if value not in (None, False, 0, [], {}):
                raise ApiError(400, f"{name} is not supported by moespec", param=name)
        if not 1 <= self.n <= MAX_N:
            raise ApiError(400, f"n must be between 1 and {MAX_N}, got {self.n}", param="n")

    def sampling_params(self, max_tokens: int | None) -> list[SamplingParams]:
        """One SamplingParams per choice; choice j of a seeded request uses seed + j (distinct samples,
        reproducible as a whole)."""
        return [SamplingParams(max_new_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                               top_k=self.top_k, seed=None if self.seed is None else self.seed + j,
                               stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
                               repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                               frequency_penalty=self.frequency_penalty)
                for j in range(self.n)]

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def check(self) -> None:
        self._refuse_unsupported({"echo": self.echo, "logprobs": self.logprobs, "suffix": self.suffix,
                                  "best_of": None if self.best_of in (None, 1) else self.best_of})

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise ApiError(400, "prompt is empty", param="prompt")
        return list(p)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def as_dict(self) -> dict:
        """The message as a chat template reads it: text parts joined, other parts refused."""
        content = self.content
        if isinstance(content, list):
            bad = [p.type for p in content if p.type != "text"]
            if bad:
                raise ApiError(400, f"message content of type {bad[0]!r} is not supported (text only)",
                               param="messages")
            content = "".join(p.text or "" for p in content)
        return {**(self.model_extra or {}), "role": self.role, "content": content or ""}


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list | None = None
    response_format: dict | None = None

    def check(self) -> None:
        fmt = None if self.response_format in (None, {"type": "text"}) else self.response_format
        self._refuse_unsupported({"logprobs": self.logprobs, "top_logprobs": self.top_logprobs,
                                  "tools": self.tools, "response_format": fmt})

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# -- responses ------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_reply(rid: str, model: str, texts: list[str], reasons: list[str], use: dict,
               reasoning: list[str] | None = None) -> dict:
    """reasoning: each choice's reasoning (gpt-oss's analysis channel), sent as `reasoning_content` beside the content."""
    def message(i, t):
        m = {"role": "assistant", "content": t}
        return m if reasoning is None else {**m, "reasoning_content": reasoning[i]}
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": message(i, t), "logprobs": None,
                         "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))],
            "usage": use}


def completion_reply(rid: str, model: str, texts: list[str], reasons: list[str], use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                        for i, (t, r) in enumerate(zip(texts, reasons))],
            "usage": use}


def chat_chunk(rid: str, model: str, index: int, delta: dict, finish: str | None, with_usage: bool) -> dict:
    c = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
         "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return {**c, "usage": None} if with_usage else c


def completion_chunk(rid: str, model: str, index: int, text: str, finish: str | None, with_usage: bool) -> dict:
    c = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
         "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}
    return {**c, "usage": None} if with_usage else c


def usage_chunk(rid: str, model: str, obj: str, use: dict) -> dict:
    """The last chunk of a stream with stream_options.include_usage: no choices, the request's usage."""
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": use}
