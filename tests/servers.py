"""Starting `moespec serve` as a user does, for tests that need a real server process."""
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(p, base: str, tries: int = 300) -> None:
    """Until `base`/health answers 200; fails with the server's stderr if the process `p` has died."""
    for _ in range(tries):
        try:
            if urllib.request.urlopen(base + "/health", timeout=1).status == 200:
                return
        except (urllib.error.URLError, ConnectionError):
            assert p.poll() is None, p.stderr.read()
            time.sleep(0.1)
    raise AssertionError(f"{base} never became healthy")


@contextlib.contextmanager
def running_server(args: list[str], port: int, env: dict | None = None):
    """`moespec serve ARGS` as a user starts it; yields its base URL once /health answers, stops it after."""
    p = subprocess.Popen([sys.executable, "-m", "moespec.cli", "serve", *args, "--log-level", "warning"],
                         env={**os.environ, **(env or {})}, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(p, base)
        yield base
    finally:
        p.terminate()
        p.wait(timeout=30)
