"""`GET /v1/models` with both SDKs and `POST /v1/embeddings` with the `openai` SDK."""

from __future__ import annotations

import base64
import math
import struct

import anthropic
import openai
import pytest

# Vector size the mock upstream returns unless `dimensions` asks otherwise.
MOCK_EMBEDDING_DIMENSIONS = 8
BUILTIN_MODELS = {"mock/fast", "mock/echo", "mock/embed"}


def test_openai_models_list(oai: openai.OpenAI) -> None:
    models = list(oai.models.list())
    ids = {m.id for m in models}
    assert BUILTIN_MODELS <= ids, f"missing: {BUILTIN_MODELS - ids}"
    assert all(m.object == "model" for m in models)
    assert len(ids) == len(models), "duplicate model ids"


def test_anthropic_models_list(ant: anthropic.Anthropic) -> None:
    page = ant.models.list()
    ids = {m.id for m in page.data}
    assert BUILTIN_MODELS <= ids, f"missing: {BUILTIN_MODELS - ids}"
    assert all(m.type == "model" for m in page.data)
    assert page.has_more is False
    # Auto-pagination must terminate on the gateway's single page.
    assert {m.id for m in ant.models.list()} == ids


def as_floats(embedding) -> list[float]:
    """The vector; an explicitly requested base64 embedding is left encoded by the SDK
    (little-endian f32s), so decode it here."""
    if isinstance(embedding, str):
        raw = base64.b64decode(embedding)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return embedding


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


@pytest.mark.parametrize("encoding_format", [None, "float", "base64"])
def test_embeddings_upstream(oai: openai.OpenAI, encoding_format: str | None) -> None:
    # Unasked, the SDK requests base64 and decodes it itself; asked for explicitly, base64
    # is handed back encoded; "float" is the JSON-array form.
    kwargs = {"encoding_format": encoding_format} if encoding_format else {}
    response = oai.embeddings.create(model="oa/normal", input=["a", "b"], **kwargs)
    assert response.object == "list"
    assert [d.index for d in response.data] == [0, 1]
    if encoding_format == "base64":
        assert all(isinstance(d.embedding, str) for d in response.data)
    vectors = [as_floats(d.embedding) for d in response.data]
    assert all(isinstance(v, list) for v in vectors)
    assert [len(v) for v in vectors] == [MOCK_EMBEDDING_DIMENSIONS] * 2
    for v in vectors:
        assert abs(norm(v) - 1.0) < 1e-4, "the mock returns unit vectors"
    assert vectors[0] != vectors[1]
    # Each input counts max(1, chars / 4) tokens at the mock.
    assert response.usage.prompt_tokens == 2
    assert response.usage.total_tokens == 2


def test_embeddings_upstream_are_deterministic_across_formats(oai: openai.OpenAI) -> None:
    as_float = oai.embeddings.create(model="oa/normal", input=["a", "b"], encoding_format="float")
    as_base64 = oai.embeddings.create(model="oa/normal", input=["a", "b"], encoding_format="base64")
    for f, b in zip(as_float.data, as_base64.data):
        assert as_floats(b.embedding) == pytest.approx(f.embedding, abs=1e-6)


def test_embeddings_dimensions_passed_upstream(oai: openai.OpenAI) -> None:
    response = oai.embeddings.create(model="oa/normal", input="hello", dimensions=4)
    assert len(response.data) == 1
    assert len(response.data[0].embedding) == 4


def test_embeddings_builtin(oai: openai.OpenAI) -> None:
    response = oai.embeddings.create(model="mock/embed", input=["a", "b"])
    assert [d.index for d in response.data] == [0, 1]
    vectors = [d.embedding for d in response.data]
    assert len(vectors[0]) > 0 and len(vectors[0]) == len(vectors[1])
    assert all(isinstance(x, float) for x in vectors[0])
    assert response.usage.prompt_tokens > 0


def test_embeddings_upstream_error(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as err:
        oai.embeddings.create(model="oa/rate-limited", input=["a"])
    assert err.value.status_code == 429


def test_embeddings_unknown_model(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        oai.embeddings.create(model="no-such-embedder", input=["a"])
    assert err.value.status_code == 404
