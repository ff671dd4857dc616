#!/usr/bin/env bash
# The test suite (run tools/setup.sh once first).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
# The web page's test drives the system Chromium (Debian's package) with playwright: install it when this machine can
# (root with apt); without it that test is skipped and says why.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
        apt-get install -y -q chromium >/dev/null 2>&1; } || echo "note: Chromium could not be installed"
fi
if [ $# -gt 0 ]; then               # given tests or options: run them, slow or not
    exec python -m pytest -q -m "slow or not slow" "$@"
fi
python -m pytest -q                 # the default run (pyproject: not slow)
python -m pytest -q -m slow         # and the slow rest
