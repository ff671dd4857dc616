#!/usr/bin/env bash
# One command for a fresh machine: create .venv, install torch (the CPU build unless this machine has an NVIDIA
# GPU) and moespec with the test extras and llama.cpp (llama-cpp-python compiles it for this CPU: a few minutes
# the first time; the tests compare against it), then generate from the bundled reference model. An installed
# torch is kept (GPU users: install the torch build for your CUDA first).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${MOESPEC_TORCH:-torch==2.13.0}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q "$TORCH"
  else
    # PyPI's default torch wheel for Linux is the CUDA build (several GB); PyTorch's CPU index has the CPU build.
    # Where that index cannot be reached (offline mirrors), the package index's own wheel is used instead.
    python -m pip install -q --timeout 20 --retries 1 --index-url https://download.pytorch.org/whl/cpu "$TORCH" \
      >/dev/null 2>&1 || python -m pip install -q "$TORCH"
  fi
fi
python -m pip install -q -e ".[test,llamacpp]"
python tools/make_gguf.py --fetch-only >/dev/null     # llama.cpp's GGUF converter (its source distribution), once
if [ "${1:-}" != "--no-run" ]; then
  moespec generate --prompt "def fibonacci(n):" --max-new-tokens 64 --temperature 0
fi
