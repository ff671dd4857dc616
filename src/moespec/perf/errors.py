"""The perf package's error: a `MoespecError` (the CLI prints it as `error: ...`) that is also a `ValueError`."""
from __future__ import annotations

from ..errors import MoespecError


class PerfError(MoespecError, ValueError):
    """Bad input to the performance model: an unknown model_type, a malformed size, a missing profile."""
