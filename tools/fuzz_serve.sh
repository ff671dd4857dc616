#!/usr/bin/env bash
# Fuzz `moespec serve` from its own OpenAPI schema (schemathesis: pip install -e '.[fuzz]'): every generated
# request must get an answer that is not a 5xx, and the server must be healthy after.
#   bash tools/fuzz_serve.sh [EXAMPLES_PER_OPERATION]      (default 1200: about 2,900 requests, ~4 min here)
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
port=${PORT:-8765}
moespec serve --port "$port" --max-model-len 64 --request-timeout 10 --log-level warning &
server=$!
trap 'kill $server 2>/dev/null' EXIT
for _ in $(seq 60); do curl -sf "localhost:$port/health" > /dev/null && break; sleep 1; done
st run "http://127.0.0.1:$port/openapi.json" -n "${1:-1200}" -c not_a_server_error --phases coverage,fuzzing \
    --report ndjson --report-ndjson-path "${REPORT:-fuzz.ndjson}"
curl -sf "localhost:$port/health"
echo
