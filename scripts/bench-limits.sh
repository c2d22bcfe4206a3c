#!/usr/bin/env bash
# Measures the latency that quota and rate-limit checks add per request: the same streaming
# load (concurrency 1, the built-in mock/fast model) through one gateway with two keys — one
# whose tenant has limits (requests/min, tokens/min, concurrency and a spend budget, plus the
# key's own requests/min: five checks reserved and settled per request) and one without any
# (no limiter call at all) — alternating runs so that machine noise hits both. Prints the
# time-to-first-token and total latency percentiles of each run and the difference.
#
# Usage: scripts/bench-limits.sh
# Environment (defaults in brackets):
#   BACKEND [redis]       redis (needs a server: scripts/services.sh up redis) or memory
#   REDIS_URL [redis://127.0.0.1:6379]
#   REQUESTS [3000]       measured requests per run
#   WARMUP [300]          unmeasured requests before each run
#   ROUNDS [3]            limited/unlimited pairs
#   BUILD [1]             0: use already built release binaries
set -euo pipefail
cd "$(dirname "$0")/.."

BACKEND=${BACKEND:-redis}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
REQUESTS=${REQUESTS:-3000}
WARMUP=${WARMUP:-300}
ROUNDS=${ROUNDS:-3}
BUILD=${BUILD:-1}
export RUST_LOG=${RUST_LOG:-warn}
RELEASE_DIR="${CARGO_TARGET_DIR:-target}/release"
GATEWAY_BIN=$RELEASE_DIR/tollgate
LOAD_BIN=$RELEASE_DIR/tollgate-load

log() { echo "bench-limits: $*" >&2; }

if [[ $BUILD == 1 ]]; then
    cargo build --release -p tollgate-gateway --bin tollgate -p tollgate-tests --bin tollgate-load >&2
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-bench-limits.XXXXXX")
GW_PID=""
cleanup() {
    [[ -n $GW_PID ]] && kill "$GW_PID" 2>/dev/null && wait "$GW_PID" 2>/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT

DATA=$TMP/data
cli() { "$GATEWAY_BIN" --data-dir "$DATA" "$@"; }
cli tenants create limited >/dev/null
cli tenants create unlimited >/dev/null
# Limits far above what the run uses: every check is made, none refuses.
cli limits tenant limited --rpm 100000000 --tpm 1000000000000 --max-concurrent 1000 --spend 1000000000 >/dev/null
LIMITED_KEY=$(cli keys create --tenant limited --rpm 100000000)
UNLIMITED_KEY=$(cli keys create --tenant unlimited)

PORT=$((20000 + RANDOM % 40000))
export TOLLGATE__LIMITS__BACKEND=$BACKEND TOLLGATE__LIMITS__REDIS_URL=$REDIS_URL
export TOLLGATE__LIMITS__KEY_PREFIX="tollgate-bench-$$:"
# Events to the log (below RUST_LOG=warn): the run measures the limiter, not the event sink.
printf '[events]\ntype = "log"\n' >"$TMP/tollgate.toml"
"$GATEWAY_BIN" --data-dir "$DATA" serve --config "$TMP/tollgate.toml" --listen "127.0.0.1:$PORT" \
    2>"$TMP/gateway.log" &
GW_PID=$!
for _ in $(seq 1 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    sleep 0.1
done

run() { # KEY LABEL
    "$LOAD_BIN" --url "http://127.0.0.1:$PORT/v1/chat/completions" --api-key "$1" \
        --concurrency 1 --requests "$REQUESTS" --warmup "$WARMUP" --json >"$TMP/$2.json"
    python3 - "$TMP/$2.json" "$2" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
t, total = r["ttft_us"], r["total_us"]
print(f"| {sys.argv[2]} | {r['requests_ok']}/{r['requests_sent']} | {t['p50']} | {t['p99']} | {total['p50']} | {total['p99']} |")
EOF
}

echo "backend: $BACKEND, concurrency 1, $REQUESTS requests per run"
echo
echo "| run | requests | TTFT p50 µs | TTFT p99 µs | total p50 µs | total p99 µs |"
echo "|---|---|---|---|---|---|"
for round in $(seq 1 "$ROUNDS"); do
    run "$UNLIMITED_KEY" "no-limits-$round"
    run "$LIMITED_KEY" "limits-$round"
done
if grep -q "limiter unavailable" "$TMP/gateway.log"; then
    log "warning: the limiter fell back to memory during the run (see the gateway log)"
fi
