"""Chat completions over a WebSocket (`GET /v1/realtime/chat`) with the `websockets` client:
multiplexed requests, cancellation, a hard token limit cutting one mid-stream, the socket's
caps and close codes, and billing equal to the same requests over HTTP."""

from __future__ import annotations

import json
import secrets
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from harness import Gateway, MockUpstream, _binary, run_cli, start_gateway, start_mock_upstream

REALTIME = """
[realtime]
max_in_flight = 2
max_frame_bytes = 65536
idle_timeout_s = 2

[limits]
default_max_output_tokens = 50
stream_increment_tokens = 50
"""


@pytest.fixture(scope="module")
def long_upstream() -> Iterator[MockUpstream]:
    """Replies of 400 content chunks (enough for a token limit to cut one)."""
    upstream = start_mock_upstream("--chunks", "400")
    try:
        yield upstream
    finally:
        upstream.stop()


@pytest.fixture(scope="module")
def ws_gateway(long_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("realtime")
    gw = start_gateway(
        long_upstream,
        workdir,
        f"sk-test-{secrets.token_hex(8)}",
        tenant="realtime-tests",
        extra_config=REALTIME,
    )
    try:
        yield gw, workdir / "data"
    finally:
        gw.stop()


def ws_url(gw: Gateway) -> str:
    return gw.base_url.replace("http://", "ws://") + "/v1/realtime/chat"


def open_socket(gw: Gateway, key: str | None = None) -> ClientConnection:
    return connect(
        ws_url(gw),
        additional_headers={"Authorization": f"Bearer {key or gw.key}"},
        open_timeout=10,
    )


def chat(content: str, model: str = "oa/normal") -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "stream_options": {"include_usage": True},
    }


def collect(ws: ClientConnection, ids: set[str], timeout: float = 30) -> dict[str, list[dict]]:
    """Frames per request id until each of `ids` has ended (done, error or cancelled)."""
    frames: dict[str, list[dict]] = {i: [] for i in ids}
    open_ids = set(ids)
    deadline = time.monotonic() + timeout
    while open_ids:
        frame = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        frames.setdefault(frame["id"], []).append(frame)
        if frame["type"] in ("done", "error", "cancelled"):
            open_ids.discard(frame["id"])
    return frames


def text_of(frames: list[dict]) -> str:
    return "".join(
        f["chunk"]["choices"][0]["delta"].get("content") or ""
        for f in frames
        if f["type"] == "chunk" and f["chunk"].get("choices")
    )


def usage_of(frames: list[dict]) -> dict | None:
    for f in frames:
        if f["type"] == "chunk" and f["chunk"].get("usage"):
            return f["chunk"]["usage"]
    return None


def http_stream(gw: Gateway, body: dict) -> tuple[str, dict | None]:
    """The same request over HTTP SSE: (content, usage)."""
    req = urllib.request.Request(
        f"{gw.base_url}/v1/chat/completions",
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Authorization": f"Bearer {gw.key}", "Content-Type": "application/json"},
    )
    content, usage = "", None
    with urllib.request.urlopen(req, timeout=30) as resp:
        for line in resp.read().decode().splitlines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                content += chunk["choices"][0]["delta"].get("content") or ""
            if chunk.get("usage"):
                usage = chunk["usage"]
    return content, usage


def test_requests_are_multiplexed_and_match_http(ws_gateway) -> None:
    gw, _ = ws_gateway
    bodies = {"a": chat("first question"), "b": chat("second, longer question here")}
    with open_socket(gw) as ws:
        for i, body in bodies.items():
            ws.send(json.dumps({"type": "request", "id": i, "body": body}))
        frames = collect(ws, set(bodies))
    request_ids = set()
    for i, body in bodies.items():
        got = frames[i]
        assert got[-1]["type"] == "done", got[-1]
        assert all(f["request_id"].startswith("req_") for f in got)
        request_ids.add(got[-1]["request_id"])
        # The same request over HTTP: the same answer and the same usage billed.
        content, usage = http_stream(gw, body)
        assert text_of(got) == content != ""
        assert usage_of(got) == usage is not None
    assert len(request_ids) == 2


def test_a_request_is_cancelled_by_id_and_the_others_go_on(ws_gateway) -> None:
    gw, _ = ws_gateway
    with open_socket(gw) as ws:
        ws.send(json.dumps({"type": "request", "id": "slow", "body": chat("x", "oa/slow")}))
        first = json.loads(ws.recv(timeout=10))
        assert (first["id"], first["type"]) == ("slow", "chunk")
        ws.send(json.dumps({"type": "cancel", "id": "slow"}))
        ws.send(json.dumps({"type": "request", "id": "fast", "body": chat("y")}))
        frames = collect(ws, {"slow", "fast"})
    assert frames["slow"][-1]["type"] == "cancelled"
    assert not any(f["type"] == "done" for f in frames["slow"])
    assert frames["fast"][-1]["type"] == "done"


def test_the_socket_caps_and_close_codes(ws_gateway) -> None:
    gw, _ = ws_gateway
    with open_socket(gw) as ws:
        # A frame that is not a request or a cancel: an error frame, the socket stays.
        ws.send("{not json")
        err = json.loads(ws.recv(timeout=10))
        assert err["type"] == "error" and err["status"] == 400
        # At most two in flight (this gateway's cap).
        for i in ("s1", "s2", "s3"):
            ws.send(json.dumps({"type": "request", "id": i, "body": chat("z", "oa/slow")}))
        refused = None
        deadline = time.monotonic() + 10
        while refused is None and time.monotonic() < deadline:
            f = json.loads(ws.recv(timeout=10))
            if f["id"] == "s3":
                refused = f
        assert refused and refused["type"] == "error" and refused["status"] == 429
        for i in ("s1", "s2"):
            ws.send(json.dumps({"type": "cancel", "id": i}))
    # A frame over the size cap closes the socket with 1009.
    with open_socket(gw) as ws:
        ws.send("x" * 70_000)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    # Binary frames: 1003.
    with open_socket(gw) as ws:
        ws.send(b"\x00\x01")
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1003
    # An idle socket is closed (this gateway: after 2 s) with 1000.
    with open_socket(gw) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=15)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
        assert closed.value.rcvd.reason == "idle"


def test_a_bad_key_gets_401_before_any_socket(ws_gateway) -> None:
    gw, _ = ws_gateway
    with pytest.raises(InvalidStatus) as refused:
        open_socket(gw, key="tg_not_a_real_key_0000000000000000000000")
    assert refused.value.response.status_code == 401


def test_a_hard_token_limit_cuts_a_request_mid_stream(ws_gateway) -> None:
    gw, data_dir = ws_gateway
    tollgate = _binary("tollgate")
    run_cli(tollgate, data_dir, "tenants", "create", "ws-limited")
    key = run_cli(tollgate, data_dir, "keys", "create", "--tenant", "ws-limited", "--tpm", "300")
    # The store tells the running gateway about the new key within its poll.
    deadline = time.monotonic() + 10
    while True:
        try:
            ws = open_socket(gw, key=key)
            break
        except InvalidStatus:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with ws:
        body = {"model": "oa/normal", "messages": [{"role": "user", "content": "long"}]}
        ws.send(json.dumps({"type": "request", "id": "big", "body": body}))
        frames = collect(ws, {"big"})["big"]
    last = frames[-1]
    assert last["type"] == "error", last
    assert "tokens per minute" in last["error"]["message"]
    chunks = [f for f in frames if f["type"] == "chunk"]
    assert 0 < len(chunks) < 400, len(chunks)
