#!/usr/bin/env bash
# Measures the billing pipeline three ways and prints a short summary:
#   1. the dataflow alone, over records in memory (cargo bench -p tollgate-pipeline --bench
#      dataflow): events/s on 1 and 2 worker threads, without a ledger and with the SQLite one;
#   2. end to end from a Kafka backlog to the committed PostgreSQL ledger: BACKLOG events are
#      produced to a fresh topic first, then tollgate-pipeline starts against a fresh database,
#      and the time from its start until `SELECT sum(requests) FROM usage_periods` equals
#      BACKLOG (polled every 100 ms) gives events/s (start-up and migrations included);
#   3. balance freshness at a steady rate: a fresh topic and database, the pipeline running with
#      Redis balances, and `tollgate-billing-load steady` producing RATE events/s for SECONDS
#      while it watches a probe tenant's Redis balance (freshness = balance updated − event
#      time, including the producer's 20 ms linger, as in the gateway).
#
# Usage: scripts/bench-pipeline.sh            (from anywhere)
# Needs PostgreSQL, Redis and Kafka: started through `scripts/services.sh up postgres redis
# kafka` (which reuses servers already running), and psql.
# Environment (defaults in brackets):
#   EVENTS [1000000]          records of the dataflow bench
#   BENCH_WORKERS [1,2]       worker counts of the dataflow bench (its WORKERS)
#   ROUNDS [3]                runs per case of the dataflow bench (median reported)
#   LEDGER [discard,sqlite]   the dataflow bench's variants
#   BACKLOG [300000]          events of the end-to-end backlog
#   PIPELINE_WORKERS [2]      tollgate-pipeline --workers for the end-to-end runs
#   EPOCH_MS [200]            tollgate-pipeline --epoch-ms for the end-to-end runs
#   RATE [5000]               events/s of the steady run
#   SECONDS_STEADY [30]       duration of the steady run
#   PARTITIONS [6]            partitions of the topics created
#   DATAFLOW [1]              0: skip the dataflow bench
#   BUILD [1]                 0: use already built release binaries
#   RUST_LOG [warn]           log level of the pipeline
#   KEEP_TMP [0]              1: keep the temporary directory (logs, outputs)
# Binaries are taken from ${CARGO_TARGET_DIR:-target}/release.
set -euo pipefail
cd "$(dirname "$0")/.."

EVENTS=${EVENTS:-1000000}
BENCH_WORKERS=${BENCH_WORKERS:-1,2}
ROUNDS=${ROUNDS:-3}
LEDGER=${LEDGER:-discard,sqlite}
BACKLOG=${BACKLOG:-300000}
PIPELINE_WORKERS=${PIPELINE_WORKERS:-2}
EPOCH_MS=${EPOCH_MS:-200}
RATE=${RATE:-5000}
SECONDS_STEADY=${SECONDS_STEADY:-30}
PARTITIONS=${PARTITIONS:-6}
DATAFLOW=${DATAFLOW:-1}
BUILD=${BUILD:-1}
KEEP_TMP=${KEEP_TMP:-0}
export RUST_LOG=${RUST_LOG:-warn}

RELEASE_DIR="${CARGO_TARGET_DIR:-target}/release"
PIPELINE_BIN=$RELEASE_DIR/tollgate-pipeline
LOAD_BIN=$RELEASE_DIR/tollgate-billing-load

