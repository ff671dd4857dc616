"""Tensor lookup over a checkpoint folder: one `model.safetensors` or a sharded index.

Tensors are read with pread straight into fresh tensors, never memory-mapped: pages of a mapped checkpoint
count in the process's RSS for as long as the mapping lives (safetensors' reader maps each whole file, so a
resident run peaked holding the checkpoint twice: mapped and copied), while a read leaves only the copy we
keep. The byte ranges come from the safetensors header (8-byte length, JSON of dtype / shape / data_offsets
per tensor), which is also what lets an expert of a fused [E, ...] tensor be read on its own.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from ..errors import MoespecError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER = 100 << 20          # safetensors' own limit on the JSON header
TEXT_PREFIX = "language_model."


class Checkpoint:
    """Maps tensor names to the safetensors file holding them; reads tensors on demand."""

    def __init__(self, folder: str | Path, drop_cache: bool = False):
        """drop_cache: tell the kernel to drop each tensor's pages from the page cache once read (a memory cgroup
        counts page cache; under a budget, pages left behind would be reclaimed later, in the middle of decoding)."""
        self.folder = Path(folder)
        self.drop_cache = drop_cache
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise MoespecError(f"{index} is not a valid safetensors index: {e}") from None
            if not isinstance(weight_map, dict):
                raise MoespecError(f"{index} is not a valid safetensors index: weight_map is not an object")
            root = self.folder.resolve()
            self.files = {}
            for name, f in weight_map.items():
                path = self.folder / str(f)
                # A shard must be a file of this folder: an index naming ../../etc/... is refused, not followed.
                if not isinstance(f, str) or root not in path.resolve().parents:
                    raise MoespecError(f"{index} maps {name} to {f!r}, which is not a file inside the model folder")
                self.files[name] = path
        elif single.is_file():
            self.files = None
            self._single = single
        else:
            raise MoespecError(f"no model.safetensors or model.safetensors.index.json in {self.folder}")
        self._files: dict[Path, object] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}
        self.names = set(self.files) if self.files is not None else set(self._header(single)[1])
        # A multimodal checkpoint (Llama 4) keeps its text decoder under language_model.: read it by its own names.
        self._alias = {}
        if "model.embed_tokens.weight" not in self.names:
            self._alias = {n[len(TEXT_PREFIX):]: n for n in self.names if n.startswith(TEXT_PREFIX)}
            self.names |= set(self._alias)

    def _header(self, path: Path) -> tuple[int, dict]:
        """(offset of the data, {name: {"dtype", "shape", "data_offsets"}}) of one safetensors file."""
        if path not in self._headers:
            f = self._file(path)
            try:
                (n,) = struct.unpack("<Q", os.pread(f.fileno(), 8, 0))
                if n > MAX_HEADER:
                    raise ValueError(f"header length {n} is implausible")
                raw = os.pread(f.fileno(), n, 8)
                if len(raw) != n:
                    raise ValueError("file ends inside its header")
                entries = json.loads(raw)
                entries.pop("__metadata__", None)
            except (struct.error, ValueError, UnicodeDecodeError) as e:
                raise MoespecError(f"cannot read {path}: not a safetensors file ({e})") from None
            self._headers[path] = (8 + n, entries)
        return self._headers[path]

    def _file(self, path: Path):
        if path not in self._files:
            if not path.is_file():
                raise MoespecError(f"checkpoint shard {path} is missing")
            try:
                self._files[path] = open(path, "rb", buffering=0)    # closed when the Checkpoint is dropped
            except OSError as e:
                raise MoespecError(f"cannot open {path}: {e.strerror or e}") from None
        return self._files[path]

    def file_of(self, name: str) -> Path:
        name = self._alias.get(name, name)
        return self.files[name] if self.files is not None else self._single

    def has(self, name: str) -> bool:
        return name in self.names

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, shape) of a tensor as stored."""
        dtype, shape, _, _ = self._entry(name)
        return dtype, shape

    def _entry(self, name: str) -> tuple[torch.dtype, tuple[int, ...], int, Path]:
        if name not in self.names:
            raise MoespecError(f"checkpoint {self.folder} is missing tensor {name!r}")
        path = self.file_of(name)
        start, entries = self._header(path)
        e = entries.get(self._alias.get(name, name))
        if e is None:
            raise MoespecError(f"checkpoint {self.folder}: the index puts tensor {name!r} in {path.name}, "
                               "which does not hold it")
        if e.get("dtype") not in DTYPES:
            raise MoespecError(f"tensor {name!r} in {path} has dtype {e.get('dtype')!r}, which moespec cannot read")
        dtype, shape = DTYPES[e["dtype"]], tuple(e["shape"])
        b, end = e["data_offsets"]
        if end - b != _numel(shape) * torch.empty((), dtype=dtype).element_size():
            raise MoespecError(f"tensor {name!r} in {path}: its byte range does not match its shape {shape}")
        return dtype, shape, start + b, path

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The whole tensor, read into fresh memory. shape: what config.json implies (checked)."""
        dtype, stored, off, path = self._entry(name)
        if shape is not None and stored != tuple(shape):
            raise MoespecError(f"tensor {name!r} has shape {stored}, expected {tuple(shape)} from config.json")
        return self._read(path, off, dtype, stored, name)

    def get_rows(self, name: str, start: int, stop: int, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Rows [start, stop) of the tensor's first dimension (one expert of a fused [E, ...] tensor)."""
        dtype, stored, off, path = self._entry(name)
        if shape is not None and stored != tuple(shape):
            raise MoespecError(f"tensor {name!r} has shape {stored}, expected {tuple(shape)} from config.json")
        row = _numel(stored[1:]) * torch.empty((), dtype=dtype).element_size()
        return self._read(path, off + start * row, dtype, (stop - start, *stored[1:]), name)

    def _read(self, path: Path, off: int, dtype: torch.dtype, shape: tuple[int, ...], name: str) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype)
        if t.numel() == 0:
            return t
        buf = memoryview(t.view(-1).view(torch.uint8).numpy())
        fd, done = self._file(path).fileno(), 0
        try:
            while done < len(buf):          # one read returns at most ~2 GiB on Linux
                n = os.preadv(fd, [buf[done:]], off + done)
                if n == 0:
                    raise MoespecError(f"cannot read tensor {name!r} from {path}: the file is truncated")
                done += n
        except OSError as e:
            raise MoespecError(f"cannot read tensor {name!r} from {path}: {e.strerror or e}") from None
        if self.drop_cache:
            os.posix_fadvise(fd, off, len(buf), os.POSIX_FADV_DONTNEED)
        return t

    def first(self, names: list[str]) -> str | None:
        return next((n for n in names if n in self.names), None)

    def dtype(self) -> torch.dtype | None:
        """The floating dtype most of the checkpoint's bytes are stored in (None if it has none)."""
        count: dict[torch.dtype, int] = {}
        for path in sorted({self.file_of(n) for n in self.names}):
            for e in self._header(path)[1].values():
                dt = DTYPES.get(e.get("dtype"))
                if dt is not None and dt.is_floating_point:
                    count[dt] = count.get(dt, 0) + e["data_offsets"][1] - e["data_offsets"][0]
        return max(count, key=count.get) if count else None


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
