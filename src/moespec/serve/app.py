"""The OpenAI-compatible HTTP API over one loaded LLM: /v1/models, /v1/completions, /v1/chat/completions
(SSE streaming), /health, /metrics. Every error is an OpenAI error object with its status, never a trace.
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import LLM
from ..errors import MoespecError
from . import protocol as P
from .metrics import ServerMetrics
from .engine_view import EngineView
from .guard import Guard
from ..harmony import HarmonyParser, split_harmony, uses_harmony
from .replies import collect, sse
from .worker import EngineWorker, Job, Overloaded, TooLarge

log = logging.getLogger("moespec.serve")
STATIC = Path(__file__).with_name("static")
DEGRADED_S = 60.0       # /health says "degraded" (503) this long after the engine last failed a batch


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server (flags of `moespec serve`)."""
    max_body_bytes: int = 8 << 20          # a larger body is refused (413) before it is parsed
    request_timeout_s: float | None = None  # a request still running after this is cancelled (408)
    render_timeout_s: float = 10.0          # tokenizing and chat template rendering, off the event loop
    api_key: str | None = None              # Authorization: Bearer <key> on every path but `open_paths`
    open_paths: tuple[str, ...] = ("/", "/health", "/metrics")     # (the page holds no data: it asks for the key)
    shutdown_timeout_s: float = 30.0        # on shutdown, requests still decoding after this are cancelled
    kv_bytes: int | None = None             # KV cache the running batch may hold (default: the --memory plan's)


class Service:
    """What the routes share: the model, its name, the engine thread, metrics and limits."""

    def __init__(self, llm: LLM, model_name: str, worker: EngineWorker, metrics: ServerMetrics, limits: Limits,
                 max_num_seqs: int):
        self.llm, self.model_name, self.worker, self.metrics, self.limits = llm, model_name, worker, metrics, limits
        self.max_num_seqs = max_num_seqs
        self.created = int(time.time())
        self.view = EngineView(self)
    def check_model(self, req) -> None:
        if req.model is not None and req.model != self.model_name:
            raise P.ApiError(404, f"The model `{req.model}` does not exist (this server serves `{self.model_name}`)",
                             type="not_found_error", param="model", code="model_not_found")

    async def off_loop(self, fn, what: str):
        """Tokenizing and template rendering run in a thread, bounded in time: the event loop keeps serving."""
        limit = self.limits.render_timeout_s
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn), limit)
        except asyncio.TimeoutError:
            raise P.ApiError(400, f"{what} took more than {limit:g}s to prepare; shorten it",
                             param="messages" if what == "the conversation" else "prompt") from None
        except MoespecError as e:
            code = "context_length_exceeded" if "context is" in str(e) else None
            raise P.ApiError(400, str(e), code=code, param="messages" if what == "the conversation" else None
                             ) from None

    @property
    def harmony(self) -> bool:
        """Chat replies come in gpt-oss's harmony format (moespec/harmony.py)."""
        return uses_harmony(self.llm.model.cfg)

    async def job_for(self, prompts: list, req, max_tokens, keep_special: bool = False) -> tuple[Job, int]:
        """Tokenize and validate everything before queueing: bad input is a 400 now, not a failed batch.
        keep_special: the text keeps the special tokens (harmony's markers)."""
        rows = len(prompts) * req.n
        if rows > self.max_num_seqs:
            raise P.ApiError(400, f"{len(prompts)} prompt(s) x n={req.n} is {rows} sequences, more than this server "
                                  f"decodes at once (--max-num-seqs {self.max_num_seqs}); split the request",
                             param="n" if req.n > 1 else "prompt")
        try:
            params = req.sampling_params(max_tokens)
            for p in params:
                p.validate()
            # the model's generation defaults (max_tokens among them) fill what the request left out: the KV budget
            # sizes the job with them
            params = [replace(p.with_defaults(self.llm.generation_config), skip_special_tokens=not keep_special)
                      for p in params]
            for p in params:
                p.validate()
        except MoespecError as e:
            # the API's name for the field (the engine says max_new_tokens)
            raise P.ApiError(400, str(e).replace("max_new_tokens", "max_tokens")) from None
        ids = await self.off_loop(lambda: [self.llm.encode(p) for p in prompts], "the prompt")
        job = Job([i for i in ids for _ in params], [p for _ in ids for p in params], asyncio.get_running_loop())
        try:
            self.worker.submit(job)
        except TooLarge as e:
            raise P.ApiError(400, str(e), param="max_tokens", code="kv_budget_exceeded") from None
        except Overloaded as e:
            raise P.ApiError(503, f"server overloaded: {e}; retry later", type="service_unavailable") from None
        return job, sum(len(i) for i in ids)


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
    app.state.service = Service(llm, model_name, worker, metrics, limits, max_num_seqs)
    for kind, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(kind, handler)
    app.include_router(router)
    return app


# -- errors: every one an OpenAI error object ------------------------------------------------------------------------
async def _api_error(_, e: P.ApiError):
    return JSONResponse(e.body(), status_code=e.status)


