"""The packed expert file of the disk tier: a length-prefixed JSON header, every expert's blob, their checksums.

Layout: 16 bytes giving the header's length (ASCII decimal, newline-terminated), the JSON header, spaces up to
`data_offset` (a multiple of ALIGN: the header may be as long as the checkpoint needs, e.g. hundreds of shards);
then for each MoE layer in order, for each expert 0..E-1, its blob (exactly a pool slot: gate+up then down in the
run's dtype, or the quantized blob of experts/quant_pool.py) padded to `stride` = blob bytes rounded up to ALIGN, so every
blob starts and ends on an O_DIRECT boundary; then at `checksum_offset` one CRC32C (little-endian u32) per blob in
the same order, padded to ALIGN. The file is written an expert at a time: packing needs one expert's memory.
Every read from the slow tier is checked against its blob's checksum (store.py): a flipped bit on the disk is an
error naming the expert, never weights used silently.

The header names the checkpoint it was packed from (size, mtime and sha256 of config.json; size,
mtime and sha256 of each safetensors file's header bytes), the shapes, dtype, storage layout, the
quantization (method, group size, the int4 kernel's packing, which differs between CPU classes), blob
size and alignment. A file whose header does not match, or whose size is not what the header
promises (a truncated or interrupted write), is rebuilt: a stale file can never feed wrong weights.
Files are written to a temporary name (with the writer's pid) and renamed into place, so a crash leaves no
valid-looking file; temporary files of writers that are no longer running are removed before packing.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Callable

import torch

from ..config import ModelConfig
from ..errors import MoespecError
from .pool import PAGE, ExpertPool, round_up
from .pools import layout_blob_bytes

FORMAT, VERSION, ALIGN = "moespec-experts", 2, PAGE
PREFIX = 16                   # bytes of the header-length prefix
MAX_HEADER = 64 << 20         # a header larger than this is garbage, not a checkpoint
SYNC_BYTES = 64 << 20


# what a layout may add to a float one: quantization (method, group size, int4 packing), experts with biases
LAYOUT_KEYS = ("quant", "group_size", "int4_pack", "bias")


def pack_path(offload_dir: Path, folder: Path, layout: dict) -> Path:
    """One file per (checkpoint folder, dtype, quantization), so several models and settings share one dir."""
    tag = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:10]
    q = layout.get("quant")
    qtag = f"-{q}" + (f"g{layout['group_size']}" if q == "int4" else "") if q else ""
    return offload_dir / f"{folder.name}-{tag}-{layout['dtype']}{qtag}.experts"


def _sha(path: Path, nbytes: int | None = None) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read() if nbytes is None else f.read(nbytes)).hexdigest()


def checkpoint_identity(ck) -> dict:
    """ck: a loading.Checkpoint (its folder, tensor names and file_of). Cheap but strict: stat data plus a hash of config.json and of each safetensors header."""
    out = {}
    cfg = ck.folder / "config.json"
    st = cfg.stat()
    out["config.json"] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha(cfg)}
    for f in sorted({ck.file_of(n) for n in ck.names}):
        st = f.stat()
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
        out[f.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "header_sha256": _sha(f, 8 + n)}
    return out


def expected_header(ck, cfg: ModelConfig, layout: dict) -> dict:
    """The header a file packed now from `ck` would carry (layout: the pools' storage layout, expert_layout)."""
    blob = layout_blob_bytes(layout)
    stride = round_up(blob, ALIGN)
    layers = cfg.moe_layer_ids
    n = len(layers) * cfg.num_experts
    h = {"format": FORMAT, "version": VERSION, "checkpoint": checkpoint_identity(ck), "layers": layers,
         "num_experts": cfg.num_experts, "hidden": cfg.hidden_size, "inter": cfg.moe_intermediate_size,
         "dtype": layout["dtype"], "t13": bool(layout["t13"]), "t2": bool(layout["t2"]),
         **{k: layout.get(k) for k in LAYOUT_KEYS},
         "blob_bytes": blob, "stride": stride, "align": ALIGN, "checksum": "crc32c",
         "data_offset": 0, "checksum_offset": 0, "file_bytes": 0}
    # The offsets follow the header's own length: 64 bytes of slack cover the digits they add.
    data = round_up(PREFIX + len(json.dumps(h)) + 64, ALIGN)
    h.update(data_offset=data, checksum_offset=data + n * stride, file_bytes=data + n * stride + round_up(4 * n, ALIGN))
    return h


def read_header(path: Path) -> dict | None:
    """The header of an existing file, or None when there is none worth reading (absent or garbage)."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(PREFIX)
            n = int(prefix.decode("ascii")) if len(prefix) == PREFIX and prefix.endswith(b"\n") else -1
            if not 0 < n <= MAX_HEADER:
                return None
            raw = f.read(n)
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, ValueError):
        return None
    except OSError as e:
        raise MoespecError(f"cannot read the packed expert file {path}: {e.strerror or e}") from None
    try:
        h = json.loads(raw.decode("utf-8"))
        return h if isinstance(h, dict) else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def read_checksums(path: Path, header: dict) -> list[int]:
    """The CRC32C of every blob, in file order (layer by layer, expert by expert)."""
    n = len(header["layers"]) * header["num_experts"]
    with open(path, "rb") as f:
        f.seek(header["checksum_offset"])
        raw = f.read(4 * n)
    if len(raw) != 4 * n:
        raise MoespecError(f"the packed expert file {path} has no complete checksum table")
    return list(struct.unpack(f"<{n}I", raw))


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete temporary files of writers of `path` that are no longer running (a kill during packing)."""
    gone = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:-len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            gone.append(tmp)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def why_stale(path: Path, found: dict | None, want: dict) -> str | None:
    """None if `found` describes a complete file packed from the same checkpoint; else the reason.

    The storage layout (t13 / t2) is not compared: the caller adopts the file's layout instead.
    """
    if found is None:
        return "missing" if not path.exists() else "unreadable header"
    if found.get("format") != FORMAT or found.get("version") != VERSION:
        return f"format {found.get('format')!r} v{found.get('version')}, expected {FORMAT!r} v{VERSION}"
    if found.get("checkpoint") != want["checkpoint"]:
        return "checkpoint changed since packing"
    for key in ("layers", "num_experts", "hidden", "inter", "dtype", *LAYOUT_KEYS, "blob_bytes", "stride", "align",
                "checksum", "data_offset", "checksum_offset"):
        if found.get(key) != want[key]:
            return f"header mismatch: {key} is {found.get(key)!r}, expected {want[key]!r}"
    if type(found.get("t13")) is not bool or type(found.get("t2")) is not bool:
        return "header mismatch: layout"
    size = path.stat().st_size
    if size != want["file_bytes"]:
        return f"truncated or overlong: {size} bytes, expected {want['file_bytes']}"
    return None


def write_pack(path: Path, read_expert: Callable[[int, int], ExpertPool], header: dict,
               show_progress: bool | None = None) -> None:
    """Pack every expert into `path`, one expert in memory at a time: read_expert(layer, e) gives a one-slot pool
    holding expert e of that MoE layer in the header's layout (the checkpoint reader, loading/build.py)."""
    from ..progress import progress
    d = path.parent
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MoespecError(f"cannot create offload dir {d}: {e.strerror or e}") from None
    free = shutil.disk_usage(d).free
    if free < header["file_bytes"]:
        raise MoespecError(f"offload dir {d} has {free / 2**30:.2f} GiB free; the packed experts need "
                           f"{header['file_bytes'] / 2**30:.2f} GiB")
    import crc32c
    remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pad = bytes(header["stride"] - header["blob_bytes"])
    head = json.dumps(header).encode()
    sums = []
    what = "packing" + (f" {header['quant']}" if header.get("quant") else "")
    try:
        with open(tmp, "wb") as f, progress(len(header["layers"]) * header["num_experts"],
                                            f"{what} experts into {path.name}", show_progress) as tick:
            f.write(b"%015d\n" % len(head) + head + b" " * (header["data_offset"] - PREFIX - len(head)))
            unsynced = 0
            for layer in header["layers"]:
                for e in range(header["num_experts"]):
                    pool = read_expert(layer, e)
                    blob = pool.blob.view(torch.uint8)[0].contiguous().numpy()
                    sums.append(crc32c.crc32c(blob))
                    f.write(memoryview(blob))
                    f.write(pad)
                    unsynced += header["stride"]
                    if unsynced >= SYNC_BYTES:     # written pages stay cached (a memory cgroup counts them)
                        os.fdatasync(f.fileno())   # until written back: write back and drop them as we go
                        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                        unsynced = 0
                    tick()
            table = struct.pack(f"<{len(sums)}I", *sums)
            f.write(table + bytes(header["file_bytes"] - header["checksum_offset"] - len(table)))
            f.flush()
            os.fsync(f.fileno())
            # The reads that follow should come from the device, not from pages this write left behind.
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MoespecError(f"cannot write the packed expert file {path}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
