"""Where every expert lives (the slow tier). Stores are read-only: eviction from a cache is free.

Both stores answer `load(layer, experts, pool, slots)`: put those experts' blobs into those slots of
a fast pool. They are called from loader threads (prefetch.py), so they only read shared state and
count under a lock.

- RamStore: every expert in CPU memory (one [E, blob] pool per MoE layer); a load is a copy.
- DiskStore: the packed file of packfile.py, read with os.preadv. With direct_io the file is opened
  with O_DIRECT (page cache bypassed: what the SSD really delivers, and no RSS hidden in the page
  cache); runs of consecutive experts become one scatter read straight into aligned pool slots.
  Filesystems that refuse O_DIRECT (EINVAL, e.g. older tmpfs) fall back to buffered reads.
"""
from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import MoespecError
from . import packfile
from .pool import ExpertPool

IOV_MAX = 1024          # Linux limit on buffers per preadv


class RamStore:
    """All experts in CPU memory. pools: {moe layer: ExpertPool with E slots, slot = expert}."""

    tier = "ram"

    def __init__(self, pools: dict[int, ExpertPool]):
        first = next(iter(pools.values()))
        self.pools = pools
        self.num_experts = first.slots
        self.blob_bytes = first.blob_bytes
        self.layout = first.layout
        self.bytes_read = 0
        self._mu = threading.Lock()

    def load(self, layer: int, experts: list[int], pool: ExpertPool, slots: list[int]) -> None:
        src = self.pools[layer].blob
        for e, s in zip(experts, slots):
            # Device path: from pinned memory this copy could be non_blocking on a copy stream (see
            # the prefetch.py docstring); on CPU it is a memcpy.
            pool.blob[s].copy_(src[e])
        with self._mu:
            self.bytes_read += len(experts) * self.blob_bytes

    def stats(self) -> dict:
        return {"tier": self.tier, "store_bytes_read": self.bytes_read}

    def close(self) -> None:
        pass


