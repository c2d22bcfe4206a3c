#!/usr/bin/env bash
# Measures what the gateway adds on top of its upstream: the same streaming load is sent to the
# mock upstream directly and through the gateway, at concurrency 1 and at high concurrency,
# alternating direct/gateway runs so that machine noise hits both. Prints markdown tables:
# per-run throughput and latency, the gateway's added TTFT/total latency, the throughput ratio,
# the gateway's CPU time per request (from /proc/PID/stat, so Linux only) and its memory idle
# and after the runs (/proc/PID/status).
#
# Usage: scripts/bench-gateway.sh            (from anywhere)
# Environment (defaults in brackets):
#   REQUESTS_C1 [2000]       measured requests at concurrency 1
#   REQUESTS_C128 [20000]    measured requests at high concurrency
#   CONCURRENCY_HIGH [128]   the high concurrency
#   DURATION_S [20]          upper bound on each run's measured window
#   WARMUP [200]             unmeasured requests before each run
#   CHUNKS [20]              SSE chunks per mock response
#   CHUNK_DELAY_MS [0]       delay between mock chunks
#   ROUNDS [1]               direct/gateway pairs per concurrency
#   LOAD_THREADS [1]         runtime threads of the load generator
#   GATEWAY [1]              0: benchmark the mock upstream only (no gateway build or runs)
#   FLOOR [1]                1: also run the load through tollgate-tcp-relay, a byte-for-byte
#                            TCP relay that does no work: what one more hop alone adds here
#   BUSY_POLL_US [100]       also run a second gateway with server.busy_poll_us set to this
#                            (scenario gateway-busy-poll); 0: only the default gateway
#   CACHE [0]                1: also run a gateway with the exact response cache on (scenario
#                            gateway-cache): the load repeats one request, so every request
#                            after the first is a cache hit and its rows are the hit path's
#                            latency end to end (compare with direct and gateway)
#   BUILD [1]                0: use already built release binaries
#   RUST_LOG [warn]          log level of the mock and the gateway (logging costs CPU too)
#   MOCK_BIN, GATEWAY_BIN, LOAD_BIN, RELAY_BIN   override the binaries' paths
#   KEEP_TMP [0]             1: keep the temporary directory (config, logs, JSON results)
#   EVENTS [log]             the gateway's event sink: log (events off: one log line per
#                            completion, below RUST_LOG=warn), local (the embedded SQLite event
#                            log) or kafka (needs a broker: scripts/services.sh up kafka)
#   KAFKA_BOOTSTRAP [127.0.0.1:9092]   the broker for EVENTS=kafka
#   DURABILITY_AB [0]        1 (EVENTS=local or kafka): also run a gateway with
#                            events.durability = "none" (scenario gateway-no-barrier) and
#                            report what the durability barrier costs; both gateways then run
#                            without the embedded billing pipeline, each with its own event log
set -euo pipefail
cd "$(dirname "$0")/.."

REQUESTS_C1=${REQUESTS_C1:-2000}
REQUESTS_C128=${REQUESTS_C128:-20000}
CONCURRENCY_HIGH=${CONCURRENCY_HIGH:-128}
DURATION_S=${DURATION_S:-20}
WARMUP=${WARMUP:-200}
CHUNKS=${CHUNKS:-20}
CHUNK_DELAY_MS=${CHUNK_DELAY_MS:-0}
ROUNDS=${ROUNDS:-1}
LOAD_THREADS=${LOAD_THREADS:-1}
GATEWAY=${GATEWAY:-1}
FLOOR=${FLOOR:-1}
BUILD=${BUILD:-1}
BUSY_POLL_US=${BUSY_POLL_US:-100}
KEEP_TMP=${KEEP_TMP:-0}
EVENTS=${EVENTS:-log}
KAFKA_BOOTSTRAP=${KAFKA_BOOTSTRAP:-127.0.0.1:9092}
DURABILITY_AB=${DURABILITY_AB:-0}
CACHE=${CACHE:-0}
case $EVENTS in
log | local | kafka) ;;
*)
    echo "bench: EVENTS must be log, local or kafka (got '$EVENTS')" >&2
    exit 2
    ;;
