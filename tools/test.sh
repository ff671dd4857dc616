#!/usr/bin/env bash
# The test suite (run tools/setup.sh once first).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
python -m pytest -q "$@"
