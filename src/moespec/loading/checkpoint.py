"""Tensor lookup over a checkpoint folder: one `model.safetensors` or a sharded index."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import MoespecError


class Checkpoint:
    """Maps tensor names to the safetensors file holding them; reads tensors lazily (memory-mapped)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise MoespecError(f"{index} is not a valid safetensors index: {e}") from None
            self.files = {name: self.folder / f for name, f in weight_map.items()}
        elif single.is_file():
            self.files = None
            self._single = single
        else:
            raise MoespecError(f"no model.safetensors or model.safetensors.index.json in {self.folder}")
        self._handles: dict[Path, object] = {}
        self.names = set(self.files) if self.files is not None else set(self._open(single).keys())

    def _open(self, path: Path):
        if path not in self._handles:
            if not path.is_file():
                raise MoespecError(f"checkpoint shard {path} is missing")
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise MoespecError(f"cannot read {path}: {e}") from None
        return self._handles[path]

    def file_of(self, name: str) -> Path:
        return self.files[name] if self.files is not None else self._single

    def has(self, name: str) -> bool:
        return name in self.names

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if name not in self.names:
            raise MoespecError(f"checkpoint {self.folder} is missing tensor {name!r}")
        try:
            t = self._open(self.file_of(name)).get_tensor(name)
        except MoespecError:
            raise
        except Exception as e:
            raise MoespecError(f"cannot read tensor {name!r} from {self.file_of(name)}: {e}") from None
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise MoespecError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)} from config.json")
        return t

    def first(self, names: list[str]) -> str | None:
        return next((n for n in names if n in self.names), None)