log() { echo "bench: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

command -v psql >/dev/null || die "psql not found"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-bench-pipeline.XXXXXX")
RUN_ID="$$_$(date +%s)"
PIDS=()
DATABASES=()
TOPICS=()
REDIS_PREFIXES=()
DATABASE_URL=${DATABASE_URL:-}
KAFKA_BOOTSTRAP=${KAFKA_BOOTSTRAP:-}
REDIS_URL=${REDIS_URL:-}

cleanup() {
    local pid db topic prefix
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    for db in "${DATABASES[@]}"; do
        psql "$DATABASE_URL" -q -v ON_ERROR_STOP=1 -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" \
            >/dev/null 2>&1 || log "could not drop database $db"
    done
    for topic in "${TOPICS[@]}"; do
        "$LOAD_BIN" delete-topic --topic "$topic" --bootstrap "$KAFKA_BOOTSTRAP" >/dev/null 2>&1 ||
            log "could not delete topic $topic"
    done
    if command -v redis-cli >/dev/null; then
        for prefix in "${REDIS_PREFIXES[@]}"; do
            redis-cli -u "$REDIS_URL" --scan --pattern "$prefix*" 2>/dev/null |
                xargs -r redis-cli -u "$REDIS_URL" del >/dev/null 2>&1 || true
        done
    fi
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
    cargo build --release -p tollgate-pipeline -p tollgate-tests --bins >&2
    if [[ $DATAFLOW == 1 ]]; then
        cargo bench -p tollgate-pipeline --bench dataflow --no-run >&2
    fi
fi
for bin in "$PIPELINE_BIN" "$LOAD_BIN"; do
    [[ -x $bin ]] || die "$bin not found (build it or set BUILD=1)"
done

# ---------------------------------------------------------------------------- 1. dataflow
if [[ $DATAFLOW == 1 ]]; then
    log "dataflow bench: $EVENTS records, workers $BENCH_WORKERS, $ROUNDS rounds, ledger $LEDGER"
    EVENTS=$EVENTS WORKERS=$BENCH_WORKERS ROUNDS=$ROUNDS LEDGER=$LEDGER \
        cargo bench -p tollgate-pipeline --bench dataflow | tee "$TMP/dataflow.txt"
fi

# ---------------------------------------------------------------------------- services
eval "$(scripts/services.sh up postgres redis kafka)"
[[ -n $DATABASE_URL && -n $KAFKA_BOOTSTRAP && -n $REDIS_URL ]] ||
    die "scripts/services.sh printed no DATABASE_URL, KAFKA_BOOTSTRAP or REDIS_URL"

# fresh_database NAME: creates it (dropped on exit); sets FRESH_URL to its URL.
fresh_database() {
    local name=$1
    psql "$DATABASE_URL" -q -v ON_ERROR_STOP=1 -c "CREATE DATABASE $name" >/dev/null ||
        die "cannot create database $name"
    DATABASES+=("$name")
    FRESH_URL="${DATABASE_URL%/*}/$name"
}

# ledger_requests URL: completions in the ledger (0 before the pipeline created its tables).
ledger_requests() {
    psql "$1" -Atq -c "SELECT coalesce(sum(requests), 0) FROM usage_periods" 2>/dev/null || echo 0
}

# start_pipeline LOGFILE ARGS...: starts tollgate-pipeline in the background; sets PIPELINE_PID.
start_pipeline() {
    local logfile=$1
    shift
    "$PIPELINE_BIN" --kafka-bootstrap "$KAFKA_BOOTSTRAP" --workers "$PIPELINE_WORKERS" \
        --epoch-ms "$EPOCH_MS" "$@" </dev/null >"$logfile" 2>&1 &
    PIPELINE_PID=$!
    PIDS+=("$PIPELINE_PID")
}

now_s() { date +%s.%N; }
calc() { awk "BEGIN { printf \"$1\", $2 }"; }

# ---------------------------------------------------------------------------- 2. backlog
TOPIC_E2E="tollgate-bench.completions.e2e_$RUN_ID"
TOPICS+=("$TOPIC_E2E")
fresh_database "tollgate_bench_e2e_$RUN_ID"
DB_E2E=$FRESH_URL
log "producing a backlog of $BACKLOG events to $TOPIC_E2E"
"$LOAD_BIN" backlog --events "$BACKLOG" --topic "$TOPIC_E2E" --bootstrap "$KAFKA_BOOTSTRAP" \
    --partitions "$PARTITIONS" | tee "$TMP/backlog.txt"

log "tollgate-pipeline --workers $PIPELINE_WORKERS over the backlog"
T0=$(now_s)
start_pipeline "$TMP/pipeline-e2e.log" --topic "$TOPIC_E2E" --database-url "$DB_E2E" \
    --exit-when-idle-ms 3000
E2E_PID=$PIPELINE_PID
have=0
while :; do
    have=$(ledger_requests "$DB_E2E")
    if [[ $have == "$BACKLOG" ]]; then
        break
    fi
    if ! kill -0 "$E2E_PID" 2>/dev/null; then
        tail -n 30 "$TMP/pipeline-e2e.log" >&2 || true
        die "the pipeline exited with $have of $BACKLOG events in the ledger"
    fi
    if (($(calc "%d" "$(now_s) - $T0") > 900)); then
        die "the ledger holds $have of $BACKLOG events after 900 s"
    fi
    sleep 0.1
done
T1=$(now_s)
E2E_S=$(calc "%.2f" "$T1 - $T0")
E2E_RATE=$(calc "%.0f" "$BACKLOG / ($T1 - $T0)")
rc=0
wait "$E2E_PID" || rc=$?
((rc == 0)) || {
    tail -n 30 "$TMP/pipeline-e2e.log" >&2 || true
    die "the pipeline exited with status $rc"
}
E2E_LINE="end to end: $BACKLOG events from Kafka to the PostgreSQL ledger in $E2E_S s with $PIPELINE_WORKERS workers: $E2E_RATE events/s (from process start; epoch $EPOCH_MS ms)"
echo "$E2E_LINE"

# ---------------------------------------------------------------------------- 3. steady
TOPIC_STEADY="tollgate-bench.completions.steady_$RUN_ID"
TOPICS+=("$TOPIC_STEADY")
fresh_database "tollgate_bench_steady_$RUN_ID"
DB_STEADY=$FRESH_URL
PREFIX="tollgate_bench_${RUN_ID}:"
REDIS_PREFIXES+=("$PREFIX")
"$LOAD_BIN" backlog --events 0 --topic "$TOPIC_STEADY" --bootstrap "$KAFKA_BOOTSTRAP" \
    --partitions "$PARTITIONS" >&2
start_pipeline "$TMP/pipeline-steady.log" --topic "$TOPIC_STEADY" --database-url "$DB_STEADY" \
    --redis-url "$REDIS_URL" --redis-prefix "$PREFIX"
STEADY_PID=$PIPELINE_PID
# Ready enough once its migrations ran; the load tool's warm-up covers the rest.
for ((i = 0; i < 300; i++)); do
    if psql "$DB_STEADY" -Atq -c "SELECT 1 FROM pipeline_commits LIMIT 1" >/dev/null 2>&1; then
        break
    fi
    kill -0 "$STEADY_PID" 2>/dev/null || {
        tail -n 30 "$TMP/pipeline-steady.log" >&2 || true
        die "the pipeline exited while starting"
    }
    sleep 0.1
done
log "steady: $RATE events/s for $SECONDS_STEADY s, probe tenant watched in Redis"
"$LOAD_BIN" steady --rate "$RATE" --seconds "$SECONDS_STEADY" --topic "$TOPIC_STEADY" \
    --bootstrap "$KAFKA_BOOTSTRAP" --partitions "$PARTITIONS" --redis "$REDIS_URL" \
    --redis-prefix "$PREFIX" | tee "$TMP/steady.txt"
kill -0 "$STEADY_PID" 2>/dev/null || {
    tail -n 30 "$TMP/pipeline-steady.log" >&2 || true
    die "the pipeline exited during the steady run"
}
kill "$STEADY_PID" 2>/dev/null || true
wait "$STEADY_PID" 2>/dev/null || true
STEADY_LEDGER=$(ledger_requests "$DB_STEADY")

# ---------------------------------------------------------------------------- summary
echo
echo "## Pipeline benchmark"
echo
echo "$(nproc 2>/dev/null || echo '?') cores; Kafka, PostgreSQL and Redis on loopback on the same machine."
if [[ -s $TMP/dataflow.txt ]]; then
    echo
    echo "Dataflow alone ($EVENTS in-memory records, JSON parsing included):"
    echo
    grep '^|' "$TMP/dataflow.txt"
fi
echo
grep '^backlog:' "$TMP/backlog.txt" || true
echo "$E2E_LINE"
grep -E '^(steady|freshness):' "$TMP/steady.txt" || true
echo "steady ledger: $STEADY_LEDGER completions committed (probes included)"