esac
export RUST_LOG=${RUST_LOG:-warn}

RELEASE_DIR="${CARGO_TARGET_DIR:-target}/release"
MOCK_BIN=${MOCK_BIN:-$RELEASE_DIR/tollgate-mock-upstream}
GATEWAY_BIN=${GATEWAY_BIN:-$RELEASE_DIR/tollgate}
LOAD_BIN=${LOAD_BIN:-$RELEASE_DIR/tollgate-load}
RELAY_BIN=${RELAY_BIN:-$RELEASE_DIR/tollgate-tcp-relay}

log() { echo "bench: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

TMP=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-bench.XXXXXX")
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ $KEEP_TMP == 1 ]]; then
        log "kept $TMP"
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------- build
if [[ $BUILD == 1 ]]; then
    if [[ $GATEWAY == 1 ]]; then
        cargo build --release -p tollgate-tests --bins -p tollgate-gateway >&2
    else
        cargo build --release -p tollgate-tests --bins >&2
    fi
fi
for bin in "$MOCK_BIN" "$LOAD_BIN" $([[ $FLOOR == 1 ]] && echo "$RELAY_BIN"); do
    [[ -x $bin ]] || die "$bin not found (build it or set BUILD=1)"
done
if [[ $GATEWAY == 1 ]]; then
    [[ -x $GATEWAY_BIN ]] || die "$GATEWAY_BIN not found (build it or set BUILD=1)"
fi

# ---------------------------------------------------------------------------- helpers
# shellcheck source=scripts/lib/bench-common.sh
source scripts/lib/bench-common.sh

# user+system CPU time of PID so far, in clock ticks (fields 14 and 15 of /proc/PID/stat,
# counted after the parenthesised command name, which may contain spaces).
cpu_ticks() {
    local stat
    stat=$(cat "/proc/$1/stat")
    stat=${stat##*) }
    # shellcheck disable=SC2086
    set -- $stat
    echo $((${12} + ${13}))
}
CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)

# FORMAT FILE KEY: a report number formatted, or "-" if the report has none (e.g. null).
fmt_num() {
    local v
    v=$(json_num "$2" "$3")
    if [[ -n $v ]]; then calc "$1" "$v"; else echo "-"; fi
}

# ---------------------------------------------------------------------------- mock upstream
PORT_A=$(free_port)
"$MOCK_BIN" --listen "127.0.0.1:$PORT_A" --chunks "$CHUNKS" --chunk-delay-ms "$CHUNK_DELAY_MS" \
    >"$TMP/mock.log" 2>&1 &
MOCK_PID=$!
PIDS+=("$MOCK_PID")
wait_for "mock upstream" "$MOCK_PID" "$TMP/mock.log" grep -q "listening on" "$TMP/mock.log"
log "mock upstream on 127.0.0.1:$PORT_A (pid $MOCK_PID)"

# ---------------------------------------------------------------------------- floor relay
if [[ $FLOOR == 1 ]]; then
    PORT_R=$(free_port)
    while [[ $PORT_R == "$PORT_A" ]]; do PORT_R=$(free_port); done
    "$RELAY_BIN" --listen "127.0.0.1:$PORT_R" --upstream "127.0.0.1:$PORT_A" >"$TMP/relay.log" 2>&1 &
    RELAY_PID=$!
    PIDS+=("$RELAY_PID")
    wait_for "tcp relay" "$RELAY_PID" "$TMP/relay.log" grep -q "listening on" "$TMP/relay.log"
    log "tcp relay on 127.0.0.1:$PORT_R (pid $RELAY_PID)"
fi

