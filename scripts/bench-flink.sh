#!/usr/bin/env bash
# Throughput of the Flink SQL job (flink-jobs/) next to the timely pipeline on the same events:
# one Kafka backlog of BACKLOG completions, priced against the same price book, aggregated by
# each engine into its own tables of one fresh PostgreSQL database.
#   timely: tollgate-pipeline (release, PIPELINE_WORKERS workers) from process start until
#           `sum(requests)` of usage_periods equals BACKLOG;
#   Flink:  flink-jobs/run --bounded (local mini-cluster, FLINK_PARALLELISM) from process start
#           until it exits (the whole backlog read, priced, aggregated and upserted). Flink's
#           JVM and job start-up is measured apart: the time until its first row is in
#           flink_usage_periods, and the rate after it.
# Both results are checked to agree (same requests and cost per tenant × period) before the
# numbers are printed.
#
# Usage: scripts/bench-flink.sh        (from anywhere; needs what flink-jobs/run needs)
# Environment (defaults in brackets):
#   BACKLOG [200000]          events produced
#   PARTITIONS [3]            partitions of the topic
#   TENANTS [50] MODELS [10]  spread of the events (the models all have list prices)
#   PIPELINE_WORKERS [2]      tollgate-pipeline --workers
#   FLINK_PARALLELISM [2]     flink-jobs/run --parallelism
#   BUILD [1]                 0: use already built release binaries
#   KEEP_TMP [0]              1: keep the temporary directory (logs)
# Binaries are taken from ${CARGO_TARGET_DIR:-target}/release.
set -euo pipefail
cd "$(dirname "$0")/.."

BACKLOG=${BACKLOG:-200000}
PARTITIONS=${PARTITIONS:-3}
TENANTS=${TENANTS:-50}
MODELS=${MODELS:-10}
PIPELINE_WORKERS=${PIPELINE_WORKERS:-2}
FLINK_PARALLELISM=${FLINK_PARALLELISM:-2}
BUILD=${BUILD:-1}
KEEP_TMP=${KEEP_TMP:-0}
export RUST_LOG=${RUST_LOG:-warn}

RELEASE_DIR="${CARGO_TARGET_DIR:-target}/release"
PIPELINE_BIN=$RELEASE_DIR/tollgate-pipeline
LOAD_BIN=$RELEASE_DIR/tollgate-billing-load
TOLLGATE_BIN=$RELEASE_DIR/tollgate

