"""`moespec bench --variant NAME=FLAGS`: several settings of one model measured side by side in one process, and
`--read-limit` without `--memory-cap`: the bench process itself reads its disk tier through a throttle."""
from __future__ import annotations

import os
import shlex
import sys

from ..errors import MoespecError


def parse_variants(a) -> list[tuple[str, object]]:
    """(name, namespace) per --variant: the command's own flags with the variant's FLAGS parsed after them."""
    from .capped import strip_flags               # the --memory-cap re-run drops flags the same way
    clean = strip_flags(list(sys.argv[1:] if a.argv is None else a.argv), {"--variant": 1})
    out, names = [], set()
    for spec in a.variant:
        name, eq, flags = spec.partition("=")
        if not eq or not name.strip():
            raise MoespecError(f"--variant {spec!r} must be NAME=FLAGS (FLAGS may be empty: --variant plain=)")
        if name in names:
            raise MoespecError(f"--variant name {name!r} is given twice")
        names.add(name)
        try:
            ns = a.bench_parser.parse_args(clean[1:] + shlex.split(flags)) if clean[:1] == ["bench"] else \
                a.bench_parser.parse_args(clean + shlex.split(flags))
        except SystemExit:
            raise MoespecError(f"--variant {name}: cannot parse its flags {flags!r} (see the message above)") from None
        ns.argv = a.argv
        out.append((name, ns))
    return out


def read_throttle(a, offloads: list):
    """With --read-limit and no --memory-cap: this process joins a blkio group throttling reads from the disk that
    holds the disk tier (O_DIRECT included), for the whole run; None without --read-limit."""
    if not a.read_limit:
        return None
    from ..perf.units import parse_size
    from .cgroup import Group, device_of
    tiers = [o for o in offloads if o is not None and o.offload == "disk"]
    if not tiers:
        raise MoespecError("--read-limit throttles the disk tier: give --offload disk (or --memory-cap)")
    try:
        rate = parse_size(a.read_limit, "--read-limit")
    except Exception as e:
        raise MoespecError(str(e)) from None
    folder = tiers[0].resolved_dir()
    folder.mkdir(parents=True, exist_ok=True)
    g = Group(f"moespec-bench-{os.getpid()}", read_bps=rate, device=device_of(folder)).__enter__()
    g.join()
    print(f"reads from the disk tier throttled to {rate / 1e6:.0f} MB/s (blkio)", file=sys.stderr)
    return g