# ---------------------------------------------------------------------------- gateway
if [[ $GATEWAY == 1 ]]; then
    DATA_DIR="$TMP/data"
    mkdir -p "$DATA_DIR"
    CONFIG="$TMP/gateway.toml"
    if [[ $DURABILITY_AB == 1 ]]; then
        [[ $EVENTS != log ]] || die "DURABILITY_AB=1 needs EVENTS=local or kafka"
        # The barrier's cost alone: no in-process billing pipeline in either gateway.
        printf '[billing]\npipeline = "off"\n\n' >"$CONFIG"
    else
        : >"$CONFIG"
    fi
    cat >>"$CONFIG" <<EOF
[[deployments]]
name = "bench-openai"
type = "openai"
base_url = "http://127.0.0.1:$PORT_A/v1"
api_key_env = "BENCH_UPSTREAM_KEY"
model = "bench"

[[models]]
name = "bench"
deployments = ["bench-openai"]

[events]
type = "$EVENTS"
EOF
    if [[ $EVENTS == kafka ]]; then
        # The bench's events go to their own topics, not to the real ones.
        cat >>"$CONFIG" <<EOF
bootstrap_servers = "$KAFKA_BOOTSTRAP"
requests_topic = "tollgate-bench.requests"
chunks_topic = "tollgate-bench.chunks"
completions_topic = "tollgate-bench.completions"
EOF
    fi
    export BENCH_UPSTREAM_KEY=x

    API_KEY=$(default_tenant_key "$DATA_DIR")

    # start_gateway SCENARIO CONFIG: a gateway process for SCENARIO; its port and pid are
    # recorded in GW_PORT and GW_PID.
    declare -A GW_PORT GW_PID
    start_gateway() {
        local scenario=$1 config=$2 port pid
        port=$(free_port)
        while [[ $port == "$PORT_A" || $port == "${PORT_R:-}" || " ${GW_PORT[*]} " == *" $port "* ]]; do
            port=$(free_port)
        done
        serve_gateway "$scenario" "$config" "$DATA_DIR" "$port" "$TMP/$scenario.log"
        pid=$SERVED_PID
        GW_PORT[$scenario]=$port
        GW_PID[$scenario]=$pid
        log "$scenario on 127.0.0.1:$port (pid $pid)"
    }
    start_gateway gateway "$CONFIG"
    if ((BUSY_POLL_US > 0)); then
        # The same configuration with busy polling on (the [server] table goes first: the
        # file's other tables end with [events] or its Kafka keys).
        { printf '[server]\nbusy_poll_us = %s\n\n' "$BUSY_POLL_US"; cat "$CONFIG"; } >"$TMP/gateway-busy-poll.toml"
        start_gateway gateway-busy-poll "$TMP/gateway-busy-poll.toml"
    fi
    if [[ $CACHE == 1 ]]; then
        # The same configuration with the response cache on (its table goes first, like the
        # busy-poll one's).
        { printf '[cache]\nenabled = true\n\n'; cat "$CONFIG"; } >"$TMP/gateway-cache.toml"
        start_gateway gateway-cache "$TMP/gateway-cache.toml"
    fi
    if [[ $DURABILITY_AB == 1 ]]; then
        # The same configuration without the barrier (the file ends in its [events] table),
        # writing its own event log.
        { cat "$CONFIG"; echo 'durability = "none"'; } >"$TMP/gateway-no-barrier.toml"
        if [[ $EVENTS == local ]]; then
            echo "path = \"$TMP/no-barrier-events.sqlite\"" >>"$TMP/gateway-no-barrier.toml"
        fi
        start_gateway gateway-no-barrier "$TMP/gateway-no-barrier.toml"
    fi
fi

