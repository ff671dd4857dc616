"""The web page of `moespec serve`, in a real browser: Debian's Chromium, headless, driven by playwright (the
system browser, no browser download). It loads the page with the API key, chats with the bundled model and sees the
text stream in, stops a long reply and sees the server's running count fall to 0, sees the expert heatmap fill after a
request with a 2-expert cache over the disk tier, and no request leaves the machine."""
import json
import shutil
import time
import urllib.error
import urllib.request

import pytest

from servers import free_port, running_server

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium (Debian: apt-get install chromium)")
KEY = "page-key"


def running(base: str) -> float:
    req = urllib.request.Request(base + "/metrics")
    for line in urllib.request.urlopen(req, timeout=5).read().decode().splitlines():
        if line.startswith("moespec:num_requests_running{"):
            return float(line.split()[-1])
    raise AssertionError("no running gauge in /metrics")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    off = tmp_path_factory.mktemp("off")
    with running_server(["--dtype", "float32", "--port", str(port), "--expert-cache", "2", "--offload", "disk",
                         "--offload-dir", str(off), "--api-key", KEY], port) as base:
        yield base


def test_page_chats_stops_and_shows_the_experts(server):
    requests, sizes = [], {}
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("request", lambda r: requests.append(r.url))
        page.on("response", lambda r: sizes.__setitem__(r.url, len(r.body())) if r.url == server + "/" else None)
        page.goto(server + "/")
        page.fill("#key", KEY)
        page.dispatch_event("#key", "change")
        page.wait_for_function("document.getElementById('heat').dataset.resident !== undefined", timeout=10000)
        before = json.loads(page.eval_on_selector("#heat", "c => c.dataset.resident"))
        assert all(v == [] for v in before.values())                     # nothing loaded yet
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "24")
        page.fill("#prompt", "def fibonacci(n):")
        page.click("#send")
        page.wait_for_function("document.querySelector('.msg.assistant').textContent.length > 10", timeout=60000)
        page.wait_for_function("!document.getElementById('send').disabled", timeout=60000)
        page.wait_for_timeout(1500)                                      # a poll after the reply
        after = json.loads(page.eval_on_selector("#heat", "c => c.dataset.resident"))
        assert sum(len(v) for v in after.values()) > 0 and after != before
        # a long reply, stopped: the server cancels it
        page.fill("#max_tokens", "3000")
        page.fill("#prompt", "Write a long story.")
        page.click("#send")
        page.wait_for_function("document.querySelectorAll('.msg.assistant')[1].textContent.length > 5", timeout=60000)
        assert running(server) == 1
        page.click("#stop")
        deadline = time.monotonic() + 15
        while running(server) != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert running(server) == 0
        assert page.text_content("#status") == "stopped"
        browser.close()
    assert all(u.startswith(server) for u in requests), [u for u in requests if not u.startswith(server)]
    assert 0 < sizes[server + "/"] < 300_000                            # the page is all there is to load
