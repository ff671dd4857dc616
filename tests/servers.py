"""Starting `moespec serve` as a user does, for tests that need a real server process."""
import socket
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
