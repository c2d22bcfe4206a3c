"""Failures as each SDK's own exceptions: authentication, unknown models, validation, body
size, upstream errors before the stream (mapped per gateway/src/error.rs: upstream 429 → 429,
400 → 400, 503/529 → 503, other 5xx → 502, no headers within the first-byte timeout → 504)
and upstream errors in the middle of a stream.

Every client here has `max_retries=0`, so each test sees exactly one gateway answer.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import subprocess
import time

import anthropic
import httpx2
import openai
import pytest

import mockrules
from harness import BIN_DIR, FIRST_BYTE_TIMEOUT_MS, MAX_BODY_BYTES, start_gateway

MESSAGES = [{"role": "user", "content": "Hello there, how are you doing today?"}]
MAX_TOKENS = 256


def chat(client: openai.OpenAI, model: str, **kwargs):
    return client.chat.completions.create(model=model, messages=MESSAGES, **kwargs)


def message(client: anthropic.Anthropic, model: str, **kwargs):
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    return client.messages.create(model=model, messages=MESSAGES, **kwargs)


# ---------------------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unknown_key(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A well-formed key (valid prefix and checksum) that the gateway's store never saw."""
    data_dir = tmp_path_factory.mktemp("other-store")
    run = lambda *args: subprocess.run(  # noqa: E731
        [str(BIN_DIR / "tollgate"), "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    run("tenants", "create", "stranger")
    return run("keys", "create", "--tenant", "stranger")


def tampered(key: str) -> str:
    """The key with one character of its random part changed (checksum no longer matches)."""
    i = 5
    return key[:i] + ("A" if key[i] != "A" else "B") + key[i + 1 :]


@pytest.mark.parametrize("kind", ["tampered", "unknown", "garbage"])
def test_openai_wrong_key(make_openai, gateway, unknown_key: str, kind: str) -> None:
    keys = {"tampered": tampered(gateway.key), "unknown": unknown_key, "garbage": "sk-not-a-key"}
    key = keys[kind]
    with pytest.raises(openai.AuthenticationError) as err:
        chat(make_openai(api_key=key, fresh=True), "mock/fast")
    assert err.value.status_code == 401
    assert err.value.code == "invalid_api_key"


def test_openai_missing_key(make_openai) -> None:
    client = make_openai(api_key="unused", fresh=True)
    with pytest.raises(openai.AuthenticationError) as err:
        chat(client, "mock/fast", extra_headers={"Authorization": openai.Omit()})
    assert err.value.status_code == 401
    assert "Authorization" not in err.value.request.headers


@pytest.mark.parametrize("kind", ["tampered", "unknown", "garbage"])
def test_anthropic_wrong_key(make_anthropic, gateway, unknown_key: str, kind: str) -> None:
    keys = {"tampered": tampered(gateway.key), "unknown": unknown_key, "garbage": "sk-ant-nope"}
    key = keys[kind]
    with pytest.raises(anthropic.AuthenticationError) as err:
        message(make_anthropic(api_key=key, fresh=True), "mock/echo")
    assert err.value.status_code == 401
    assert err.value.type == "authentication_error"


def test_anthropic_missing_key(make_anthropic) -> None:
    client = make_anthropic(api_key="unused", fresh=True)
    with pytest.raises(anthropic.AuthenticationError) as err:
        message(
            client,
            "mock/echo",
            extra_headers={"X-Api-Key": anthropic.Omit(), "Authorization": anthropic.Omit()},
        )
    assert err.value.status_code == 401
    assert "x-api-key" not in err.value.request.headers
    assert err.value.type == "authentication_error"


def test_models_list_requires_a_key(make_openai, make_anthropic) -> None:
    with pytest.raises(openai.AuthenticationError):
        make_openai(api_key="sk-not-a-key", fresh=True).models.list()
    with pytest.raises(anthropic.AuthenticationError):
        make_anthropic(api_key="sk-ant-nope", fresh=True).models.list()


# ---------------------------------------------------------------------------------------
# Request errors
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["no-such-model", "nope/oa-normal"])
def test_unknown_model(oai: openai.OpenAI, ant: anthropic.Anthropic, model: str) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        chat(oai, model)
    assert err.value.status_code == 404
    assert err.value.code == "model_not_found"
    assert model in err.value.message
    with pytest.raises(anthropic.NotFoundError) as aerr:
        message(ant, model)
    assert aerr.value.status_code == 404
    assert aerr.value.type == "not_found_error"


@pytest.mark.parametrize("model", ["mock/fast", "oa/normal", "an/normal"])
def test_openai_bad_temperature_names_the_field(oai: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        chat(oai, model, temperature="hot")
    assert err.value.status_code == 400
    assert "temperature" in err.value.message
    assert err.value.param == "temperature"


@pytest.mark.parametrize("model", ["mock/echo", "an/normal", "oa/normal"])
def test_anthropic_bad_temperature_names_the_field(ant: anthropic.Anthropic, model: str) -> None:
    # This SDK version has no `temperature` argument: send it as an extra body field.
    with pytest.raises(anthropic.BadRequestError) as err:
        message(ant, model, extra_body={"temperature": "hot"})
    assert err.value.status_code == 400
    assert err.value.type == "invalid_request_error"
    assert "temperature" in (err.value.api_message or "")


def test_anthropic_missing_max_tokens(ant: anthropic.Anthropic) -> None:
    # Required by the Messages API. The SDK insists on it too, so post the body through the
    # SDK's generic `post` (same headers, same error mapping).
    with pytest.raises(anthropic.BadRequestError) as err:
        ant.post(
            "/v1/messages",
            body={"model": "an/normal", "messages": MESSAGES},
            cast_to=object,
        )
    assert err.value.status_code == 400
    assert "max_tokens" in (err.value.api_message or "")


def test_oversized_body_is_413(make_openai, make_anthropic) -> None:
    big = [{"role": "user", "content": "x" * (MAX_BODY_BYTES + 1024)}]
    with pytest.raises(openai.APIStatusError) as err:
        make_openai(fresh=True).chat.completions.create(model="mock/fast", messages=big)
    assert err.value.status_code == 413
    with pytest.raises(anthropic.APIStatusError) as aerr:
        make_anthropic(fresh=True).messages.create(
            model="mock/echo", max_tokens=MAX_TOKENS, messages=big
        )
    assert aerr.value.status_code == 413
    assert aerr.value.type == "request_too_large"


def test_body_under_the_limit_is_accepted(oai: openai.OpenAI) -> None:
    # The limit is on the body, not the prompt: a prompt well inside it must pass.
    text = "word " * ((MAX_BODY_BYTES - 2048) // 5)
    completion = oai.chat.completions.create(
        model="oa/normal", messages=[{"role": "user", "content": text}]
    )
    assert completion.usage.prompt_tokens == mockrules.prompt_tokens(text)


# ---------------------------------------------------------------------------------------
# Upstream errors before the first byte
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["oa/rate-limited", "an/rate-limited"])
def test_rate_limited(oai: openai.OpenAI, ant: anthropic.Anthropic, model: str) -> None:
    with pytest.raises(openai.RateLimitError) as err:
        chat(oai, model)
    assert err.value.status_code == 429
    assert err.value.response.headers.get("retry-after") == "1"
    with pytest.raises(anthropic.RateLimitError) as aerr:
        message(ant, model)
    assert aerr.value.status_code == 429
    assert aerr.value.type == "rate_limit_error"
    assert aerr.value.response.headers.get("retry-after") == "1"


@pytest.mark.parametrize("model", ["oa/rate-limited", "an/rate-limited"])
def test_rate_limited_stream(oai: openai.OpenAI, ant: anthropic.Anthropic, model: str) -> None:
    # A stream that fails before its first byte is an ordinary HTTP error.
    with pytest.raises(openai.RateLimitError):
        chat(oai, model, stream=True)
    with pytest.raises(anthropic.RateLimitError):
        with ant.messages.stream(model=model, max_tokens=MAX_TOKENS, messages=MESSAGES) as s:
            s.get_final_message()


@pytest.mark.parametrize("model", ["oa/server-error", "an/server-error"])
def test_upstream_server_error_is_bad_gateway(
    oai: openai.OpenAI, ant: anthropic.Anthropic, model: str
) -> None:
    with pytest.raises(openai.InternalServerError) as err:
        chat(oai, model)
    assert err.value.status_code == 502
    with pytest.raises(anthropic.InternalServerError) as aerr:
        message(ant, model)
    assert aerr.value.status_code == 502
    assert aerr.value.type == "api_error"


@pytest.mark.parametrize("model", ["an/overloaded", "oa/overloaded"])
def test_overloaded_is_503(oai: openai.OpenAI, ant: anthropic.Anthropic, model: str) -> None:
    with pytest.raises(openai.InternalServerError) as err:
        chat(oai, model)
    assert err.value.status_code == 503
    with pytest.raises(anthropic.InternalServerError) as aerr:
        message(ant, model)
    assert aerr.value.status_code == 503
    assert aerr.value.type == "overloaded_error"


@pytest.mark.parametrize("model", ["oa/bad-request", "an/bad-request"])
def test_upstream_bad_request_keeps_its_message(
    oai: openai.OpenAI, ant: anthropic.Anthropic, model: str
) -> None:
    upstream_message = {
        "oa/bad-request": "Invalid value for 'temperature': decimal above maximum value.",
        "an/bad-request": 'roles must alternate between "user" and "assistant"',
    }[model]
    with pytest.raises(openai.BadRequestError) as err:
        chat(oai, model)
    assert err.value.status_code == 400
    assert upstream_message in err.value.message
    with pytest.raises(anthropic.BadRequestError) as aerr:
        message(ant, model)
    assert aerr.value.status_code == 400
    assert aerr.value.type == "invalid_request_error"
    assert upstream_message in (aerr.value.api_message or "")


def test_upstream_bad_request_keeps_param_and_code(oai: openai.OpenAI) -> None:
    # The upstream names the field at fault and a stable code (`param: temperature`,
    # `code: decimal_above_max_value`); clients branch on `code` (e.g. on
    # `context_length_exceeded`), so an OpenAI client of an OpenAI-style upstream should
    # see both as the upstream sent them.
    with pytest.raises(openai.BadRequestError) as err:
        chat(oai, "oa/bad-request")
    assert (err.value.param, err.value.code) == ("temperature", "decimal_above_max_value")


def test_hang_non_streaming_is_gateway_timeout(
    oai: openai.OpenAI, ant: anthropic.Anthropic
) -> None:
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as err:
        chat(oai, "oa/hang")
    elapsed = time.monotonic() - started
    assert err.value.status_code == 504
    assert FIRST_BYTE_TIMEOUT_MS / 1000 * 0.9 <= elapsed < FIRST_BYTE_TIMEOUT_MS / 1000 + 3

    with pytest.raises(anthropic.InternalServerError) as aerr:
        message(ant, "an/hang")
    assert aerr.value.status_code == 504
    assert aerr.value.type == "timeout_error"


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
def test_hang_streaming_is_gateway_timeout(make_openai, make_anthropic, sdk: str) -> None:
    # The upstream sends its response headers, then no body byte at all. Nothing has reached
    # the client yet, so the gateway must still be able to answer 504 after its first-byte
    # timeout, instead of holding the client's stream open forever.
    bound = FIRST_BYTE_TIMEOUT_MS / 1000 + 4
    started = time.monotonic()
    if sdk == "openai":
        with pytest.raises(openai.APIError) as err:
            list(chat(make_openai(timeout=bound, fresh=True), "oa/hang", stream=True))
        timed_out = isinstance(err.value, openai.APITimeoutError)
        status = getattr(err.value, "status_code", None)
    else:
        client = make_anthropic(timeout=bound, fresh=True)
        # A read timeout inside the event stream escapes this SDK unwrapped.
        with pytest.raises((anthropic.APIError, httpx2.TimeoutException)) as err:
            with client.messages.stream(
                model="an/hang", max_tokens=MAX_TOKENS, messages=MESSAGES
            ) as s:
                s.get_final_message()
        timed_out = isinstance(err.value, (anthropic.APITimeoutError, httpx2.TimeoutException))
        status = getattr(err.value, "status_code", None)
    elapsed = time.monotonic() - started
    assert not timed_out, (
        f"no answer from the gateway within {bound:.0f} s (client timed out after {elapsed:.1f} s)"
    )
    assert status == 504, f"expected a 504, got {type(err.value).__name__}: {err.value}"


# ---------------------------------------------------------------------------------------
# Upstream errors in the middle of a stream
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["oa/error-midstream", "an/error-midstream"])
def test_openai_stream_raises_after_content(oai: openai.OpenAI, model: str) -> None:
    received = []
    with pytest.raises(openai.APIError) as err:
        for chunk in chat(oai, model, stream=True):
            if chunk.choices:
                received.append(chunk.choices[0].delta.content or "")
    assert not isinstance(err.value, (openai.APIConnectionError, openai.APIStatusError))
    assert "".join(received) == mockrules.reply_text(mockrules.CHUNKS_BEFORE_FAILURE)
    assert err.value.message
    assert isinstance(err.value.body, dict) and err.value.body.get("message")


@pytest.mark.parametrize("model", ["an/error-midstream", "oa/error-midstream"])
def test_anthropic_stream_raises_after_content(ant: anthropic.Anthropic, model: str) -> None:
    received = []
    with pytest.raises(anthropic.APIStatusError) as err:
        with ant.messages.stream(model=model, max_tokens=MAX_TOKENS, messages=MESSAGES) as s:
            for text in s.text_stream:
                received.append(text)
    assert "".join(received) == mockrules.reply_text(mockrules.CHUNKS_BEFORE_FAILURE)
    body = err.value.body
    assert isinstance(body, dict) and body.get("type") == "error"
    expected_type = "overloaded_error" if model.startswith("an/") else "api_error"
    assert body["error"]["type"] == expected_type


@pytest.mark.parametrize(
    ("model", "status"), [("oa/error-midstream", 502), ("an/error-midstream", 503)]
)
def test_error_scenario_non_streaming(oai: openai.OpenAI, model: str, status: int) -> None:
    # Not streaming, the same upstream failure is an HTTP error (500 → 502, 529 → 503).
    with pytest.raises(openai.InternalServerError) as err:
        chat(oai, model)
    assert err.value.status_code == status


# ---------------------------------------------------------------------------------------
# The gateway's own upstream credential is rejected
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def misconfigured_gateway(mock_upstream, tmp_path_factory):
    # The mock rejects any key containing "invalid" with the provider's own 401.
    gw = start_gateway(
        mock_upstream,
        tmp_path_factory.mktemp("misconfigured"),
        f"sk-invalid-{secrets.token_hex(8)}",
        tenant="misconfigured",
    )
    try:
        yield gw
    finally:
        gw.stop()


@pytest.mark.parametrize("model", ["oa/normal", "an/normal"])
def test_upstream_auth_failure_is_not_the_clients_401(
    make_openai, make_anthropic, misconfigured_gateway, model: str
) -> None:
    # The client's key is fine; the gateway's is not. A 401 would tell the client to fix
    # a key it cannot fix, so it must be a 502.
    with pytest.raises(openai.APIStatusError) as err:
        chat(make_openai(gw=misconfigured_gateway), model)
    assert err.value.status_code == 502
    with pytest.raises(anthropic.APIStatusError) as aerr:
        message(make_anthropic(gw=misconfigured_gateway), model)
    assert aerr.value.status_code == 502
    log = misconfigured_gateway.log_text()
    assert misconfigured_gateway.upstream_key not in log


# ---------------------------------------------------------------------------------------
# Connection reuse after an early error answer
# ---------------------------------------------------------------------------------------
# The SDKs pool HTTP/1.1 connections. The gateway answers some errors (bad key, body over
# the limit) before reading the request body. Then it must either keep the connection
# usable or say `Connection: close`; closing silently makes the SDK's next request on the
# pooled connection fail with "Server disconnected without sending a response"
# (APIConnectionError), which SDKs with retries disabled surface to the caller. These
# tests drive the socket by hand, as the SDK's transport does (headers and body written
# separately), so the outcome does not depend on timing.


def _read_response(sock: socket.socket) -> tuple[str, bytes]:
    """One HTTP/1.1 response with a content-length body: (head, body). Raises on EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} response bytes")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    head_text = head.decode("latin-1")
    match = re.search(r"(?im)^content-length:\s*(\d+)\s*$", head_text)
    length = int(match.group(1)) if match else 0
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed inside the response body")
        body += chunk
    return head_text, body


def _request_head(gateway, path: str, key: str, length: int) -> bytes:
    host = gateway.base_url.removeprefix("http://")
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


@pytest.mark.parametrize("case", ["bad-key", "body-too-large"])
def test_connection_usable_or_closed_explicitly_after_early_error(gateway, case: str) -> None:
    content = "x" * (MAX_BODY_BYTES + 1024) if case == "body-too-large" else "hi"
    key = gateway.key if case == "body-too-large" else tampered(gateway.key)
    expected_status = 413 if case == "body-too-large" else 401
    body = json.dumps({"model": "mock/fast", "messages": [{"role": "user", "content": content}]})
    body = body.encode()
    good = json.dumps({"model": "mock/fast", "messages": MESSAGES}).encode()

    host, port = gateway.base_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(_request_head(gateway, "/v1/chat/completions", key, len(body)))
        time.sleep(0.1)  # the gateway can answer from the headers alone
        try:
            sock.sendall(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it answered and stopped reading; the answer is still in our buffer
        head, _ = _read_response(sock)
        assert head.startswith(f"HTTP/1.1 {expected_status} "), head
        if re.search(r"(?im)^connection:\s*close\s*$", head):
            return  # announced: a client will not reuse the connection
        time.sleep(0.1)
        try:
            sock.sendall(_request_head(gateway, "/v1/chat/completions", gateway.key, len(good)))
            sock.sendall(good)
            second, _ = _read_response(sock)
        except (OSError, ConnectionError) as err:
            pytest.fail(
                f"the gateway answered {expected_status} without `Connection: close`, then "
                f"dropped the connection: the next request on it failed ({err!r})"
            )
        assert second.startswith("HTTP/1.1 200 "), second


# ---------------------------------------------------------------------------------------
# Quotas: a tenant over its requests-per-minute limit
# ---------------------------------------------------------------------------------------


def test_rate_limited_tenant_gets_each_sdks_rate_limit_error(
    gateway, make_openai, make_anthropic
) -> None:
    """A tenant limited to one request per minute: the second request raises the SDK's own
    RateLimitError, with retry-after and x-ratelimit-* headers and the limit named."""
    data_dir = gateway.log_path.parent / "data"
    tenant = f"sdk-limited-{secrets.token_hex(4)}"

    def cli(*args: str) -> str:
        done = subprocess.run(
            [str(BIN_DIR / "tollgate"), "--data-dir", str(data_dir), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return done.stdout.strip()

    cli("tenants", "create", tenant)
    cli("limits", "tenant", tenant, "--rpm", "1")
    key = cli("keys", "create", "--tenant", tenant)
    oai = make_openai(api_key=key)

    ok = oai.chat.completions.with_raw_response.create(model="oa/gpt-4o", messages=MESSAGES)
    assert ok.headers["x-ratelimit-limit-requests"] == "1"
    assert ok.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError) as refused:
        chat(oai, "oa/gpt-4o")
    e = refused.value
    assert e.status_code == 429
    assert e.code == "rate_limit_exceeded"
    assert e.param == "tenant_requests_per_minute"
    assert "requests per minute" in e.message
    assert 1 <= int(e.response.headers["retry-after"]) <= 60
    assert e.response.headers["x-ratelimit-remaining-requests"] == "0"

    with pytest.raises(anthropic.RateLimitError) as refused_a:
        message(make_anthropic(api_key=key), "an/claude-sonnet-4-5")
    assert refused_a.value.status_code == 429
    assert refused_a.value.body["error"]["type"] == "rate_limit_error"
