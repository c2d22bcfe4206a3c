"""What the mock upstream answers, as its documentation states it (tests/src/mock_upstream/
text.rs and scenario.rs), so tests can predict exact text, tool calls and usage numbers.

Kept deliberately small: if the mock's rules change, these few lines change with them.
"""

from __future__ import annotations

import json

# Content chunks per text reply: the mock's default `--chunks`.
CHUNKS = 20

# In-stream failures (`error-midstream`) come after this many content chunks.
CHUNKS_BEFORE_FAILURE = 3

# `anthropic-usage-split`: message_delta reports this many more input tokens than message_start.
SPLIT_EXTRA_INPUT_TOKENS = 10

_WORDS = [
    " world", " this", " is", " a", " test", " of", " the", " stream", " and", " it", " goes",
    " on", " for", " a", " while", ".",
]

# The two parallel tool calls of the `tools` scenario (compact JSON, in order).
TOOL_CALL_ARGUMENTS = [
    '{"location":"Paris, France","unit":"celsius"}',
    '{"location":"Tokyo, Japan","unit":"celsius"}',
]
TOOL_CALL_INPUTS = [json.loads(a) for a in TOOL_CALL_ARGUMENTS]

# The text the Anthropic `tools` reply says before its tool_use blocks.
TOOL_PREAMBLE = "I'll check the weather in both cities."

# Argument fragments are this many characters long (the last may be shorter).
_TOOL_FRAGMENT_CHARS = 7


def reply_piece(i: int) -> str:
    return "Hello" if i == 0 else _WORDS[(i - 1) % len(_WORDS)]


def reply_text(pieces: int = CHUNKS) -> str:
    """The full text of a reply made of `pieces` content chunks."""
    return "".join(reply_piece(i) for i in range(pieces))


def prompt_tokens(*texts: str) -> int:
    """The mock's prompt token rule: all prompt characters / 4, rounded down, at least 1.

    Pass every system and message text of the request.
    """
    return max(1, sum(len(t) for t in texts) // 4)


def tool_output_tokens(with_text_preamble: bool) -> int:
    """Output tokens of a `tools` reply: one per argument fragment (+3 preamble pieces)."""
    fragments = sum(-(-len(a) // _TOOL_FRAGMENT_CHARS) for a in TOOL_CALL_ARGUMENTS)
    return fragments + (3 if with_text_preamble else 0)
