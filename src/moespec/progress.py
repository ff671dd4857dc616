"""Progress bars for long loads (loading, quantizing, packing experts): rich, on an interactive stderr only."""
from __future__ import annotations

import sys


class progress:
    """`with progress(total, "loading model", enabled) as tick: ... tick()`.

    enabled None shows the bar when stderr is a terminal; False (pipes, logs, tests, `--json`) shows nothing."""

    def __init__(self, total: int, label: str, enabled: bool | None = None):
        self.total, self.label, self.bar = total, label, None
        self.enabled = sys.stderr.isatty() if enabled is None else enabled and sys.stderr.isatty()

    def __enter__(self):
        if not self.enabled:
            return lambda n=1: None
        from rich.console import Console
        from rich.progress import Progress
        self.bar = Progress(console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task(self.label, total=self.total)
        return lambda n=1: self.bar.advance(task, n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False
