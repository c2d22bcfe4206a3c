#!/usr/bin/env bash
# Chaos benchmark: one alias over three deployments, each its own mock upstream process:
#   healthy   answers normally
#   flaky     fails FAIL_RATIO of its requests (HTTP FAIL_STATUS before any byte)
#   slow      waits SLOW_MS before every answer
#   dead      (UNREACHABLE=1 only) a loopback port nobody listens on: connections refused
# The alias lists them as dead, flaky, healthy, slow (an `ordered` alias meets the failing ones
# first).
# The same streaming load runs through the gateway in each routing mode, on a fresh
# gateway process (no state carried over):
#   off             weighted random, one attempt per request, breakers off
#   retries         weighted random with the default retries, fallbacks and breakers
#   lowest_latency  the same, with the lowest-latency strategy
#   hedged          lowest_latency, every request high priority (hedged after HEDGE_MS)
#   ordered         the default retries, fallbacks and breakers, strategy = "ordered"
# and prints a markdown table: client-visible success rate and time to first token.
#
# Usage: scripts/bench-chaos.sh            (from anywhere)
# Environment (defaults in brackets):
#   REQUESTS [3000]   measured requests per mode
#   CONCURRENCY [16]  concurrent client connections
#   WARMUP [100]      unmeasured requests first (they also train the latency estimates)
#   FAIL_RATIO [0.3]  share of the flaky deployment's requests that fail
#   FAIL_STATUS [503] their status
#   SLOW_MS [300]     the slow deployment's delay before answering
#   HEDGE_MS [50]     hedge delay of the hedged mode
#   CHUNKS [20]       SSE chunks per response
#   UNREACHABLE [0]   1: add the `dead` deployment
#   ONLY              the alias's deployments, in order, from: dead flaky healthy slow
#                     (default: flaky healthy slow, with dead first if UNREACHABLE=1)
#   MODES [off retries lowest_latency hedged ordered]   which modes to run
#   BUILD [1]         0: use already built release binaries
#   KEEP_TMP [0]      1: keep the temporary directory (configs, logs, JSON results)
#   MOCK_BIN, GATEWAY_BIN, LOAD_BIN   override the binaries' paths
set -euo pipefail
cd "$(dirname "$0")/.."

REQUESTS=${REQUESTS:-3000}
CONCURRENCY=${CONCURRENCY:-16}
WARMUP=${WARMUP:-100}
FAIL_RATIO=${FAIL_RATIO:-0.3}
FAIL_STATUS=${FAIL_STATUS:-503}
SLOW_MS=${SLOW_MS:-300}
HEDGE_MS=${HEDGE_MS:-50}
CHUNKS=${CHUNKS:-20}
UNREACHABLE=${UNREACHABLE:-0}
read -r -a MODES <<<"${MODES:-off retries lowest_latency hedged ordered}"
BUILD=${BUILD:-1}
KEEP_TMP=${KEEP_TMP:-0}
export RUST_LOG=${RUST_LOG:-warn}

RELEASE_DIR="${CARGO_TARGET_DIR:-target}/release"
MOCK_BIN=${MOCK_BIN:-$RELEASE_DIR/tollgate-mock-upstream}
GATEWAY_BIN=${GATEWAY_BIN:-$RELEASE_DIR/tollgate}
LOAD_BIN=${LOAD_BIN:-$RELEASE_DIR/tollgate-load}

log() { echo "chaos: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

TMP=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-chaos.XXXXXX")
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ $KEEP_TMP == 1 ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ $BUILD == 1 ]]; then
    cargo build --release --locked -p tollgate-tests --bins -p tollgate-gateway >&2
fi
for bin in "$MOCK_BIN" "$LOAD_BIN" "$GATEWAY_BIN"; do
    [[ -x $bin ]] || die "$bin not found (build it or set BUILD=1)"
done

# shellcheck source=scripts/lib/bench-common.sh
source scripts/lib/bench-common.sh

# ---------------------------------------------------------------------------- upstreams
# start_mock NAME ARGS...: starts a mock upstream; its port is left in MOCK_PORT.
start_mock() {
    local name=$1 pid
    shift
    MOCK_PORT=$(free_port)
    "$MOCK_BIN" --listen "127.0.0.1:$MOCK_PORT" --chunks "$CHUNKS" "$@" >"$TMP/mock-$name.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_for "mock $name" "$pid" "$TMP/mock-$name.log" grep -q "listening on" "$TMP/mock-$name.log"
}
start_mock healthy
PORT_HEALTHY=$MOCK_PORT
start_mock flaky --fail-ratio "$FAIL_RATIO" --fail-kind status --fail-status "$FAIL_STATUS"
PORT_FLAKY=$MOCK_PORT
start_mock slow --latency-ms "$SLOW_MS"
PORT_SLOW=$MOCK_PORT
log "upstreams: healthy :$PORT_HEALTHY, flaky :$PORT_FLAKY ($FAIL_RATIO × $FAIL_STATUS), slow :$PORT_SLOW (${SLOW_MS} ms)"
# Nobody listens on the dead port: every connection is refused. It is below free_port's range,
# so no gateway started later is given it.
PORT_DEAD=""
for ((i = 0; i < 100; i++)); do
    p=$((10000 + RANDOM % 10000))
    if ! port_in_use "$p"; then
        PORT_DEAD=$p
        break
    fi
