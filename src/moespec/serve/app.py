"""The OpenAI-compatible HTTP API over one loaded LLM: /v1/models, /v1/completions, /v1/chat/completions
(SSE streaming), /health, /metrics. Every error is an OpenAI error object with its status, never a trace.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import LLM
from ..errors import MoespecError
from . import protocol as P
from .metrics import ServerMetrics
from .guard import Guard
from .worker import EngineWorker, Job, Overloaded, TooLarge

log = logging.getLogger("moespec.serve")
DEGRADED_S = 60.0       # /health says "degraded" (503) this long after the engine last failed a batch


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server (flags of `moespec serve`)."""
    max_body_bytes: int = 8 << 20          # a larger body is refused (413) before it is parsed
    request_timeout_s: float | None = None  # a request still running after this is cancelled (408)
    render_timeout_s: float = 10.0          # tokenizing and chat template rendering, off the event loop
    api_key: str | None = None              # Authorization: Bearer <key> on every path but `open_paths`
    open_paths: tuple[str, ...] = ("/health", "/metrics")
    shutdown_timeout_s: float = 30.0        # on shutdown, requests still decoding after this are cancelled
    kv_bytes: int | None = None             # KV cache the running batch may hold (default: the --memory plan's)


def create_app(llm: LLM, model_name: str, max_num_seqs: int = 16, max_waiting: int = 64,
               start: bool = True, limits: Limits = Limits()) -> FastAPI:
    """start=False leaves the engine thread unstarted (tests start it, or fill its queue first)."""
    metrics = ServerMetrics(model_name, llm.expert_stats)
    kv = limits.kv_bytes if limits.kv_bytes is not None else (llm.memory_plan.kv if llm.memory_plan else None)
    worker = EngineWorker(llm, metrics, max_num_seqs=max_num_seqs, max_waiting=max_waiting, kv_budget=kv)
    if start:
        worker.start()

    @asynccontextmanager
    async def lifespan(_):
        yield
        # uvicorn has waited up to the same bound for open requests (and then cancelled them); the engine thread
        # gets it again to end its batch, then whatever it still decodes is aborted: shutdown never hangs.
        worker.shutdown(limits.shutdown_timeout_s)
    app = FastAPI(title="moespec", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.add_middleware(Guard, limits=limits)
    app.state.worker, app.state.metrics, app.state.llm = worker, metrics, llm
    created = int(time.time())

    @app.exception_handler(P.ApiError)
    async def _api_error(_, e: P.ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        message = "request body is not valid JSON" if err.get("type") == "json_invalid" else \
            f"{where or 'request'}: {err.get('msg')}"
        return JSONResponse(P.ApiError(400, message, param=where or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(P.ApiError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        rid = P.new_id("req")          # the details go to the log, under this id; the client gets the id only
        log.error("internal error %s: %s: %s", rid, type(e).__name__, e, exc_info=e)
        return JSONResponse(P.ApiError(500, f"internal error (request {rid}; details in the server log)",
                                       type="internal_error").body(), status_code=500)

    @app.get("/health")
    async def health():
        if not worker.is_alive():
            raise P.ApiError(503, "the engine thread is not running", type="service_unavailable")
        err = worker.last_error
        if err is not None and time.monotonic() - err[0] < DEGRADED_S:
            return JSONResponse({"status": "degraded", "error": err[1],
                                 "seconds_ago": round(time.monotonic() - err[0], 1)}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "moespec", "root": model_name,
                                            "max_model_len": llm.max_model_len, "dtype": llm.dtype,
                                            "quantization": llm.quant.tag if llm.quant else "none",
                                            "lossy": llm.quant is not None}]}

    def check_model(req) -> None:
        if req.model is not None and req.model != model_name:
            raise P.ApiError(404, f"The model `{req.model}` does not exist (this server serves `{model_name}`)",
                             type="not_found_error", param="model", code="model_not_found")

    async def off_loop(fn, what: str):
        """Tokenizing and template rendering run in a thread, bounded in time: the event loop keeps serving."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn), limits.render_timeout_s)
        except asyncio.TimeoutError:
            raise P.ApiError(400, f"{what} took more than {limits.render_timeout_s:g}s to prepare; shorten it",
                             param="messages" if what == "the conversation" else "prompt") from None
        except MoespecError as e:
            code = "context_length_exceeded" if "context is" in str(e) else None
            raise P.ApiError(400, str(e), code=code, param="messages" if what == "the conversation" else None
                             ) from None

    async def job_for(prompts: list, req, max_tokens) -> tuple[Job, int]:
        """Tokenize and validate everything before queueing: bad input is a 400 now, not a failed batch."""
        rows = len(prompts) * req.n
        if rows > max_num_seqs:
            raise P.ApiError(400, f"{len(prompts)} prompt(s) x n={req.n} is {rows} sequences, more than this server "
                                  f"decodes at once (--max-num-seqs {max_num_seqs}); split the request",
                             param="n" if req.n > 1 else "prompt")
        try:
            params = req.sampling_params(max_tokens)
            for p in params:
                p.validate()
                p.with_defaults(llm.generation_config).validate()
        except MoespecError as e:
            # the API's name for the field (the engine says max_new_tokens)
            raise P.ApiError(400, str(e).replace("max_new_tokens", "max_tokens")) from None
        ids = await off_loop(lambda: [llm.encode(p) for p in prompts], "the prompt")
        job = Job([i for i in ids for _ in params], [p for _ in ids for p in params], asyncio.get_running_loop())
        try:
            worker.submit(job)
        except TooLarge as e:
            raise P.ApiError(400, str(e), param="max_tokens", code="kv_budget_exceeded") from None
        except Overloaded as e:
            raise P.ApiError(503, f"server overloaded: {e}; retry later", type="service_unavailable") from None
        return job, sum(len(i) for i in ids)

    @app.post("/v1/chat/completions")
    async def chat(req: P.ChatRequest, request: Request):
        check_model(req)
        req.check()
        messages = [m.as_dict() for m in req.messages]
        prompt = await off_loop(lambda: llm.chat_ids(messages), "the conversation")
        job, n_prompt = await job_for([prompt], req, req.max_new_tokens)
        rid = P.new_id("chatcmpl")
        if req.stream:
            def chunk(c, text, finish, first):
                delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                return P.chat_chunk(rid, model_name, c, delta, finish, req.include_usage)
            return _sse(job, chunk, lambda use: P.usage_chunk(rid, model_name, "chat.completion.chunk", use),
                        n_prompt, req.include_usage, limits.request_timeout_s)
        texts, reasons, n_gen = await _collect(job, request, limits.request_timeout_s)
        return P.chat_reply(rid, model_name, texts, reasons, P.usage(n_prompt, n_gen))

    @app.post("/v1/completions")
    async def completions(req: P.CompletionRequest, request: Request):
        check_model(req)
        req.check()
        job, n_prompt = await job_for(req.prompts(), req, req.max_tokens)
        rid = P.new_id("cmpl")
        if req.stream:
            def chunk(c, text, finish, first):
                return P.completion_chunk(rid, model_name, c, text, finish, req.include_usage)
            return _sse(job, chunk, lambda use: P.usage_chunk(rid, model_name, "text_completion", use),
                        n_prompt, req.include_usage, limits.request_timeout_s)
        texts, reasons, n_gen = await _collect(job, request, limits.request_timeout_s)
        return P.completion_reply(rid, model_name, texts, reasons, P.usage(n_prompt, n_gen))

    return app


async def _collect(job: Job, request: Request | None = None, timeout_s: float | None = None
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


def _sse(job: Job, chunk, usage_chunk, n_prompt: int, include_usage: bool,
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
                    yield _data(P.ApiError(408, f"the request ran longer than --request-timeout {timeout_s:g}s and "
                                                "was cancelled", type="timeout_error", code="request_timeout").body())
                    break
                if ev[0] == "text":
                    yield _data(chunk(ev[1], ev[2], None, not started[ev[1]]))
                    started[ev[1]] = True
                elif ev[0] == "finish":
                    c, out = ev[1], ev[2]
                    if not started[c]:               # a choice that produced no text still gets its role
                        yield _data(chunk(c, "", None, True))
                    yield _data(chunk(c, "", out.finish_reason, False))
                    done, tokens = done + 1, tokens + len(out.token_ids)
                else:
                    yield _data(P.ApiError(ev[1], ev[2]).body())
                    break
            if include_usage and done == n:
                yield _data(usage_chunk(P.usage(n_prompt, tokens)))
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = done < n
    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
