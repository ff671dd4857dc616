"""`moespec calibrate`: measure this machine into a `moespec.perf.Hardware` profile (`measure.py`) and check
the performance model's predicted decode TPOT against moespec's real runs (`validate.py`).

Unlike `moespec.perf`, this package uses torch (it times real kernels), so it is imported lazily by the CLI.
"""
from __future__ import annotations

__all__ = ["calibrate", "default_output", "read_direct", "validate"]


def __getattr__(name):
    if name in ("calibrate", "default_output", "read_direct"):
        from . import measure
        return getattr(measure, name)
    if name == "validate":
        from .validate import validate
        return validate
    raise AttributeError(f"module 'moespec.calibrate' has no attribute {name!r}")
