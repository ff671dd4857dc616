"""A fresh memory cgroup (and optionally a block-I/O read throttle) for one benchmark process.

`moespec bench --memory-cap LIMIT` runs every engine in its own group so that a machine smaller than the model can
be emulated on a bigger one: cgroup v1 `memory.limit_in_bytes` (page cache counts, as on a small machine) or v2
`memory.max`. `--read-limit RATE` adds v1 `blkio.throttle.read_bps_device` / v2 `io.max rbps` on the device that
holds the model files, which also applies to O_DIRECT reads: a fast SSD can stand in for a slower tier. The child
joins the group before it execs (its whole life is counted); afterwards the group's peak usage, failcnt (times the
limit was hit, v1) or `memory.events` max / oom_kill (v2) are read and the group removed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import MoespecError

ROOT = Path("/sys/fs/cgroup")


def version() -> int:
    """1 (a v1 memory controller is mounted), 2 (the unified hierarchy), or 0 (no usable cgroups)."""
    if (ROOT / "memory" / "memory.limit_in_bytes").exists():
        return 1
    if (ROOT / "cgroup.controllers").exists():
        return 2
    return 0


def device_of(path: str | Path) -> str:
    """"MAJ:MIN" of the block device a file lives on (the whole disk, as the throttles want it)."""
    st = os.stat(path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    part = Path(f"/sys/dev/block/{major}:{minor}")
    if (part / "partition").exists():            # a partition: throttle its disk
        return (part.resolve().parent / "dev").read_text().strip()
    return f"{major}:{minor}"


@dataclass
class Group:
    """One group for one child process. Use as a context manager; `join` is the child's preexec function."""
    name: str
    memory: int | None = None
    read_bps: int | None = None
    device: str | None = None

    def __post_init__(self):
        self.v = version()
        if self.v == 0:
            raise MoespecError("--memory-cap / --read-limit need cgroups, and none is mounted under /sys/fs/cgroup")
        self.dirs: list[Path] = []

    def __enter__(self) -> "Group":
        try:
            if self.v == 1:
                mem = ROOT / "memory" / self.name
                mem.mkdir()
                self.dirs.append(mem)
                if self.memory is not None:
                    (mem / "memory.limit_in_bytes").write_text(str(self.memory))
                    if (mem / "memory.memsw.limit_in_bytes").exists():     # no swapping around the limit
                        (mem / "memory.memsw.limit_in_bytes").write_text(str(self.memory))
                if self.read_bps is not None:
                    blk = ROOT / "blkio" / self.name
                    blk.mkdir()
                    self.dirs.append(blk)
                    (blk / "blkio.throttle.read_bps_device").write_text(f"{self.device} {self.read_bps}")
            else:
                g = ROOT / self.name
                g.mkdir()
                self.dirs.append(g)
                if self.memory is not None:
                    (g / "memory.max").write_text(str(self.memory))
                    if (g / "memory.swap.max").exists():
                        (g / "memory.swap.max").write_text("0")
                if self.read_bps is not None:
                    (g / "io.max").write_text(f"{self.device} rbps={self.read_bps}")
        except OSError as e:
            self.__exit__()
            raise MoespecError(f"cannot set up a cgroup under {ROOT} for --memory-cap / --read-limit: "
                               f"{e.strerror or e} (it needs root, or a delegated cgroup v2 subtree)") from None
        return self

    def join(self) -> None:
        """Move the calling process into the group (run in the child between fork and exec)."""
        for d in self.dirs:
            (d / "cgroup.procs").write_text(str(os.getpid()))

    def leave(self) -> None:
        """Move the calling process back to the root groups (before the group is removed)."""
        roots = [ROOT / "memory", ROOT / "blkio"] if self.v == 1 else [ROOT]
        for r in roots[:len(self.dirs)]:
            try:
                (r / "cgroup.procs").write_text(str(os.getpid()))
            except OSError:
                pass

    def stats(self) -> dict:
        """Peak memory of the group (page cache included), how often the limit was hit, OOM kills."""
        if self.v == 1:
            mem = self.dirs[0]
            return {"peak_bytes": int((mem / "memory.max_usage_in_bytes").read_text()),
                    "failcnt": int((mem / "memory.failcnt").read_text()),
                    "oom_kill": _kv(mem / "memory.oom_control").get("oom_kill", 0)}
        g = self.dirs[0]
        ev = _kv(g / "memory.events")
        peak = g / "memory.peak"
        return {"peak_bytes": int(peak.read_text()) if peak.exists() else None, "failcnt": ev.get("max", 0),
                "oom_kill": ev.get("oom_kill", 0)}

    def __exit__(self, *exc) -> bool:
        for d in reversed(self.dirs):
            try:
                d.rmdir()
            except OSError:
                pass
        self.dirs = []
        return False


def _kv(path: Path) -> dict:
    try:
        return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines() if line.strip())}
    except (OSError, ValueError):
        return {}


def drop_page_cache(paths) -> None:
    """A cold start: ask the kernel to drop these files' cached pages (clean ones go; nothing is written)."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
