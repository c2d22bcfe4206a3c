"""Processes and HTTP plumbing for the SDK conformance suite (fixtures: conftest.py).

One session starts two processes built by `cargo build --workspace --bins`:

* `tollgate-mock-upstream`: the protocol-faithful OpenAI + Anthropic mock upstream;
* `tollgate`: the gateway, configured with an OpenAI-format deployment (`oa/*`) and an
  Anthropic-format deployment (`an/*`) that both point at the mock. The suffix of the alias
  is forwarded as the upstream model, which selects the mock's scenario (`oa/tools`,
  `an/cached`, ...).

The binaries are taken from `$TOLLGATE_BIN_DIR`, or `<repo>/target/debug` when unset.

Every HTTP response the SDK clients receive goes through a recording transport, so the
secrets test can check that no body ever carried the upstream credential.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx2
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("TOLLGATE_BIN_DIR") or REPO_ROOT / "target" / "debug")

# The gateway's request body limit in the test config (an oversized body must get 413).
MAX_BODY_BYTES = 65536
# The gateway's first-byte timeout for both upstream deployments (`oa/hang` must get 504).
FIRST_BYTE_TIMEOUT_MS = 2000
# How long any process may take to become ready.
STARTUP_TIMEOUT_S = 30.0
# Per-request timeout of the SDK clients: long enough for the gateway's own 2 s timeout
# to fire first, short enough that a hung request fails the test quickly.
CLIENT_TIMEOUT_S = 15.0

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def _binary(name: str) -> Path:
    path = BIN_DIR / name
    if not path.is_file():
        pytest.fail(
            f"{path} not found: build it with `cargo build --workspace --bins` "
            "(or point TOLLGATE_BIN_DIR at the directory holding it)"
        )
    return path


def _stop(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM (graceful shutdown), then SIGKILL if it does not exit in time."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def _read_line_with_timeout(proc: subprocess.Popen, timeout: float) -> str:
    """The first line of `proc`'s stdout, or a failure after `timeout` seconds."""
    result: list[str] = []

    def reader() -> None:
        assert proc.stdout is not None
        result.append(proc.stdout.readline())

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
        _stop(proc)
        pytest.fail(f"{proc.args[0]} printed nothing within {timeout} s")
    return result[0]


# --------------------------------------------------------------------------------------
# Recording transport: keeps every response body the SDK clients read.
# --------------------------------------------------------------------------------------


class _TeeStream(httpx2.SyncByteStream):
    def __init__(self, inner: httpx2.SyncByteStream, sink: "ResponseLog", url: str):
        self._inner = inner
        self._sink = sink
        self._url = url

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self._sink.add(self._url, chunk)
            yield chunk

    def close(self) -> None:
        self._inner.close()