async def _bad_request(_, e: RequestValidationError):
    err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
    message = "request body is not valid JSON" if err.get("type") == "json_invalid" else \
        f"{where or 'request'}: {err.get('msg')}"
    return JSONResponse(P.ApiError(400, message, param=where or None).body(), status_code=400)


async def _http_error(_, e: StarletteHTTPException):
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return JSONResponse(P.ApiError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code)


async def _internal(_, e: Exception):
    rid = P.new_id("req")          # the details go to the log, under this id; the client gets the id only
    log.error("internal error %s: %s: %s", rid, type(e).__name__, e, exc_info=e)
    return JSONResponse(P.ApiError(500, f"internal error (request {rid}; details in the server log)",
                                   type="internal_error").body(), status_code=500)


ERROR_HANDLERS = {P.ApiError: _api_error, RequestValidationError: _bad_request,
                  StarletteHTTPException: _http_error, Exception: _internal}

# -- routes ---------------------------------------------------------------------------------------------------------
router = APIRouter()


@router.get("/health")
async def health(request: Request):
    worker = request.app.state.service.worker
    if not worker.is_alive():
        raise P.ApiError(503, "the engine thread is not running", type="service_unavailable")
    err = worker.last_error
    if err is not None and time.monotonic() - err[0] < DEGRADED_S:
        return JSONResponse({"status": "degraded", "error": err[1],
                             "seconds_ago": round(time.monotonic() - err[0], 1)}, status_code=503)
    return {"status": "ok"}


@router.get("/metrics")
async def prometheus(request: Request):
    return Response(generate_latest(request.app.state.service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
async def page():
    """The web page: a chat pane and the engine view (static/index.html, no outside requests)."""
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/v1/engine")
async def engine(request: Request):
    """The engine view's numbers (engine_view.py), about once a second from the page."""
    svc: Service = request.app.state.service
    return await asyncio.to_thread(svc.view.snapshot)


@router.get("/v1/models")
async def models(request: Request):
    svc: Service = request.app.state.service
    llm, name = svc.llm, svc.model_name
    return {"object": "list", "data": [{"id": name, "object": "model", "created": svc.created, "owned_by": "moespec",
                                        "root": name, "max_model_len": llm.max_model_len, "dtype": llm.dtype,
                                        "quantization": llm.quant.tag if llm.quant else "none",
                                        "lossy": llm.quant is not None}]}


@router.post("/v1/chat/completions")
async def chat(req: P.ChatRequest, request: Request):
    svc: Service = request.app.state.service
    svc.check_model(req)
    req.check()
    messages = [m.as_dict() for m in req.messages]
    prompt = await svc.off_loop(lambda: svc.llm.chat_ids(messages), "the conversation")
    harmony = svc.harmony
    job, n_prompt = await svc.job_for([prompt], req, req.max_new_tokens, keep_special=harmony)
    rid, name, timeout = P.new_id("chatcmpl"), svc.model_name, svc.limits.request_timeout_s
    if req.stream:
        parsers = [HarmonyParser() for _ in job.prompts] if harmony else None

        def chunk(c, text, finish, first):
            delta = {"role": "assistant"} if first else {}
            if parsers is None:
                delta.update({"content": text} if text or first else {})
            else:               # reasoning and content as the markers tell them apart; a finish flushes the rest
                reasoning, text = parsers[c].finish() if finish else parsers[c].feed(text)
                delta.update({k: v for k, v in (("reasoning_content", reasoning), ("content", text)) if v})
            return P.chat_chunk(rid, name, c, delta, finish, req.include_usage)
        return sse(job, chunk, lambda use: P.usage_chunk(rid, name, "chat.completion.chunk", use),
                   n_prompt, req.include_usage, timeout)
    texts, reasons, n_gen = await collect(job, request, timeout)
    if not harmony:
        return P.chat_reply(rid, name, texts, reasons, P.usage(n_prompt, n_gen))
    split = [split_harmony(t) for t in texts]
    return P.chat_reply(rid, name, [c for _, c in split], reasons, P.usage(n_prompt, n_gen), [r for r, _ in split])


@router.post("/v1/completions")
async def completions(req: P.CompletionRequest, request: Request):
    svc: Service = request.app.state.service
    svc.check_model(req)
    req.check()
    job, n_prompt = await svc.job_for(req.prompts(), req, req.max_tokens)
    rid, name, timeout = P.new_id("cmpl"), svc.model_name, svc.limits.request_timeout_s
    if req.stream:
        def chunk(c, text, finish, first):
            return P.completion_chunk(rid, name, c, text, finish, req.include_usage)
        return sse(job, chunk, lambda use: P.usage_chunk(rid, name, "text_completion", use),
                   n_prompt, req.include_usage, timeout)
    texts, reasons, n_gen = await collect(job, request, timeout)
    return P.completion_reply(rid, name, texts, reasons, P.usage(n_prompt, n_gen))
