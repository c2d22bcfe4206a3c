"""Session fixtures for the SDK conformance suite: the mock upstream, the gateway in front
of it (see harness.py for how both are started) and SDK clients pointed at the gateway.
"""

from __future__ import annotations

import secrets
from typing import Callable, Iterator

import anthropic
import httpx2
import openai
import pytest

from harness import (
    CLIENT_TIMEOUT_S,
    Gateway,
    MockUpstream,
    RecordingTransport,
    ResponseLog,
    start_gateway,
    start_mock_upstream,
)


@pytest.fixture(scope="session")
def mock_upstream() -> Iterator[MockUpstream]:
    upstream = start_mock_upstream()
    try:
        yield upstream
    finally:
        upstream.stop()


@pytest.fixture(scope="session")
def gateway(
    mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """The gateway every test talks to; its upstream credential is a random secret."""
    upstream_key = f"sk-test-SECRET-{secrets.token_hex(16)}"
    gw = start_gateway(mock_upstream, tmp_path_factory.mktemp("gateway"), upstream_key)
    try:
        yield gw
    finally:
        gw.stop()


# --------------------------------------------------------------------------------------
# SDK clients
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def response_log() -> ResponseLog:
    return ResponseLog()


@pytest.fixture(scope="session")
def http_clients(response_log: ResponseLog) -> Iterator[Callable[[bool], httpx2.Client]]:
    """`http_clients(fresh)`: the session's shared, pooled HTTP client, or (`fresh=True`) a
    new one with its own connection pool. Both record every response byte."""
    shared = httpx2.Client(transport=RecordingTransport(response_log), timeout=CLIENT_TIMEOUT_S)
    created = [shared]

    def get(fresh: bool) -> httpx2.Client:
        if not fresh:
            return shared
        client = httpx2.Client(transport=RecordingTransport(response_log), timeout=CLIENT_TIMEOUT_S)
        created.append(client)
        return client

    yield get
    for client in created:
        client.close()


@pytest.fixture(scope="session")
def make_openai(gateway: Gateway, http_clients):
    """`make_openai(api_key=..., gw=..., timeout=..., fresh=...)`: an OpenAI client (no
    retries) for the session gateway, or for `gw`; `fresh=True` gives it its own connection
    pool, for requests that may leave a connection unusable."""

    def make(
        api_key: str | None = None,
        gw: Gateway | None = None,
        timeout: float = CLIENT_TIMEOUT_S,
        fresh: bool = False,
    ) -> openai.OpenAI:
        gw = gw or gateway
        return openai.OpenAI(
            api_key=gw.key if api_key is None else api_key,
            base_url=f"{gw.base_url}/v1",
            max_retries=0,
            timeout=timeout,
            http_client=http_clients(fresh),
        )

    return make


@pytest.fixture(scope="session")
def make_anthropic(gateway: Gateway, http_clients):
    """`make_anthropic(api_key=..., gw=..., timeout=..., fresh=...)`: as `make_openai`, for
    the Anthropic SDK."""

    def make(
        api_key: str | None = None,
        gw: Gateway | None = None,
        timeout: float = CLIENT_TIMEOUT_S,
        fresh: bool = False,
    ) -> anthropic.Anthropic:
        gw = gw or gateway
        return anthropic.Anthropic(
            api_key=gw.key if api_key is None else api_key,
            base_url=gw.base_url,
            max_retries=0,
            timeout=timeout,
            http_client=http_clients(fresh),
        )

    return make


@pytest.fixture(scope="session")
def oai(make_openai) -> openai.OpenAI:
    return make_openai()


@pytest.fixture(scope="session")
def ant(make_anthropic) -> anthropic.Anthropic:
    return make_anthropic()
