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
TOLLGATE_BIN_DIR="$TARGET_DIR/debug" "$VENV/bin/python" -m pytest -q tests/python
