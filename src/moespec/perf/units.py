"""Byte sizes as users type them: `24GiB`, `512MB`, `2e9`, `1.5 TB`.

Decimal units (KB, MB, GB, TB) are powers of 1000, binary units (KiB, MiB, GiB, TiB) powers of 1024, and a bare
letter (K, M, G, T) is binary too, because "a 24G card" means 24 GiB. Case does not matter.

>>> parse_size("24GiB"), parse_size("512MB"), parse_size("2e9"), parse_size("1.5k")
(25769803776, 512000000, 2000000000, 1536)
"""
from __future__ import annotations

import math
import re

from .errors import PerfError

_UNITS = {"": 1, "b": 1,
          "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4,
          "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
          "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str | int | float, what: str = "size") -> int:
    """Bytes in `text`; a PerfError names `what` and shows accepted forms when the text is not a size."""
    if isinstance(text, bool):
        raise PerfError(f"{what}: expected a size like 24GiB, 512MB or 2e9, got {text!r}")
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        m = _SIZE.match(str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise PerfError(f"{what}: cannot read {text!r} as a size; use a number of bytes (2e9) or a number "
                            "with a unit: B, KB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB or K, M, G, T "
                            "(powers of 1024), e.g. 24GiB or 512MB")
        value, unit = float(m.group(1)), m.group(2).lower()
    if not math.isfinite(value) or value <= 0:
        raise PerfError(f"{what}: a size must be a positive finite number of bytes, got {text!r}")
    return int(round(value * _UNITS[unit]))


def format_bytes(n: float) -> str:
    """`format_bytes(25769803776) == '24.0 GiB'`: binary units, one decimal."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