class DiskStore:
    """The packed expert file under offload_dir, built on first use and validated on every open.

    `build_reason` says why the file was (re)built this time: None when an existing file was reused,
    else "missing", "checkpoint changed since packing", "truncated ...", "header mismatch: ...".
    """

    tier = "disk"

    def __init__(self, ck, cfg: ModelConfig, offload_dir: str | Path, layout: dict, read_expert, direct_io: bool = True,
                 show_progress: bool | None = None):
        """ck: the loading.Checkpoint the file packs (its identity goes in the header); read_expert(layer, e): a
        one-slot pool of that expert in `layout`, read from it when the file must be (re)built."""
        d = Path(offload_dir)
        if d.exists() and not d.is_dir():
            raise MoespecError(f"offload dir {d} is not a directory")
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MoespecError(f"cannot create offload dir {d}: {e.strerror or e}") from None
        self.path = packfile.pack_path(d, ck.folder, layout)
        want = packfile.expected_header(ck, cfg, layout)
        found = packfile.read_header(self.path)
        self.build_reason = packfile.why_stale(self.path, found, want)
        if self.build_reason is not None:
            packfile.write_pack(self.path, read_expert, want, show_progress)
            found = packfile.read_header(self.path)
            if packfile.why_stale(self.path, found, want) is not None:
                raise MoespecError(f"packed expert file {self.path} does not validate right after writing it")
        self.header = h = found
        self.num_experts, self.blob_bytes, self.stride = h["num_experts"], h["blob_bytes"], h["stride"]
        self.checksums = packfile.read_checksums(self.path, h)
        self.check_s = 0.0                      # time spent checking checksums (reported in stats)
        self.layout = {k: h[k] for k in ("hidden", "inter", "dtype", "t13", "t2")}
        self.layout.update({k: h[k] for k in packfile.LAYOUT_KEYS if h.get(k)})
        self._index = {layer: i for i, layer in enumerate(h["layers"])}
        self.bytes_read = self.io_bytes = self.reads = 0
        self._mu = threading.Lock()
        self._local = threading.local()
        self._old_fds: list[int] = []
        self.direct_io = direct_io
        self.fd = self._open(direct_io)

    def _open(self, direct: bool) -> int:
        try:
            return os.open(self.path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        except OSError as e:
            if direct and e.errno == errno.EINVAL:        # this filesystem has no O_DIRECT
                self.direct_io = False
                return self._open(False)
            raise MoespecError(f"cannot open the packed expert file {self.path}: {e.strerror or e}") from None

    def offset(self, layer: int, expert: int) -> int:
        return self.header["data_offset"] + (self._index[layer] * self.num_experts + expert) * self.stride

    def load(self, layer: int, experts: list[int], pool: ExpertPool, slots: list[int]) -> None:
        """One preadv per run of consecutive expert ids (the loader sorts and batches requests)."""
        pairs = sorted(zip(experts, slots))
        direct = pool.stride_bytes == self.stride      # aligned CPU pool: read straight into the slots
        i = 0
        while i < len(pairs):
            j = i + 1
            while j < len(pairs) and j - i < IOV_MAX and pairs[j][0] == pairs[j - 1][0] + 1:
                j += 1
            run = pairs[i:j]
            off = self.offset(layer, run[0][0])
            if direct:
                bufs = [pool.raw(s) for _, s in run]
                self._read(bufs, off)
                self._verify(layer, [e for e, _ in run], [b[:self.blob_bytes] for b in bufs])
            else:
                buf, view = self._staging(len(run) * self.stride)
                self._read([buf], off)
                self._verify(layer, [e for e, _ in run], [buf[k * self.stride:k * self.stride + self.blob_bytes]
                                                          for k in range(len(run))])
                for k, (_, s) in enumerate(run):
                    # Device path: a pinned staging buffer + copy stream would go here (prefetch.py docstring).
                    pool.blob[s].copy_(view[k * self.stride:k * self.stride + self.blob_bytes].view(pool.blob.dtype))
            i = j

    def _verify(self, layer: int, experts: list[int], blobs: list) -> None:
        """Each blob read must match the checksum written when it was packed (hardware CRC32C, far faster than
        the read)."""
        import crc32c
        t = time.perf_counter()
        base = self._index[layer] * self.num_experts
        for e, blob in zip(experts, blobs):
            if crc32c.crc32c(blob) != self.checksums[base + e]:
                raise MoespecError(f"expert {e} of MoE layer {layer} read from {self.path} does not match its "
                                   "checksum: the file was damaged after packing. Delete it and moespec packs it "
                                   "again from the checkpoint")
        with self._mu:
            self.check_s += time.perf_counter() - t

    def _read(self, bufs: list, off: int) -> None:
        want = sum(len(b) for b in bufs)
        try:
            n = os.preadv(self.fd, bufs, off)
        except OSError as e:
            if not (self.direct_io and e.errno == errno.EINVAL):
                raise MoespecError(f"reading {self.path} at offset {off} failed: {e.strerror or e}") from None
            with self._mu:                                 # O_DIRECT refused at read time: go buffered
                if self.direct_io:
                    self._old_fds.append(self.fd)
                    self.direct_io = False
                    self.fd = self._open(False)
            n = os.preadv(self.fd, bufs, off)
        if n != want:
            raise MoespecError(f"short read from {self.path} at offset {off}: {n} of {want} bytes "
                               "(was the packed expert file truncated while in use?)")
        with self._mu:
            self.reads += 1
            self.io_bytes += n
            self.bytes_read += want // self.stride * self.blob_bytes

    def _staging(self, n: int) -> tuple[memoryview, torch.Tensor]:
        """A per-thread page-aligned buffer of at least n bytes (anonymous mmap is page aligned)."""
        mm = getattr(self._local, "mm", None)
        if mm is None or len(mm) < n:
            mm = self._local.mm = mmap.mmap(-1, n)
            self._local.view = torch.frombuffer(mm, dtype=torch.uint8)
        return memoryview(mm)[:n], self._local.view

    def stats(self) -> dict:
        return {"tier": self.tier, "store_bytes_read": self.bytes_read, "io_bytes": self.io_bytes,
                "io_reads": self.reads, "direct_io": self.direct_io, "pack_file": str(self.path),
                "checksum_s": self.check_s,
                "pack_rebuilt": self.build_reason}

    def close(self) -> None:
        for fd in [self.fd, *self._old_fds]:
            try:
                os.close(fd)
            except OSError:
                pass
        self._old_fds = []
