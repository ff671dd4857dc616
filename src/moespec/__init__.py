"""moespec: fast Mixture-of-Experts inference where experts do not fit in fast memory.

The public API (`LLM`, `SamplingParams`, `Output`, `MoespecError`) is imported lazily, so light
subpackages such as `moespec.perf` (no torch) stay light to import.
"""
__version__ = "0.1.0"
__all__ = ["LLM", "Output", "SamplingParams", "MoespecError", "OffloadConfig"]


def __getattr__(name):
    if name in ("LLM", "Output"):
        from . import engine
        return getattr(engine, name)
    if name == "SamplingParams":
        from .sampling import SamplingParams
        return SamplingParams
    if name == "OffloadConfig":
        from .config import OffloadConfig
        return OffloadConfig
    if name == "MoespecError":
        from .errors import MoespecError
        return MoespecError
    raise AttributeError(f"module 'moespec' has no attribute {name!r}")