# ---------------------------------------------------------------------------- runs
# run_load SCENARIO CONCURRENCY REQUESTS ROUND: one load run; result JSON in $TMP, CPU deltas
# of the mock and (if running) the gateway beside it.
run_load() {
    local scenario=$1 conc=$2 requests=$3 round=$4 url key
    local out="$TMP/$scenario-c$conc-r$round"
    if [[ $scenario == gateway* ]]; then
        url="http://127.0.0.1:${GW_PORT[$scenario]}/v1/chat/completions"
        key=$API_KEY
    elif [[ $scenario == relay ]]; then
        url="http://127.0.0.1:$PORT_R/v1/chat/completions"
        key=x
    else
        url="http://127.0.0.1:$PORT_A/v1/chat/completions"
        key=x
    fi
    local mock0 gw0=0 rc=0
    mock0=$(cpu_ticks "$MOCK_PID")
    if [[ $scenario == gateway* ]]; then gw0=$(cpu_ticks "${GW_PID[$scenario]}"); fi
    log "$scenario, concurrency $conc, $requests requests (round $round)"
    "$LOAD_BIN" --url "$url" --api-key "$key" --model bench --concurrency "$conc" \
        --requests "$requests" --duration-s "$DURATION_S" --warmup "$WARMUP" \
        --threads "$LOAD_THREADS" --json >"$out.json" 2>"$out.err" || rc=$?
    echo $(($(cpu_ticks "$MOCK_PID") - mock0)) >"$out.mock_ticks"
    if [[ $scenario == gateway* ]]; then
        echo $(($(cpu_ticks "${GW_PID[$scenario]}") - gw0)) >"$out.gw_ticks"
    fi
    if ((rc != 0)); then
        cat "$out.err" "$out.json" >&2 || true
        if [[ $scenario == gateway* ]]; then tail -n 30 "$TMP/$scenario.log" >&2 || true; fi
        die "$scenario run at concurrency $conc failed (exit $rc)"
    fi
}

# mem_kb PID FIELD: a /proc/PID/status field (VmRSS, RssAnon, VmHWM) in kB.
mem_kb() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
declare -A IDLE_RSS IDLE_ANON
if [[ $GATEWAY == 1 ]]; then
    sleep 2 # settled after start, before any request
    for scenario in "${!GW_PID[@]}"; do
        IDLE_RSS[$scenario]=$(mem_kb "${GW_PID[$scenario]}" VmRSS)
        IDLE_ANON[$scenario]=$(mem_kb "${GW_PID[$scenario]}" RssAnon)
    done
fi

SCENARIOS=(direct)
if [[ $FLOOR == 1 ]]; then SCENARIOS+=(relay); fi
if [[ $GATEWAY == 1 ]]; then SCENARIOS+=(gateway); fi
if [[ $GATEWAY == 1 ]] && ((BUSY_POLL_US > 0)); then SCENARIOS+=(gateway-busy-poll); fi
if [[ $GATEWAY == 1 && $DURABILITY_AB == 1 ]]; then SCENARIOS+=(gateway-no-barrier); fi
if [[ $GATEWAY == 1 && $CACHE == 1 ]]; then SCENARIOS+=(gateway-cache); fi
LEVELS=("1:$REQUESTS_C1" "$CONCURRENCY_HIGH:$REQUESTS_C128")
for level in "${LEVELS[@]}"; do
    for ((round = 1; round <= ROUNDS; round++)); do
        for scenario in "${SCENARIOS[@]}"; do
            run_load "$scenario" "${level%%:*}" "${level#*:}" "$round"
        done
    done
done

# ---------------------------------------------------------------------------- report
# CPU µs per request served in the run (warmup included, as the ticks include it).
cpu_per_req() {
    local file=$1 ticks=$2 served
    served=$(($(json_num "$file" warmup) + $(json_num "$file" requests_sent)))
    calc "%.0f" "$ticks * 1000000 / $CLK_TCK / $served"
}

echo
echo "## Gateway benchmark"
echo
echo "$(nproc 2>/dev/null || echo '?') cores; mock upstream: $CHUNKS chunks, ${CHUNK_DELAY_MS} ms apart;" \
    "warmup $WARMUP; load generator threads $LOAD_THREADS; latencies in µs; event sink: $EVENTS;" \
    "gateway-busy-poll: server.busy_poll_us = $BUSY_POLL_US."
