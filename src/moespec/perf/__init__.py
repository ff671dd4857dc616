"""Performance model: predicts step times from a config and a hardware profile, plans settings, and controls
speculation online. Pure stdlib + numpy (no torch), so `moespec plan` runs without weights.

    from moespec.perf import known_model, get_profile, plan
    plan(known_model("mixtral-8x7b"), get_profile("rtx4090-pcie4"), 24 * 2**30, batch=1)
"""
from .controller import SpecController
from .errors import PerfError
from .fit import StepFit, fit_link, fit_step
from .hardware import PROFILES, Hardware, get_profile
from .model import ModelDesc, known_model, known_names
from .planner import memory_plan, plan
from .spec import Drafter, best_k, best_spec, expected_accepted, spec_decode, speedup, target_efficiency
from .step import ForwardCost, Offload, decode_tokens_per_s, decode_tpot, forward_cost, prefill_time, t_target
from .union import expected_misses, expected_union, expected_union_profile, sample_union
from .units import format_bytes, parse_size

__all__ = [
    "Drafter", "ForwardCost", "Hardware", "ModelDesc", "Offload", "PROFILES", "PerfError", "SpecController",
    "StepFit", "best_k", "best_spec", "decode_tokens_per_s", "decode_tpot", "expected_accepted",
    "expected_misses", "expected_union", "expected_union_profile", "fit_link", "fit_step", "format_bytes",
    "forward_cost", "get_profile", "known_model", "known_names", "memory_plan", "parse_size", "plan",
    "prefill_time", "sample_union", "spec_decode", "speedup", "t_target", "target_efficiency",
]
