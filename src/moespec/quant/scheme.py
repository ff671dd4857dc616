"""What to quantize and how: `QuantConfig` (`--quantize int8|int4`, `--quantize-group-size`, `--quantize-dense`).

Weight-only quantization, applied at load from an ordinary checkpoint folder. Activations stay in the run's
dtype and enter the kernels as bf16 (torch's CPU int8 / int4 products are fast only with bf16 activations:
many times slower with float32 ones), so a quantized model computes with bf16 activations in its quantized
products whatever `--dtype` says. It is lossy with respect to the checkpoint; speculation over a quantized
model stays lossless with respect to that quantized model (the kernels give each row the same result
whatever the number of rows, so verification and plain decoding agree bit for bit).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import MoespecError

METHODS = ("none", "int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)        # what torch's CPU int4 kernel accepts


@dataclass(frozen=True)
class QuantConfig:
    """method: "int8" (per output channel, symmetric) or "int4" (groups of `group_size` inputs, asymmetric);
    dense: also the attention projections, dense MLPs, shared experts and the LM head (default: experts only,
    which hold most of an MoE's bytes; the embedding lookup is never quantized)."""
    method: str = "none"
    group_size: int = 64
    dense: bool = False

    def validate(self) -> "QuantConfig":
        if self.method not in METHODS:
            raise MoespecError(f"quantize={self.method!r} is not one of: {', '.join(METHODS)}")
        if self.method == "int4" and self.group_size not in GROUP_SIZES:
            raise MoespecError(f"quantize group size {self.group_size!r} is not one of: "
                               f"{', '.join(map(str, GROUP_SIZES))} (what the int4 kernel accepts)")
        if self.dense and self.method == "none":
            raise MoespecError("--quantize-dense needs --quantize int8 or int4")
        return self

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def tag(self) -> str:
        """Short name for file names and reports: int8, int4g64."""
        return self.method + (f"g{self.group_size}" if self.method == "int4" else "")

    def describe(self) -> dict:
        """What stats, inspect and /v1/models report."""
        return {"quantize": self.method, "quantize_group_size": self.group_size if self.method == "int4" else None,
                "quantize_dense": self.dense, "quantize_lossy": self.enabled}

    @staticmethod
    def parse(value) -> "QuantConfig | None":
        """None / "none" -> None; "int8" / "int4" / a dict of the fields / a QuantConfig -> a validated one."""
        if value is None or isinstance(value, QuantConfig):
            q = value
        elif isinstance(value, str):
            q = QuantConfig(method=value)
        elif isinstance(value, dict):
            unknown = sorted(set(value) - {"method", "group_size", "dense"})
            if unknown:
                raise MoespecError(f"quantize: unknown field(s) {', '.join(unknown)}; known: dense, group_size, method")
            q = QuantConfig(**value)
        else:
            raise MoespecError(f"quantize={value!r} must be 'int8', 'int4', 'none' or a dict of method/group_size/dense")
        if q is None:
            return None
        q.validate()
        return q if q.enabled else None
