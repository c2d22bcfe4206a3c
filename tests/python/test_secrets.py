"""The upstream credential never leaves the gateway: not in its logs (written at `debug`),
not in any response body a client sees. Tenant keys are not logged either.

This module runs after the others (files are collected in name order), so its scan covers
every response of the session; it also makes its own requests through every path that
relays upstream text (success, upstream errors, mid-stream errors, timeouts) so that it
means something when run alone.
"""

from __future__ import annotations

import anthropic
import openai
import pytest

from harness import Gateway, ResponseLog

MESSAGES = [{"role": "user", "content": "Hello there, how are you doing today?"}]


def exercise(oai: openai.OpenAI, ant: anthropic.Anthropic) -> None:
    for model in ["oa/normal", "an/normal", "oa/tools", "an/cached"]:
        oai.chat.completions.create(model=model, messages=MESSAGES)
        list(oai.chat.completions.create(model=model, messages=MESSAGES, stream=True))
        ant.messages.create(model=model, max_tokens=64, messages=MESSAGES)
        with ant.messages.stream(model=model, max_tokens=64, messages=MESSAGES) as s:
            s.get_final_message()
    for model in [
        "oa/rate-limited",
        "an/rate-limited",
        "oa/server-error",
        "an/overloaded",
        "oa/bad-request",
        "an/bad-request",
    ]:
        with pytest.raises(openai.APIStatusError):
            oai.chat.completions.create(model=model, messages=MESSAGES)
        with pytest.raises(anthropic.APIStatusError):
            ant.messages.create(model=model, max_tokens=64, messages=MESSAGES)
    for model in ["oa/error-midstream", "an/error-midstream"]:
        with pytest.raises(openai.APIError):
            list(oai.chat.completions.create(model=model, messages=MESSAGES, stream=True))
    oai.embeddings.create(model="oa/normal", input=["a", "b"])
    with pytest.raises(openai.RateLimitError):
        oai.embeddings.create(model="oa/rate-limited", input=["a"])


def test_upstream_key_never_leaks(
    gateway: Gateway, oai: openai.OpenAI, ant: anthropic.Anthropic, response_log: ResponseLog
) -> None:
    exercise(oai, ant)

    secret = gateway.upstream_key
    # The random tail alone, in case a log redacts only the prefix.
    tail = secret.rsplit("-", 1)[-1]
    assert len(tail) >= 16

    log = gateway.log_text()
    # Proof this is the log of the requests above: each completion is logged.
    assert "model=an/overloaded" in log and "model=oa/error-midstream" in log, (
        "the gateway's log does not show the requests just made: nothing was checked"
    )
    assert tail not in log, "the upstream credential appears in the gateway's log"
    stdout = gateway.stdout_path.read_text(errors="replace")
    assert tail not in stdout, "the upstream credential appears on the gateway's stdout"

    seen = response_log.all_bytes()
    assert len(seen) > 10_000, "too few response bytes were recorded to mean anything"
    assert tail.encode() not in seen, "the upstream credential appears in a response body"


def test_tenant_key_not_logged(gateway: Gateway, oai: openai.OpenAI) -> None:
    oai.chat.completions.create(model="mock/fast", messages=MESSAGES)
    key = gateway.key
    # The key's random body (after the `tg_` prefix) must not be in the log.
    assert key[3:] not in gateway.log_text(), "a tenant's secret key appears in the gateway's log"
