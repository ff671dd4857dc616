#!/usr/bin/env bash
# One command for a fresh machine: create .venv, install the CPU build of torch and moespec (with the
# test extras), then generate from the bundled reference model. GPU users: install the torch build for
# your CUDA first; this script keeps an installed torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
if [ "${1:-}" != "--no-run" ]; then
  moespec generate --prompt "def fibonacci(n):" --max-new-tokens 64 --temperature 0
fi
