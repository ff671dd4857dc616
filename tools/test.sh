#!/usr/bin/env bash
# The test suite (run tools/setup.sh once first).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
if [ $# -gt 0 ]; then               # given tests or options: run them, slow or not
    exec python -m pytest -q -m "slow or not slow" "$@"
fi
python -m pytest -q                 # the default run (pyproject: not slow)
python -m pytest -q -m slow         # and the slow rest
