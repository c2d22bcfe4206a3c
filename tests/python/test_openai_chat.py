"""The official `openai` SDK against the gateway's `/v1/chat/completions`.

`oa/<scenario>` reaches the mock through an OpenAI-format deployment (same dialect, relayed),
`an/<scenario>` through an Anthropic-format one (translated both ways), `mock/fast` is the
gateway's in-process simulated provider. Expected texts and usage figures come from the
mock's documented rules (mockrules.py).
"""

from __future__ import annotations

import json

import openai
import pytest

import mockrules

USER_TEXT = "Hello there, how are you doing today?"
MESSAGES = [{"role": "user", "content": USER_TEXT}]
PROMPT_TOKENS = mockrules.prompt_tokens(USER_TEXT)

UPSTREAM_MODELS = ["oa/normal", "an/normal"]
ALL_MODELS = [*UPSTREAM_MODELS, "mock/fast"]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["location"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Local time in a city.",
            "parameters": {
                "type": "object",
                "properties": {"location": {"type": "string"}, "unit": {"type": "string"}},
                "required": ["location"],
            },
        },
    },
]
TOOL_NAMES = ["get_weather", "get_time"]


def collect(stream) -> tuple[list, str, list[str]]:
    """All chunks, the concatenated content and every finish_reason seen."""
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    return chunks, content, finishes


def assert_usage(usage, prompt: int, completion: int, cached: int | None = None) -> None:
    assert usage is not None, "no usage reported"
    assert usage.prompt_tokens == prompt
    assert usage.completion_tokens == completion
    assert usage.total_tokens == prompt + completion
    if cached is not None:
        assert usage.prompt_tokens_details is not None, "no prompt_tokens_details"
        assert usage.prompt_tokens_details.cached_tokens == cached


# ---------------------------------------------------------------------------------------
# Text: non-streaming and streaming, with and without include_usage
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ALL_MODELS)
def test_create_non_streaming(oai: openai.OpenAI, model: str) -> None:
    completion = oai.chat.completions.create(model=model, messages=MESSAGES)

    assert completion.object == "chat.completion"
    assert completion.id
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert choice.message.content
    assert not choice.message.tool_calls
    if model in UPSTREAM_MODELS:
        assert choice.message.content == mockrules.reply_text()
        assert_usage(completion.usage, PROMPT_TOKENS, mockrules.CHUNKS, cached=0)
    else:
        usage = completion.usage
        assert usage is not None
        assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("model", ALL_MODELS)
def test_stream_without_include_usage_has_no_usage_chunk(oai: openai.OpenAI, model: str) -> None:
    stream = oai.chat.completions.create(model=model, messages=MESSAGES, stream=True)
    chunks, content, finishes = collect(stream)

    assert chunks, "empty stream"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1, "chunks of one completion must share one id"
    assert [c for c in chunks if not c.choices] == [], "usage-only chunk sent without include_usage"
    usages = [c.usage for c in chunks if c.usage is not None]
    assert usages == [], "usage sent without include_usage"
    assert finishes == ["stop"]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert content
    if model in UPSTREAM_MODELS:
        assert content == mockrules.reply_text()