echo
echo "| scenario | concurrency | round | ok | errors | rps | TTFT p50 | TTFT p99 | total p50 | total p99 | chunks | gateway CPU µs/req | upstream CPU µs/req | load CPU µs/req |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for level in "${LEVELS[@]}"; do
    conc=${level%%:*}
    for ((round = 1; round <= ROUNDS; round++)); do
        for scenario in "${SCENARIOS[@]}"; do
            f="$TMP/$scenario-c$conc-r$round"
            gw_cpu="-"
            if [[ $scenario == gateway* ]]; then
                gw_cpu=$(cpu_per_req "$f.json" "$(cat "$f.gw_ticks")")
            fi
            printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' \
                "$scenario" "$conc" "$round" \
                "$(json_num "$f.json" requests_ok)" "$(json_num "$f.json" errors)" \
                "$(fmt_num "%.0f" "$f.json" rps)" \
                "$(json_num "$f.json" ttft_us.p50)" "$(json_num "$f.json" ttft_us.p99)" \
                "$(json_num "$f.json" total_us.p50)" "$(json_num "$f.json" total_us.p99)" \
                "$(fmt_num "%.1f" "$f.json" chunks_mean)" \
                "$gw_cpu" "$(cpu_per_req "$f.json" "$(cat "$f.mock_ticks")")" \
                "$(fmt_num "%.0f" "$f.json" load_cpu_us_per_req)"
        done
    done
done

if [[ $GATEWAY == 1 ]]; then
    echo
    echo "Gateway memory (MB; idle: after start, before any request; after: when the runs ended):"
    echo
    echo "| scenario | idle RSS | idle anonymous | RSS after the runs | anonymous after | peak RSS |"
    echo "|---|---:|---:|---:|---:|---:|"
    for scenario in "${SCENARIOS[@]}"; do
        [[ $scenario == gateway* ]] || continue
        pid=${GW_PID[$scenario]}
        printf '| %s | %s | %s | %s | %s | %s |\n' "$scenario" \
            "$(calc "%.1f" "${IDLE_RSS[$scenario]} / 1024")" \
            "$(calc "%.1f" "${IDLE_ANON[$scenario]} / 1024")" \
            "$(calc "%.1f" "$(mem_kb "$pid" VmRSS) / 1024")" \
            "$(calc "%.1f" "$(mem_kb "$pid" RssAnon) / 1024")" \
            "$(calc "%.1f" "$(mem_kb "$pid" VmHWM) / 1024")"
    done
fi

# diff_table HEADER BASE SCENARIO: per level and round, what SCENARIO adds to BASE's run of
# the same round (latencies in µs) and the throughput ratio SCENARIO/BASE, under HEADER (the
# first column's title).
diff_table() {
    local header=$1 base=$2 scenario=$3 conc round d g
    echo
    echo "| $header: concurrency | round | added TTFT p50 | added TTFT p99 | added total p50 | added total p99 | throughput ratio $scenario/$base |"
    echo "|---:|---:|---:|---:|---:|---:|---:|"
    for level in "${LEVELS[@]}"; do
        conc=${level%%:*}
        for ((round = 1; round <= ROUNDS; round++)); do
            d="$TMP/$base-c$conc-r$round.json"
            g="$TMP/$scenario-c$conc-r$round.json"
            diff_of() { echo $(($(json_num "$g" "$1") - $(json_num "$d" "$1"))); }
            printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$conc" "$round" \
                "$(diff_of ttft_us.p50)" "$(diff_of ttft_us.p99)" \
                "$(diff_of total_us.p50)" "$(diff_of total_us.p99)" \
                "$(calc "%.3f" "$(json_num "$g" rps) / $(json_num "$d" rps)")"
        done
    done
}

# What each proxy scenario adds to the direct run of the same round.
for proxy in "${SCENARIOS[@]:1}"; do
    diff_table "$proxy" direct "$proxy"
done

# What the durability barrier costs: the gateway with it against the one without, same round.
if [[ $GATEWAY == 1 && $DURABILITY_AB == 1 ]]; then
    diff_table "barrier cost" gateway-no-barrier gateway
fi
