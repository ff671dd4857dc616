"""`moespec serve MODEL --host 127.0.0.1 --port 8000`: load once, then answer OpenAI API requests."""
from __future__ import annotations

import argparse
import os
import sys


def add_serve_parser(sub, env, model_args, engine_args) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, "
                                     "/v1/models, /health, /metrics)")
    model_args(s)
    s.add_argument("--host", default=env("host", "127.0.0.1"), help="address to listen on (default loopback only)")
    s.add_argument("--port", type=int, default=env("port", 8000, int))
    s.add_argument("--served-model-name", default=env("served_model_name"),
                   help="the model id clients send (default: the folder's name)")
    s.add_argument("--max-model-len", type=int, default=env("max_model_len", None, int),
                   help="context limit, prompt and new tokens (default: the model's max_position_embeddings)")
    s.add_argument("--max-num-seqs", type=int, default=env("max_num_seqs", 16, int),
                   help="sequences decoded together in one batch (default 16)")
    s.add_argument("--max-waiting", type=int, default=env("max_waiting", 64, int),
                   help="requests that may wait for the engine; more are answered 503 (default 64)")
    s.add_argument("--threads", type=int, default=env("threads", None, int),
                   help="torch threads for the engine (default: one fewer than the cores, at least 1, so the HTTP "
                        "thread does not preempt the engine's parallel kernels; OMP_NUM_THREADS also sets it)")
    s.add_argument("--api-key", default=env("api_key"),
                   help="require `Authorization: Bearer KEY` on every endpoint but the open ones (also MOESPEC_API_KEY)")
    s.add_argument("--open-endpoints", default=env("open_endpoints", "/,/health,/metrics"),
                   help="comma-separated paths served without the API key (default: the web page /, /health, "
                        "/metrics; '' for none)")
    s.add_argument("--max-body-bytes", type=int, default=env("max_body_bytes", 8 << 20, int),
                   help="largest request body accepted (default 8 MiB; larger: 413)")
    s.add_argument("--request-timeout", type=float, default=env("request_timeout", None, float),
                   help="cancel a request still running after this many seconds (408; default: no limit)")
    s.add_argument("--kv-memory", default=env("kv_memory"),
                   help="KV cache the running batch may hold, e.g. 2G (rows are sized to the batch's largest prompt + "
                        "max_tokens; a request joins when it fits, one that never can is a 400; default: the --memory "
                        "plan's share, else no bound beyond --max-num-seqs x --max-model-len)")
    s.add_argument("--shutdown-timeout", type=float, default=env("shutdown_timeout", 30.0, float),
                   help="on SIGTERM / Ctrl-C, let running requests finish for this many seconds, then cancel them "
                        "(default 30)")
    s.add_argument("--log-level", default=env("log_level", "info"),
                   choices=["critical", "error", "warning", "info", "debug"])
    for add in engine_args:       # offload and speculation flags, as for generate
        add(s)


def run_serve(a: argparse.Namespace, offload, spec) -> None:
    import uvicorn

    from ..engine import LLM
    from ..errors import MoespecError
    from .app import Limits, create_app
    if a.max_body_bytes < 1024:
        raise MoespecError(f"--max-body-bytes {a.max_body_bytes} is too small (at least 1024)")
    if a.request_timeout is not None and a.request_timeout <= 0:
        raise MoespecError(f"--request-timeout {a.request_timeout:g} must be a positive number of seconds")
    kv_bytes = None
    if a.kv_memory is not None:
        from ..perf.units import parse_size
        try:
            kv_bytes = parse_size(a.kv_memory, "--kv-memory")
        except Exception as e:                   # PerfError: the message names the flag
            raise MoespecError(str(e)) from None
    if a.shutdown_timeout < 0:
        raise MoespecError(f"--shutdown-timeout {a.shutdown_timeout:g} must be zero or more seconds")
    for name in ("port", "max_num_seqs", "max_waiting"):
        v = getattr(a, name)
        if v < (0 if name in ("port", "max_waiting") else 1) or (name == "port" and v > 65535):
            raise MoespecError(f"--{name.replace('_', '-')} {v} is out of range")
    import torch
    if a.threads is not None and a.threads < 1:
        raise MoespecError(f"--threads {a.threads} is out of range (at least 1)")
    threads = a.threads or (None if os.environ.get("OMP_NUM_THREADS") else max(1, _cores() - 1))
    if threads is not None:
        # On a machine with few cores, an engine using every core loses time whenever the HTTP thread runs
        # (its parallel kernels wait for the preempted worker): on a 2-core machine decoding slowed badly, so one
        # core is left to the server.
        torch.set_num_threads(threads)
    from ..flags import quant_config
    llm = LLM(a.model, dtype=a.dtype, max_model_len=a.max_model_len, offload=offload, speculative=spec,
              quantize=quant_config(a), memory=a.memory, max_batch=a.max_num_seqs,
              expert_parallel=a.expert_parallel)
    if llm.memory_plan is not None:
        print(llm.memory_plan.summary(), file=sys.stderr)
    name = a.served_model_name or llm.path.name
    limits = Limits(max_body_bytes=a.max_body_bytes, request_timeout_s=a.request_timeout, api_key=a.api_key or None,
                    open_paths=tuple(p.strip() for p in a.open_endpoints.split(",") if p.strip()),
                    shutdown_timeout_s=a.shutdown_timeout, kv_bytes=kv_bytes)
    if a.host not in ("127.0.0.1", "localhost", "::1") and limits.api_key is None:
        print(f"moespec serve: listening on {a.host} without --api-key: anyone who can reach it may use it",
              file=sys.stderr)
    app = create_app(llm, name, max_num_seqs=a.max_num_seqs, max_waiting=a.max_waiting, limits=limits)
    print(f"moespec serve: {name} ({llm.path}) on http://{a.host}:{a.port}/v1 ({torch.get_num_threads()} engine "
          "threads)", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level,
                    timeout_graceful_shutdown=a.shutdown_timeout)
    finally:
        llm.close()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))     # the cores this process may use (containers, taskset)
    except AttributeError:
        return os.cpu_count() or 1