@pytest.mark.parametrize("model", ALL_MODELS)
def test_stream_include_usage_matches_non_streaming(oai: openai.OpenAI, model: str) -> None:
    stream = oai.chat.completions.create(
        model=model, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks, content, finishes = collect(stream)

    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1, f"expected one usage chunk, got {len(usage_chunks)}"
    last = chunks[-1]
    assert last is usage_chunks[0], "the usage chunk must be the last one"
    assert last.choices == []
    assert finishes == ["stop"]

    reference = oai.chat.completions.create(model=model, messages=MESSAGES)
    assert content == reference.choices[0].message.content
    assert last.usage.prompt_tokens == reference.usage.prompt_tokens
    assert last.usage.completion_tokens == reference.usage.completion_tokens
    assert last.usage.total_tokens == reference.usage.total_tokens
    if model in UPSTREAM_MODELS:
        assert_usage(last.usage, PROMPT_TOKENS, mockrules.CHUNKS, cached=0)


@pytest.mark.parametrize("model", UPSTREAM_MODELS)
@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_max_tokens_gives_finish_reason_length(
    oai: openai.OpenAI, model: str, stream: bool
) -> None:
    if stream:
        chunks, content, finishes = collect(
            oai.chat.completions.create(
                model=model,
                messages=MESSAGES,
                max_tokens=5,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        usage = chunks[-1].usage
    else:
        completion = oai.chat.completions.create(
            model=model, messages=MESSAGES, max_completion_tokens=5
        )
        content = completion.choices[0].message.content
        finishes = [completion.choices[0].finish_reason]
        usage = completion.usage
    assert finishes == ["length"]
    assert content == mockrules.reply_text(5)
    assert_usage(usage, PROMPT_TOKENS, 5)


@pytest.mark.parametrize("model", ["oa/cached", "an/cached"])
@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_cached_tokens(oai: openai.OpenAI, model: str, stream: bool) -> None:
    # OpenAI counts cached tokens inside prompt_tokens; Anthropic reports them apart
    # (input_tokens + cache_read_input_tokens): both must come out the OpenAI way.
    if stream:
        chunks, _, _ = collect(
            oai.chat.completions.create(
                model=model, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
        )
        usage = chunks[-1].usage
    else:
        usage = oai.chat.completions.create(model=model, messages=MESSAGES).usage
    assert PROMPT_TOKENS // 2 > 0
    assert_usage(usage, PROMPT_TOKENS, mockrules.CHUNKS, cached=PROMPT_TOKENS // 2)


@pytest.mark.parametrize("include_usage", [False, True])
def test_usage_riding_on_the_finish_chunk(oai: openai.OpenAI, include_usage: bool) -> None:
    # This upstream puts `usage` on the chunk that carries finish_reason.
    kwargs = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks, content, finishes = collect(
        oai.chat.completions.create(
            model="oa/usage-in-last-choice-chunk", messages=MESSAGES, stream=True, **kwargs
        )
    )
    assert content == mockrules.reply_text()
    assert finishes == ["stop"]
    usages = [c.usage for c in chunks if c.usage is not None]
    if include_usage:
        assert len(usages) == 1
        assert_usage(usages[0], PROMPT_TOKENS, mockrules.CHUNKS)
    else:
        assert usages == [], "usage must be stripped when the client did not ask for it"


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_anthropic_split_usage_final_figures_win(oai: openai.OpenAI, stream: bool) -> None:
    expected_prompt = PROMPT_TOKENS + mockrules.SPLIT_EXTRA_INPUT_TOKENS
    if stream:
        chunks, _, _ = collect(
            oai.chat.completions.create(
                model="an/anthropic-usage-split",
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        usage = chunks[-1].usage
    else:
        usage = oai.chat.completions.create(
            model="an/anthropic-usage-split", messages=MESSAGES
        ).usage
    assert_usage(usage, expected_prompt, mockrules.CHUNKS)


@pytest.mark.parametrize("model", ["oa/split-frames", "an/split-frames"])
def test_stream_with_split_frames(oai: openai.OpenAI, model: str) -> None:
    # CRLF line endings, comment lines and frames cut across TCP writes upstream.
    chunks, content, finishes = collect(
        oai.chat.completions.create(
            model=model, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    assert content == mockrules.reply_text()
    assert finishes == ["stop"]
    assert_usage(chunks[-1].usage, PROMPT_TOKENS, mockrules.CHUNKS)


def test_system_prompt_is_forwarded_to_anthropic(oai: openai.OpenAI) -> None:
    # The mock counts the top-level `system` too: a dropped system prompt changes the count.
    system = "You are a terse assistant who answers in one line."
    completion = oai.chat.completions.create(
        model="an/normal",
        messages=[{"role": "system", "content": system}, *MESSAGES],
    )
    assert completion.usage.prompt_tokens == mockrules.prompt_tokens(system, USER_TEXT)


# ---------------------------------------------------------------------------------------
# Tool calls
# ---------------------------------------------------------------------------------------


def accumulate_tool_calls(chunks) -> dict[int, dict]:
    calls: dict[int, dict] = {}
    for chunk in chunks:
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            if delta.id:
                assert call["id"] is None, f"tool call {delta.index} got a second id"
                call["id"] = delta.id
            if delta.function is not None:
                if delta.function.name:
                    call["name"] += delta.function.name
                if delta.function.arguments:
                    call["arguments"] += delta.function.arguments
    return calls


@pytest.mark.parametrize("model", ["oa/tools", "an/tools"])
def test_stream_parallel_tool_calls(oai: openai.OpenAI, model: str) -> None:
    chunks, content, finishes = collect(
        oai.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Weather and time in Paris and Tokyo?"}],
            tools=TOOLS,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    calls = accumulate_tool_calls(chunks)
    assert sorted(calls) == [0, 1], f"tool call indexes: {sorted(calls)}"
    assert [calls[i]["name"] for i in (0, 1)] == TOOL_NAMES
    ids = [calls[i]["id"] for i in (0, 1)]
    assert all(ids) and ids[0] != ids[1], f"tool call ids: {ids}"
    for i in (0, 1):
        assert json.loads(calls[i]["arguments"]) == mockrules.TOOL_CALL_INPUTS[i]
    assert finishes == ["tool_calls"]
    if model.startswith("an/"):
        assert content == mockrules.TOOL_PREAMBLE
        expected_output = mockrules.tool_output_tokens(with_text_preamble=True)
    else:
        assert content == ""
        expected_output = mockrules.tool_output_tokens(with_text_preamble=False)
    prompt = mockrules.prompt_tokens("Weather and time in Paris and Tokyo?")
    assert_usage(chunks[-1].usage, prompt, expected_output)


@pytest.mark.parametrize("model", ["oa/tools", "an/tools"])
def test_non_streaming_parallel_tool_calls(oai: openai.OpenAI, model: str) -> None:
    completion = oai.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Weather and time in Paris and Tokyo?"}],
        tools=TOOLS,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 2
    assert [c.function.name for c in calls] == TOOL_NAMES
    assert all(c.type == "function" and c.id for c in calls)
    assert calls[0].id != calls[1].id
    assert [json.loads(c.function.arguments) for c in calls] == mockrules.TOOL_CALL_INPUTS


@pytest.mark.parametrize("model", ["oa/tools", "an/tools"])
def test_stream_helper_final_completion(oai: openai.OpenAI, model: str) -> None:
    with oai.chat.completions.stream(
        model=model,
        messages=[{"role": "user", "content": "Weather and time in Paris and Tokyo?"}],
        tools=TOOLS,
    ) as stream:
        argument_events = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    assert [e.name for e in argument_events] == TOOL_NAMES
    assert [json.loads(e.arguments) for e in argument_events] == mockrules.TOOL_CALL_INPUTS
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [c.function.name for c in choice.message.tool_calls] == TOOL_NAMES
    assert [json.loads(c.function.arguments) for c in choice.message.tool_calls] == (
        mockrules.TOOL_CALL_INPUTS
    )


def test_tool_result_round_trip_to_anthropic(oai: openai.OpenAI) -> None:
    # A follow-up turn carrying the assistant's tool calls and their results must be
    # translated into tool_use / tool_result blocks the upstream accepts.
    first = oai.chat.completions.create(
        model="an/tools",
        messages=[{"role": "user", "content": "Weather in Paris and Tokyo?"}],
        tools=TOOLS,
    )
    message = first.choices[0].message
    results = [
        {"role": "tool", "tool_call_id": call.id, "content": f"result {i}: 21 C"}
        for i, call in enumerate(message.tool_calls)
    ]
    follow_up = oai.chat.completions.create(
        model="an/normal",
        messages=[
            {"role": "user", "content": "Weather in Paris and Tokyo?"},
            message.model_dump(exclude_none=True),
            *results,
        ],
        tools=TOOLS,
    )
    assert follow_up.choices[0].finish_reason == "stop"
    assert follow_up.choices[0].message.content == mockrules.reply_text()
    # The mock counts user text, assistant text and nested tool_result text.
    expected_prompt = mockrules.prompt_tokens(
        "Weather in Paris and Tokyo?",
        message.content or "",
        *(r["content"] for r in results),
    )
    assert follow_up.usage.prompt_tokens == expected_prompt


@pytest.mark.parametrize("model", ALL_MODELS)
@pytest.mark.parametrize("include_usage", [False, True])
def test_raw_stream_ends_with_done(oai: openai.OpenAI, model: str, include_usage: bool) -> None:
    # SDKs and load tools treat a stream without the `[DONE]` terminator as incomplete.
    kwargs = {"stream_options": {"include_usage": True}} if include_usage else {}
    with oai.chat.completions.with_streaming_response.create(
        model=model, messages=MESSAGES, stream=True, **kwargs
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(response.iter_bytes()).decode()
    events = [e for e in raw.replace("\r\n", "\n").split("\n\n") if e.strip()]
    data = [
        line.removeprefix("data:").strip()
        for e in events
        for line in e.split("\n")
        if line.startswith("data:")
    ]
    assert data[-1] == "[DONE]"
    assert data.count("[DONE]") == 1
    payloads = [json.loads(d) for d in data[:-1]]
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)
    has_usage = [p for p in payloads if p.get("usage")]
    assert len(has_usage) == (1 if include_usage else 0)
