"""`moespec generate | chat | serve | inspect | bench | plan | calibrate | profile`: the command line."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import MoespecError
from .flags import (LOSSY_NOTE, _env, _model_args, _offload_args, _spec_args, load_llm,  # noqa: F401 (LOSSY_NOTE,
                    offload_config, quant_config, spec_config)                      # spec_config: the CLI's API)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="> 1 discourages tokens of the prompt and output (1 = off; default from generation_config)")
    p.add_argument("--presence-penalty", type=float, default=None, help="-2..2, once per token already generated")
    p.add_argument("--frequency-penalty", type=float, default=None, help="-2..2, per occurrence in the output")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moespec", description="Fast MoE inference with speculative decoding "
                                 "and expert offloading.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text from a prompt")
    _model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help="print exactly one JSON object")
    g.add_argument("--max-model-len", type=int, default=_env("max_model_len", None, int),
                   help="context limit, prompt and new tokens (default: the model's; with --memory, what fits)")
    _sampling_args(g)
    _offload_args(g)
    _spec_args(g)
    c = sub.add_parser("chat", help="chat in the terminal (empty line or Ctrl-D to quit)")
    _model_args(c)
    c.add_argument("--system", default=None)
    c.add_argument("--max-model-len", type=int, default=_env("max_model_len", None, int),
                   help="context limit of the conversation (default: the model's; with --memory, what fits)")
    _sampling_args(c)
    _offload_args(c)
    _spec_args(c)
    i = sub.add_parser("inspect", help="describe a model: family, shape, parameters, bytes per expert")
    _model_args(i)
    i.add_argument("--json", action="store_true")
    i.add_argument("--memory", default=None, help="a memory budget (e.g. 2GiB): show how many experts fit")
    from .bench.cli import add_bench_parser
    from .perf.cli import add_plan_parser
    add_bench_parser(sub, _model_args, _offload_args, _spec_args)
    add_plan_parser(sub, _model_args)
    from .calibrate.cli import add_calibrate_parser
    add_calibrate_parser(sub)
    from .profile_cli import add_profile_parser
    add_profile_parser(sub, _model_args)
    from .serve.cli import add_serve_parser
    add_serve_parser(sub, _env, _model_args, (_offload_args, _spec_args))
    return ap


def _params(a):
    from .sampling import SamplingParams
    return SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                          top_k=a.top_k, seed=a.seed, stop=a.stop, ignore_eos=a.ignore_eos,
                          repetition_penalty=a.repetition_penalty, presence_penalty=a.presence_penalty,
                          frequency_penalty=a.frequency_penalty)


def cmd_generate(a) -> None:
    llm = load_llm(a)
    prompt = llm.chat_ids([{"role": "user", "content": a.prompt}]) if a.chat else a.prompt
    if a.json:
        out = llm.generate(prompt, _params(a))[0]
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "prompt_token_ids": out.prompt_token_ids,
                          "finish_reason": out.finish_reason, "stats": out.stats}))
        return
    out = llm.generate(prompt, _params(a), on_text=lambda i, d: (sys.stdout.write(d), sys.stdout.flush()))[0]
    sys.stdout.write("\n")
    s = out.stats
    print(f"[{s['new_tokens']} tokens, {s['tokens_per_s']:.1f} tok/s, TTFT {s['ttft_s'] * 1000:.0f} ms, "
          f"finish: {out.finish_reason}]", file=sys.stderr)


def cmd_chat(a) -> None:
    from .harmony import uses_harmony
    llm = load_llm(a)
    messages = [{"role": "system", "content": a.system}] if a.system else []
    params = _params(a)
    harmony = uses_harmony(llm.model.cfg)          # gpt-oss: reasoning and answer told apart
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        if harmony:
            messages.append(_harmony_turn(llm, messages, params))
            continue
        reply = llm.generate(llm.chat_ids(messages), params,
                             on_text=lambda i, d: (sys.stdout.write(d), sys.stdout.flush()))[0]
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply.text})


def _harmony_turn(llm, messages: list, params) -> dict:
    """One gpt-oss reply: its reasoning printed dimmed (on a terminal), then its answer; the assistant message."""
    from dataclasses import replace

    from .harmony import HarmonyParser
    parser, text = HarmonyParser(), {"reasoning": "", "content": ""}
    dim, end = ("\x1b[2m", "\x1b[0m") if sys.stdout.isatty() else ("", "")

    def show(parts):
        for key, part in zip(("reasoning", "content"), parts):
            if part:
                if key == "content" and text["reasoning"] and not text["content"]:
                    sys.stdout.write("\n")                  # the answer on its own line, below the reasoning
                text[key] += part
                sys.stdout.write(dim + part + end if key == "reasoning" else part)
        sys.stdout.flush()
    llm.generate(llm.chat_ids(messages), replace(params, skip_special_tokens=False),
                 on_text=lambda i, d: show(parser.feed(d)))
    show(parser.finish())
    sys.stdout.write("\n")
    return {"role": "assistant", "content": text["content"], "thinking": text["reasoning"]}


def cmd_inspect(a) -> None:
    from .assets import resolve_model
    from .config import ModelConfig
    path = resolve_model(a.model)
    cfg = ModelConfig.from_folder(path)
    from .model_info import model_sizes
    info = {"path": str(path.resolve()), **model_sizes(path, cfg, a.dtype, quant_config(a))}
    if a.memory is not None:
        from .memory import RUNTIME_BYTES, plan_for_model
        from .perf.units import parse_size
        budget = parse_size(a.memory, "--memory")
        info["memory_budget"] = budget
        info["fits_entirely"] = False
        try:       # what `--memory` would choose (runtime: the usual Python + torch footprint)
            plan = plan_for_model(budget, path, cfg, a.dtype, quant_config(a), max_model_len=None,
                                  runtime=RUNTIME_BYTES)
            info["experts_per_layer_in_budget"] = plan.slots
            info["fits_entirely"] = plan.resident
            info["memory_plan"] = {**plan.describe(), "summary": plan.summary()}
        except MoespecError as e:
            info["experts_per_layer_in_budget"] = 0
            info["memory_plan"] = f"does not fit: {e}"
    if a.json:
        print(json.dumps(info))
        return
    for k, v in info.items():
        if isinstance(v, dict) and "summary" in v:       # the memory plan: its one-line summary (--json has it all)
            v = v["summary"]
        print(f"{k:>27}: {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k:>27}: {v}")


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    a.argv = argv           # what was given (None: sys.argv), for commands that re-run themselves (bench --memory-cap)
    try:
        {"generate": cmd_generate, "chat": cmd_chat, "inspect": cmd_inspect, "plan": _plan,
         "calibrate": _calibrate, "profile": _profile, "serve": _serve}.get(a.command, _bench)(a)
    except MoespecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:          # output piped into `head` and friends: stop quietly, like other CLIs
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


def _serve(a) -> None:
    from .serve.cli import run_serve
    run_serve(a, offload_config(a), spec_config(a))


def _calibrate(a) -> None:
    from .calibrate.cli import run_calibrate
    run_calibrate(a)


def _profile(a) -> None:
    from .profile_cli import run_profile
    run_profile(a)


def _plan(a) -> None:
    from pathlib import Path

    from .perf.cli import run_plan
    runtime = None
    if a.memory is not None and not getattr(a, "published", False) and (a.model is None or Path(a.model).is_dir()):
        from .assets import resolve_model
        from .config import ModelConfig
        from .memory import RUNTIME_BYTES, plan_for_model
        from .perf.units import parse_size
        path = resolve_model(a.model)
        try:
            p = plan_for_model(parse_size(a.memory, "--memory"), path, ModelConfig.from_folder(path), a.dtype or "auto",
                               quant_config(a), max_model_len=None, batch=a.batch, runtime=RUNTIME_BYTES)
            runtime = {**p.describe(), "summary": p.summary()}
        except MoespecError as e:
            runtime = {"error": str(e)}
    run_plan(a, runtime)


def _bench(a) -> None:
    from .bench.cli import run_bench
    run_bench(a)


if __name__ == "__main__":
    sys.exit(main())