done
[[ -n $PORT_DEAD ]] || die "no unused port for the dead deployment"
declare -A PORT_OF=([dead]=$PORT_DEAD [flaky]=$PORT_FLAKY [healthy]=$PORT_HEALTHY [slow]=$PORT_SLOW)
declare -A ABOUT=([dead]="dead (connection refused)" [flaky]="flaky ($FAIL_RATIO of requests answer $FAIL_STATUS)"
    [healthy]="healthy" [slow]="slow (${SLOW_MS} ms before every answer)")
if [[ $UNREACHABLE == 1 ]]; then ONLY=${ONLY:-dead flaky healthy slow}; else ONLY=${ONLY:-flaky healthy slow}; fi
read -r -a NAMES <<<"$ONLY"
DEPLOYMENTS=()
for n in "${NAMES[@]}"; do
    [[ -n ${PORT_OF[$n]:-} ]] || die "unknown deployment $n in ONLY"
    DEPLOYMENTS+=("$n:${PORT_OF[$n]}")
done
log "alias: ${NAMES[*]} (dead :$PORT_DEAD)"
ALIAS_LIST=$(printf '"%s", ' "${DEPLOYMENTS[@]%%:*}")
ALIAS_LIST=${ALIAS_LIST%, }
export CHAOS_UPSTREAM_KEY=x

# ---------------------------------------------------------------------------- modes
routing_for() {
    case $1 in
    off) printf '[routing]\nstrategy = "weighted_random"\n[routing.retry]\nmax_retries = 0\nmax_attempts = 1\n[routing.breaker]\nenabled = false\n' ;;
    retries) printf '[routing]\nstrategy = "weighted_random"\n' ;;
    lowest_latency) printf '[routing]\nstrategy = "lowest_latency"\n' ;;
    hedged) printf '[routing]\nstrategy = "lowest_latency"\n[routing.hedge]\ndelay_ms = %s\n' "$HEDGE_MS" ;;
    ordered) printf '[routing]\nstrategy = "ordered"\n' ;;
    *) die "unknown mode $1" ;;
    esac
}

for mode in "${MODES[@]}"; do
    dir="$TMP/$mode"
    mkdir -p "$dir/data"
    {
        for d in "${DEPLOYMENTS[@]}"; do
            printf '[[deployments]]\ntype = "openai"\nname = "%s"\nmodel = "gpt"\nbase_url = "http://127.0.0.1:%s/v1"\napi_key_env = "CHAOS_UPSTREAM_KEY"\n\n' "${d%%:*}" "${d#*:}"
        done
        printf '[[models]]\nname = "chaos"\ndeployments = [%s]\n\n[events]\ntype = "log"\n\n' "$ALIAS_LIST"
        routing_for "$mode"
    } >"$dir/gateway.toml"
    key=$(default_tenant_key "$dir/data")
    port=$(free_port)
    serve_gateway "gateway ($mode)" "$dir/gateway.toml" "$dir/data" "$port" "$dir/gateway.log"
    gw=$SERVED_PID
    log "$mode: $REQUESTS requests at concurrency $CONCURRENCY"
    extra=()
    if [[ $mode == hedged ]]; then extra=(-H "x-tollgate-priority: high"); fi
    "$LOAD_BIN" "${extra[@]}" --url "http://127.0.0.1:$port/v1/chat/completions" --api-key "$key" --model chaos \
        --concurrency "$CONCURRENCY" --requests "$REQUESTS" --warmup "$WARMUP" --duration-s 300 \
        --json >"$dir/result.json" 2>"$dir/load.err" || true
    kill "$gw" 2>/dev/null || true
    wait "$gw" 2>/dev/null || true
done

# ---------------------------------------------------------------------------- report
echo
echo "## Chaos benchmark"
echo
ABOUT_LIST=$(for n in "${NAMES[@]}"; do printf '%s; ' "${ABOUT[$n]}"; done)
echo "${#DEPLOYMENTS[@]} deployments behind one alias, in this order: ${ABOUT_LIST%; }." \
    "$REQUESTS streamed requests per mode at concurrency" \
    "$CONCURRENCY, $CHUNKS chunks each; TTFT of successful requests, in ms."
echo
echo "| routing | ok | errors | success rate | TTFT p50 | TTFT p90 | TTFT p99 |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for mode in "${MODES[@]}"; do
    f="$TMP/$mode/result.json"
    ok=$(json_num "$f" requests_ok)
    errors=$(json_num "$f" errors)
    [[ -n $ok ]] || die "$mode: no result ($(cat "$TMP/$mode/load.err"))"
    printf '| %s | %s | %s | %s %% | %s | %s | %s |\n' "$mode" "$ok" "$errors" \
        "$(calc "%.2f" "100 * $ok / ($ok + $errors)")" \
        "$(calc "%.1f" "$(json_num "$f" ttft_us.p50) / 1000")" \
        "$(calc "%.1f" "$(json_num "$f" ttft_us.p90) / 1000")" \
        "$(calc "%.1f" "$(json_num "$f" ttft_us.p99) / 1000")"
done
