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

step "Debian packages the build needs (cmake and libcurl headers for librdkafka)"
missing=()
for pkg in cmake libcurl4-openssl-dev pkg-config; do
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

step "Python SDKs for the conformance tests (openai, anthropic, pytest)"
if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$CACHE"
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt

step "rustfmt"
cargo fmt --all -- --check

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build (debug binaries used by the end-to-end tests)"
cargo build --workspace --bins --locked

step "cargo test"
cargo test --workspace --locked

step "Python SDK conformance tests"
"$VENV/bin/python" -m pytest -q tests/python