@dataclass
class ResponseLog:
    """Every response byte received by the SDK clients of this session, per URL."""

    chunks: list[tuple[str, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, url: str, chunk: bytes) -> None:
        with self.lock:
            self.chunks.append((url, chunk))

    def all_bytes(self) -> bytes:
        with self.lock:
            return b"".join(c for _, c in self.chunks)


class RecordingTransport(httpx2.HTTPTransport):
    def __init__(self, log: ResponseLog):
        super().__init__()
        self._log = log

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        response = super().handle_request(request)
        response.stream = _TeeStream(response.stream, self._log, str(request.url))
        return response


# --------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------


@dataclass
class MockUpstream:
    addr: str
    proc: subprocess.Popen

    def stop(self) -> None:
        _stop(self.proc)

    @property
    def base_url(self) -> str:
        return f"http://{self.addr}"


@dataclass
class Gateway:
    base_url: str  # http://127.0.0.1:PORT (no /v1)
    key: str  # the tenant's API key
    upstream_key: str  # the credential the gateway sends upstream (must never leak)
    log_path: Path  # the gateway's stderr
    stdout_path: Path
    proc: subprocess.Popen

    def log_text(self) -> str:
        return ANSI_ESCAPE.sub("", self.log_path.read_text(errors="replace"))

    def stop(self) -> None:
        _stop(self.proc)


def start_mock_upstream(*args: str) -> MockUpstream:
    """Starts `tollgate-mock-upstream` on a free port (with extra `args`, e.g. `--chunks`);
    returns once it listens."""
    binary = _binary("tollgate-mock-upstream")
    proc = subprocess.Popen(
        [str(binary), "--listen", "127.0.0.1:0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = _read_line_with_timeout(proc, STARTUP_TIMEOUT_S)
    match = re.fullmatch(r"listening on (\S+)\s*", line)
    if not match:
        _stop(proc)
        pytest.fail(f"unexpected first line from the mock upstream: {line!r}")
    return MockUpstream(addr=match.group(1), proc=proc)


def run_cli(binary: Path, data_dir: Path, *args: str) -> str:
    done = subprocess.run(
        [str(binary), "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"tollgate {' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return done.stdout.strip()


def _gateway_config(upstream: MockUpstream, extra: str = "") -> str:
    return extra + f"""
[server]
max_body_bytes = {MAX_BODY_BYTES}
env_providers = false

[[deployments]]
type = "openai"
name = "oa"
model = "*"
base_url = "{upstream.base_url}/v1"
api_key_env = "UPSTREAM_KEY"
embeddings = true
first_byte_timeout_ms = {FIRST_BYTE_TIMEOUT_MS}

[[deployments]]
type = "anthropic"
name = "an"
model = "*"
base_url = "{upstream.base_url}"
api_key_env = "UPSTREAM_KEY"
first_byte_timeout_ms = {FIRST_BYTE_TIMEOUT_MS}

[[models]]
name = "oa/*"
deployments = ["oa"]

[[models]]
name = "an/*"
deployments = ["an"]
"""


def _wait_ready(proc: subprocess.Popen, log_path: Path) -> str:
    """Waits for the `listening on` log line and a 200 from `/readyz`; returns the base URL."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    base_url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the gateway exited with {proc.returncode}:\n{log_path.read_text()}")
        if base_url is None:
            text = ANSI_ESCAPE.sub("", log_path.read_text(errors="replace"))
            match = re.search(r"listening on (http://[0-9.:]+)", text)
            if match:
                base_url = match.group(1)
        if base_url is not None:
            try:
                with urllib.request.urlopen(f"{base_url}/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        return base_url
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                pass
        time.sleep(0.05)
    _stop(proc)
    pytest.fail(f"the gateway was not ready within {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()}")


def start_gateway(
    upstream: MockUpstream,
    workdir: Path,
    upstream_key: str,
    *,
    tenant: str = "sdk-tests",
    extra_config: str = "",
) -> Gateway:
    """Creates a tenant and key in a fresh data dir under `workdir`, then serves;
    `extra_config` (TOML tables) goes before the deployments."""
    binary = _binary("tollgate")
    data_dir = workdir / "data"
    data_dir.mkdir()

    # Tenant and key first, so `serve` does not create a default one.
    tenant_id = run_cli(binary, data_dir, "tenants", "create", tenant)
    assert tenant_id, "`tenants create` printed no tenant id"
    key = run_cli(binary, data_dir, "keys", "create", "--tenant", tenant)
    assert re.fullmatch(r"tg_\w+", key), f"`keys create` printed {key!r}, not a key alone"

    config_path = workdir / "tollgate.toml"
    config_path.write_text(_gateway_config(upstream, extra_config))
    log_path = workdir / "gateway.stderr.log"
    stdout_path = workdir / "gateway.stdout.log"

    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE")}
    env.pop("OPENAI_API_KEY", None)
    env.pop("ANTHROPIC_API_KEY", None)
    env.update(
        UPSTREAM_KEY=upstream_key,
        RUST_LOG="debug",  # the secrets test wants the noisiest logs the gateway writes
        NO_COLOR="1",
    )
    with open(log_path, "wb") as stderr, open(stdout_path, "wb") as stdout:
        proc = subprocess.Popen(
            [
                str(binary),
                "--data-dir",
                str(data_dir),
                "serve",
                "--config",
                str(config_path),
                "--listen",
                "127.0.0.1:0",
            ],
            stdout=stdout,
            stderr=stderr,
            env=env,
        )
    try:
        base_url = _wait_ready(proc, log_path)
        # A key of our own existed, so no default tenant/key may have been printed.
        assert "tg_" not in stdout_path.read_text(), "serve created a default key"
    except BaseException:
        _stop(proc)
        raise
    return Gateway(
        base_url=base_url,
        key=key,
        upstream_key=upstream_key,
        log_path=log_path,
        stdout_path=stdout_path,
        proc=proc,
    )
