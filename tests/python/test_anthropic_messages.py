"""The official `anthropic` SDK against the gateway's `/v1/messages`.

`an/<scenario>` is relayed to an Anthropic-format upstream (same dialect), `oa/<scenario>` is
translated to an OpenAI-format one and back, `mock/echo` is the in-process simulated
provider returning the user's text.
"""

from __future__ import annotations

import anthropic
import pytest

import mockrules

USER_TEXT = "Hello there, how are you doing today?"
MESSAGES = [{"role": "user", "content": USER_TEXT}]
PROMPT_TOKENS = mockrules.prompt_tokens(USER_TEXT)
MAX_TOKENS = 256

UPSTREAM_MODELS = ["an/normal", "oa/normal"]

TOOLS = [
    {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "input_schema": {
            "type": "object",
            "properties": {
                "location": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
    {
        "name": "get_time",
        "description": "Local time in a city.",
        "input_schema": {
            "type": "object",
            "properties": {"location": {"type": "string"}, "unit": {"type": "string"}},
            "required": ["location"],
        },
    },
]
TOOL_NAMES = ["get_weather", "get_time"]
TOOL_PROMPT = "Weather and time in Paris and Tokyo?"


def text_of(message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def send(ant: anthropic.Anthropic, stream: bool, **kwargs):
    """The final message, from `messages.create` or from `messages.stream` (checking that the
    text the stream yielded matches the message it assembled)."""
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    if not stream:
        return ant.messages.create(**kwargs)
    with ant.messages.stream(**kwargs) as s:
        streamed_text = "".join(s.text_stream)
        message = s.get_final_message()
    assert streamed_text == text_of(message)
    return message


MODES = pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])


@MODES
@pytest.mark.parametrize("model", UPSTREAM_MODELS)
def test_text_reply(ant: anthropic.Anthropic, model: str, stream: bool) -> None:
    message = send(ant, stream, model=model, messages=MESSAGES)

    assert message.type == "message"
    assert message.role == "assistant"
    assert message.id.startswith("msg_")
    assert [b.type for b in message.content] == ["text"]
    assert text_of(message) == mockrules.reply_text()
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == PROMPT_TOKENS
    assert message.usage.output_tokens == mockrules.CHUNKS
    assert (message.usage.cache_read_input_tokens or 0) == 0


@MODES
@pytest.mark.parametrize("model", UPSTREAM_MODELS)
def test_max_tokens_stop_reason(ant: anthropic.Anthropic, model: str, stream: bool) -> None:
    message = send(ant, stream, model=model, messages=MESSAGES, max_tokens=5)
    assert message.stop_reason == "max_tokens"
    assert text_of(message) == mockrules.reply_text(5)
    assert message.usage.output_tokens == 5


@MODES
@pytest.mark.parametrize("model", UPSTREAM_MODELS)
def test_system_prompt_reaches_upstream(ant: anthropic.Anthropic, model: str, stream: bool) -> None:
    # The mock counts the system prompt: losing it in translation changes input_tokens.
    system = "You are a terse assistant who answers in one line."
    message = send(ant, stream, model=model, system=system, messages=MESSAGES)
    assert message.usage.input_tokens == mockrules.prompt_tokens(system, USER_TEXT)


@MODES
def test_echo(ant: anthropic.Anthropic, stream: bool) -> None:
    text = "Please repeat these seven words back to me"
    message = send(ant, stream, model="mock/echo", messages=[{"role": "user", "content": text}])
    assert text_of(message) == text
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0
    assert message.usage.output_tokens > 0


@MODES
@pytest.mark.parametrize("model", ["an/tools", "oa/tools"])
def test_tool_use(ant: anthropic.Anthropic, model: str, stream: bool) -> None:
    message = send(
        ant,
        stream,
        model=model,
        messages=[{"role": "user", "content": TOOL_PROMPT}],
        tools=TOOLS,
    )
    assert message.stop_reason == "tool_use"
    tool_uses = [b for b in message.content if b.type == "tool_use"]
    assert [b.name for b in tool_uses] == TOOL_NAMES
    assert [b.input for b in tool_uses] == mockrules.TOOL_CALL_INPUTS
    assert all(isinstance(b.input, dict) for b in tool_uses)
    ids = [b.id for b in tool_uses]
    assert all(ids) and ids[0] != ids[1], f"tool_use ids: {ids}"
    # tool_use blocks come after any text.
    types = [b.type for b in message.content]
    assert types[-2:] == ["tool_use", "tool_use"]
    if model.startswith("an/"):
        assert types == ["text", "tool_use", "tool_use"]
        assert text_of(message) == mockrules.TOOL_PREAMBLE
        expected_output = mockrules.tool_output_tokens(with_text_preamble=True)
    else:
        assert text_of(message) == ""
        expected_output = mockrules.tool_output_tokens(with_text_preamble=False)
    assert message.usage.output_tokens == expected_output
    assert message.usage.input_tokens == mockrules.prompt_tokens(TOOL_PROMPT)


@pytest.mark.parametrize("model", ["an/tools", "oa/tools"])
def test_tool_result_follow_up(ant: anthropic.Anthropic, model: str) -> None:
    first = ant.messages.create(
        model=model,
        max_tokens=MAX_TOKENS,
        messages=[{"role": "user", "content": TOOL_PROMPT}],
        tools=TOOLS,
    )
    tool_uses = [b for b in first.content if b.type == "tool_use"]
    assert len(tool_uses) == 2
    results = [f"result {i}: 21 C" for i in range(2)]
    follow_up = ant.messages.create(
        model=model.split("/")[0] + "/normal",
        max_tokens=MAX_TOKENS,
        tools=TOOLS,
        messages=[
            {"role": "user", "content": TOOL_PROMPT},
            {
                "role": "assistant",
                "content": [b.model_dump(exclude_none=True) for b in first.content],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": b.id, "content": r}
                    for b, r in zip(tool_uses, results)
                ],
            },
        ],
    )
    assert follow_up.stop_reason == "end_turn"
    assert text_of(follow_up) == mockrules.reply_text()
    # The mock counts user text, assistant text and tool results, in either dialect.
    assert follow_up.usage.input_tokens == mockrules.prompt_tokens(
        TOOL_PROMPT, text_of(first), *results
    )


@MODES
def test_split_usage_final_figures_win(ant: anthropic.Anthropic, stream: bool) -> None:
    # message_delta repeats input_tokens with a larger figure than message_start's.
    message = send(ant, stream, model="an/anthropic-usage-split", messages=MESSAGES)
    assert message.usage.input_tokens == PROMPT_TOKENS + mockrules.SPLIT_EXTRA_INPUT_TOKENS
    assert message.usage.output_tokens == mockrules.CHUNKS


def test_split_usage_raw_events(ant: anthropic.Anthropic) -> None:
    # The relay must not drop or rewrite the message_delta usage.
    with ant.messages.stream(
        model="an/anthropic-usage-split", max_tokens=MAX_TOKENS, messages=MESSAGES
    ) as s:
        events = list(s)
    starts = [e for e in events if e.type == "message_start"]
    deltas = [e for e in events if e.type == "message_delta"]
    assert len(starts) == 1 and len(deltas) == 1
    assert starts[0].message.usage.input_tokens == PROMPT_TOKENS
    assert deltas[0].usage.input_tokens == PROMPT_TOKENS + mockrules.SPLIT_EXTRA_INPUT_TOKENS
    assert deltas[0].usage.output_tokens == mockrules.CHUNKS
    assert deltas[0].delta.stop_reason == "end_turn"
    assert events[-1].type == "message_stop"


@MODES
@pytest.mark.parametrize("model", ["an/cached", "oa/cached"])
def test_cache_read_tokens(ant: anthropic.Anthropic, model: str, stream: bool) -> None:
    # Anthropic's input_tokens excludes cache reads; an OpenAI upstream's prompt_tokens
    # includes its cached_tokens, so translation must split them.
    message = send(ant, stream, model=model, messages=MESSAGES)
    cached = PROMPT_TOKENS // 2
    assert cached > 0
    assert message.usage.cache_read_input_tokens == cached
    assert message.usage.input_tokens == PROMPT_TOKENS - cached
    assert message.usage.output_tokens == mockrules.CHUNKS


@pytest.mark.parametrize("model", ["an/split-frames", "oa/split-frames"])
def test_stream_with_split_frames(ant: anthropic.Anthropic, model: str) -> None:
    message = send(ant, True, model=model, messages=MESSAGES)
    assert text_of(message) == mockrules.reply_text()
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == mockrules.CHUNKS


def test_stream_event_order(ant: anthropic.Anthropic) -> None:
    # Translated from an OpenAI stream: the event grammar must still be Anthropic's.
    with ant.messages.stream(model="oa/normal", max_tokens=MAX_TOKENS, messages=MESSAGES) as s:
        kinds = [e.type for e in s if e.type != "text"]
    assert kinds[0] == "message_start"
    assert kinds[-2:] == ["message_delta", "message_stop"]
    body = kinds[1:-2]
    assert body[0] == "content_block_start"
    assert body[-1] == "content_block_stop"
    assert set(body[1:-1]) == {"content_block_delta"}
    assert len(body) == mockrules.CHUNKS + 2
