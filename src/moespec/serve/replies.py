"""Replies that wait on the engine: a whole job's choices collected (non-streaming), or server-sent events as the
text decodes. Either cancels the job when its client goes away or it runs past the request timeout."""
from __future__ import annotations

import asyncio
import json
import time

from fastapi import Request
from fastapi.responses import StreamingResponse

from . import protocol as P
from .worker import Job


async def collect(job: Job, request: Request | None = None, timeout_s: float | None = None
                   ) -> tuple[list[str], list[str], int]:
    """Wait for every choice of a job: texts, finish reasons, generated tokens. A client that disconnects
    cancels the job (checked twice a second), as does running past `timeout_s` (a 408)."""
    n = len(job.prompts)
    texts, reasons, tokens = [""] * n, [""] * n, 0
    done = 0
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    checked = time.monotonic()
    try:
        while done < n:
            try:
                ev = await asyncio.wait_for(job.events.get(), 0.5)
            except asyncio.TimeoutError:
                ev = None
            now = time.monotonic()
            if now - checked >= 0.5:              # text keeps arriving while decoding: look at the client anyway
                checked = now
                if request is not None and await request.is_disconnected():
                    return texts, reasons, tokens          # nobody to answer; `finally` cancels the decoding
                if deadline is not None and now > deadline:
                    raise P.ApiError(408, f"the request ran longer than --request-timeout {timeout_s:g}s and was "
                                          "cancelled", type="timeout_error", code="request_timeout")
            if ev is None:
                continue
            if ev[0] == "text":
                texts[ev[1]] += ev[2]
            elif ev[0] == "finish":
                reasons[ev[1]], tokens, done = ev[2].finish_reason, tokens + len(ev[2].token_ids), done + 1
            else:
                raise P.ApiError(ev[1], ev[2], type="internal_error" if ev[1] >= 500 else "invalid_request_error")
    finally:
        job.cancelled = done < n      # the client went away (or the engine failed): stop decoding for it
    return texts, reasons, tokens


def sse(job: Job, chunk, usage_chunk, n_prompt: int, include_usage: bool,
         timeout_s: float | None = None) -> StreamingResponse:
    """Server-sent events: one chunk per text delta, a last chunk per choice with its finish_reason, the
    usage chunk when asked, then `data: [DONE]`. A client that disconnects cancels its sequences; a stream
    running past `timeout_s` ends with a request_timeout error event."""
    async def events():
        n, done, tokens = len(job.prompts), 0, 0
        started = [False] * n
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while done < n:
                try:
                    ev = await asyncio.wait_for(job.events.get(), None if deadline is None else
                                                max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    yield data(P.ApiError(408, f"the request ran longer than --request-timeout {timeout_s:g}s and "
                                                "was cancelled", type="timeout_error", code="request_timeout").body())
                    break
                if ev[0] == "text":
                    yield data(chunk(ev[1], ev[2], None, not started[ev[1]]))
                    started[ev[1]] = True
                elif ev[0] == "finish":
                    c, out = ev[1], ev[2]
                    if not started[c]:               # a choice that produced no text still gets its role
                        yield data(chunk(c, "", None, True))
                    yield data(chunk(c, "", out.finish_reason, False))
                    done, tokens = done + 1, tokens + len(out.token_ids)
                else:
                    yield data(P.ApiError(ev[1], ev[2]).body())
                    break
            if include_usage and done == n:
                yield data(usage_chunk(P.usage(n_prompt, tokens)))
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = done < n
    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