log() { echo "bench: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

TMP=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-bench-flink.XXXXXX")
RUN_ID="$$_$(date +%s)"
PIDS=()
DB=
TOPIC=
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    [[ -z $DB ]] || psql "$DATABASE_URL" -q -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" \
        >/dev/null 2>&1 || log "could not drop database $DB"
    [[ -z $TOPIC ]] || "$LOAD_BIN" delete-topic --topic "$TOPIC" --bootstrap "$KAFKA_BOOTSTRAP" \
        >/dev/null 2>&1 || log "could not delete topic $TOPIC"
    if [[ $KEEP_TMP == 1 ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ $BUILD == 1 ]]; then
    cargo build --release -p tollgate-pipeline -p tollgate-tests -p tollgate-gateway --bins >&2
fi
for bin in "$PIPELINE_BIN" "$LOAD_BIN" "$TOLLGATE_BIN"; do
    [[ -x $bin ]] || die "$bin not found (build it or set BUILD=1)"
done
flink-jobs/run setup

eval "$(scripts/services.sh up postgres kafka)"
[[ -n ${DATABASE_URL:-} && -n ${KAFKA_BOOTSTRAP:-} ]] ||
    die "scripts/services.sh printed no DATABASE_URL or KAFKA_BOOTSTRAP"
DB="tollgate_bench_flink_$RUN_ID"
psql "$DATABASE_URL" -q -v ON_ERROR_STOP=1 -c "CREATE DATABASE $DB" >/dev/null
URL="${DATABASE_URL%/*}/$DB"

now_s() { date +%s.%N; }
calc() { awk "BEGIN { printf \"$1\", $2 }"; }
requests() { psql "$URL" -Atq -c "SELECT coalesce(sum(requests), 0) FROM $1" 2>/dev/null || echo 0; }

# The price book: a list price per model (the CLI migrates the database first).
for ((k = 0; k < MODELS; k++)); do
    "$TOLLGATE_BIN" --database-url "$URL" prices set --model "model-$k" \
        --input "$(calc "%.6f" "0.15 * ($k + 1)")" --cached-input "$(calc "%.6f" "0.075 * ($k + 1)")" \
        --output "$(calc "%.6f" "0.6 * ($k + 1)")" --effective-from 2000-01-01T00:00:00Z >/dev/null
done

TOPIC="tollgate-bench.completions.flink_$RUN_ID"
log "producing a backlog of $BACKLOG events to $TOPIC"
"$LOAD_BIN" backlog --events "$BACKLOG" --topic "$TOPIC" --bootstrap "$KAFKA_BOOTSTRAP" \
    --partitions "$PARTITIONS" --tenants "$TENANTS" --models "$MODELS" | tee "$TMP/backlog.txt" >&2

# ---------------------------------------------------------------------------- timely
log "tollgate-pipeline --workers $PIPELINE_WORKERS"
T0=$(now_s)
"$PIPELINE_BIN" --no-recovery --kafka-bootstrap "$KAFKA_BOOTSTRAP" --topic "$TOPIC" \
    --database-url "$URL" --workers "$PIPELINE_WORKERS" --exit-when-idle-ms 3000 \
    </dev/null >"$TMP/pipeline.log" 2>&1 &
PIPELINE_PID=$!
PIDS+=("$PIPELINE_PID")
while [[ $(requests usage_periods) != "$BACKLOG" ]]; do
    kill -0 "$PIPELINE_PID" 2>/dev/null || {
        tail -n 30 "$TMP/pipeline.log" >&2
        die "the pipeline exited early"
    }
    sleep 0.1
done
T1=$(now_s)
wait "$PIPELINE_PID" || true
TIMELY_S=$(calc "%.2f" "$T1 - $T0")
TIMELY_RATE=$(calc "%.0f" "$BACKLOG / ($T1 - $T0)")

# ---------------------------------------------------------------------------- Flink
log "flink-jobs/run --bounded --parallelism $FLINK_PARALLELISM"
T0=$(now_s)
setsid flink-jobs/run --kafka-bootstrap "$KAFKA_BOOTSTRAP" --topic "$TOPIC" --database-url "$URL" \
    --group-id "bench-$RUN_ID" --checkpoint-dir "$TMP/checkpoints" \
    --parallelism "$FLINK_PARALLELISM" --bounded </dev/null >"$TMP/flink.log" 2>&1 &
FLINK_PID=$!
PIDS+=("$FLINK_PID")
T_FIRST=
while kill -0 "$FLINK_PID" 2>/dev/null; do
    if [[ -z $T_FIRST && $(requests flink_usage_periods) != 0 ]]; then
        T_FIRST=$(now_s)
    fi
    sleep 0.1
done
T1=$(now_s)
wait "$FLINK_PID" || { tail -n 40 "$TMP/flink.log" >&2; die "flink-jobs/run failed"; }
T_FIRST=${T_FIRST:-$T1}
[[ $(requests flink_usage_periods) == "$BACKLOG" ]] ||
    die "Flink counted $(requests flink_usage_periods) of $BACKLOG events"
FLINK_S=$(calc "%.2f" "$T1 - $T0")
FLINK_RATE=$(calc "%.0f" "$BACKLOG / ($T1 - $T0)")
FLINK_STARTUP_S=$(calc "%.2f" "$T_FIRST - $T0")
FLINK_AFTER_RATE=$(calc "%.0f" "$BACKLOG / ($T1 - $T_FIRST)")

# Same figures on both sides, or the numbers mean nothing.
DIFF=$(psql "$URL" -Atq -c "
  SELECT count(*) FROM usage_periods l FULL JOIN flink_usage_periods f
    ON l.tenant_id = f.tenant_id AND l.period = f.period AND l.currency = f.currency
  WHERE l.requests IS DISTINCT FROM f.requests OR l.cost IS DISTINCT FROM f.cost")
[[ $DIFF == 0 ]] || die "$DIFF tenant × period rows differ between the ledger and Flink"

echo
echo "## Flink vs timely: $BACKLOG completions from one Kafka backlog ($PARTITIONS partitions, $TENANTS tenants, $MODELS models)"
echo
echo "| engine | wall time (process start → all committed) | events/s |"
echo "|---|---|---|"
echo "| timely pipeline, $PIPELINE_WORKERS workers | $TIMELY_S s | $TIMELY_RATE |"
echo "| Flink SQL, mini-cluster, parallelism $FLINK_PARALLELISM | $FLINK_S s | $FLINK_RATE |"
echo "| Flink after its first row ($FLINK_STARTUP_S s of JVM and job start-up left out) | $(calc "%.2f" "$T1 - $T_FIRST") s | $FLINK_AFTER_RATE |"
echo
echo "Both engines' tenant × period totals agree (requests and exact cost)."
