"""The exact response cache through the official SDKs: a replayed answer — whole or streamed,
OpenAI or Anthropic — is accepted by the SDK and equals the original."""

from __future__ import annotations

import secrets
import time
from typing import Callable, Iterator

import anthropic

import pytest

from harness import Gateway, MockUpstream, start_gateway


@pytest.fixture(scope="module")
def cached_gateway(
    mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gw = start_gateway(
        mock_upstream,
        tmp_path_factory.mktemp("cached"),
        f"sk-test-{secrets.token_hex(8)}",
        tenant="cache-tests",
        extra_config="[cache]\nenabled = true\n",
    )
    try:
        yield gw
    finally:
        gw.stop()


def until_hit(call: Callable[[], tuple[str, object]]) -> object:
    """Repeats `call` (entries are stored just after the answer) until it reports a hit."""
    for _ in range(50):
        outcome, value = call()
        if outcome == "hit":
            return value
        time.sleep(0.02)
    pytest.fail("a repeated request never hit the cache")


def test_openai_sdk_accepts_replayed_answers(make_openai, cached_gateway: Gateway) -> None:
    oai = make_openai(gw=cached_gateway)
    nonce = secrets.token_hex(4)
    messages = [{"role": "user", "content": f"Name a colour ({nonce})."}]

    def whole() -> tuple[str, object]:
        raw = oai.chat.completions.with_raw_response.create(
            model="oa/normal", messages=messages
        )
        return raw.headers.get("x-tollgate-cache"), raw.parse()

    outcome, first = whole()
    assert outcome == "miss"
    replay = until_hit(whole)
    assert replay.choices[0].message.content == first.choices[0].message.content
    assert replay.usage == first.usage
    assert replay.model == "oa/normal"

    def streamed() -> tuple[str, object]:
        with oai.chat.completions.with_streaming_response.create(
            model="oa/normal",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        ) as raw:
            chunks = list(raw.parse())
            return raw.headers.get("x-tollgate-cache"), chunks

    outcome, first_chunks = streamed()
    assert outcome == "miss"
    replay_chunks = until_hit(streamed)
    text = lambda cs: "".join(  # noqa: E731
        c.choices[0].delta.content or "" for c in cs if c.choices
    )
    assert text(replay_chunks) == text(first_chunks) != ""
    assert replay_chunks[-1].usage == first_chunks[-1].usage
    assert replay_chunks[-1].usage is not None


def test_anthropic_sdk_accepts_replayed_answers(make_anthropic, cached_gateway: Gateway) -> None:
    ant = make_anthropic(gw=cached_gateway)
    nonce = secrets.token_hex(4)
    messages = [{"role": "user", "content": f"Name a fruit ({nonce})."}]

    def whole() -> tuple[str, object]:
        raw = ant.messages.with_raw_response.create(
            model="an/normal", max_tokens=64, messages=messages
        )
        return raw.headers.get("x-tollgate-cache"), raw.parse()

    outcome, first = whole()
    assert outcome == "miss"
    replay = until_hit(whole)
    assert replay.content[0].text == first.content[0].text
    assert replay.usage.output_tokens == first.usage.output_tokens

    def streamed() -> tuple[str, object]:
        with ant.messages.with_streaming_response.create(
            model="an/normal", max_tokens=64, messages=messages, stream=True
        ) as raw:
            events = list(raw.parse())
            return raw.headers.get("x-tollgate-cache"), events

    outcome, first_events = streamed()
    assert outcome == "miss"
    replay_events = until_hit(streamed)
    text = lambda es: "".join(  # noqa: E731
        e.delta.text for e in es if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    assert text(replay_events) == text(first_events) != ""
    assert replay_events[-1].type == "message_stop"
    assert isinstance(replay_events[0], anthropic.types.RawMessageStartEvent)
    assert replay_events[0].message.model == "an/normal"

