"""The hot path's shortcuts change nothing but speed: the plain embeddings request made without pydantic is
the validated one, and orjson-first JSON parsing reads every body as the stdlib does."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from tandem.workloads.serve.errors import InvalidInput
from tandem.workloads.serve.protocols.common import parse_json_object, validate
from tandem.workloads.serve.protocols.openai import (
    EmbeddingsRequest,
    _plain_embeddings_request,
    embeddings_call,
)

PLAIN = [
    {"input": "a sentence"},
    {"input": ["one", "two"], "model": "minilm"},
    {"input": ["x"] * 2048, "encoding_format": "base64"},
    {"input": "é ✓", "model": None, "encoding_format": "float"},
]
NOT_PLAIN = [
    {"input": ""},
    {"input": []},
    {"input": ["ok", ""]},
    {"input": ["x"] * 2049},
    {"input": [1, 2]},
    {"input": [["nested"]]},
    {"input": None},
    {"input": "a", "model": 3},
    {"input": "a", "encoding_format": "int8"},
    {"input": "a", "encoding_format": ["float"]},
    {"input": "a", "dimensions": 384},
    {"input": "a", "user": "u"},
    {"input": "a", "unknown": 1},
    {"model": "minilm"},
]


@pytest.mark.parametrize("data", PLAIN, ids=lambda d: json.dumps(d)[:40])
def test_a_plain_request_is_what_validation_makes(data: dict[str, Any]) -> None:
    fast = _plain_embeddings_request(data)
    assert fast is not None
    validated = validate(EmbeddingsRequest, data)
    assert fast == (validated.input, validated.model, validated.encoding_format, validated.dimensions)
    assert embeddings_call(data) == fast


@pytest.mark.parametrize("data", NOT_PLAIN, ids=lambda d: json.dumps(d)[:40])
def test_anything_else_goes_through_validation(data: dict[str, Any]) -> None:
    assert _plain_embeddings_request(data) is None

    def validated() -> tuple[Any, ...]:
        request = validate(EmbeddingsRequest, data)
        return (request.input, request.model, request.encoding_format, request.dimensions)

    assert outcome(lambda: embeddings_call(data)) == outcome(validated)


def outcome(read: Callable[[], tuple[Any, ...]]) -> tuple[Any, ...]:
    """What `read` returns, or the field and message of the 400 it raises."""
    try:
        return read()
    except InvalidInput as refused:
        return ("400", refused.field, refused.message)


BODIES = [
    b'{"input": "a", "n": 1.5e-7, "big": 123456789012345678901234567890, "u64": 18446744073709551615}',
    b'{"seed": -9223372036854775809}',
    b'{"x": NaN, "y": -Infinity}',
    b'{"s": "\\ud800 lone surrogate"}',
    b'{"a": 1, "a": 2}',
    '{"input": "utf-16"}'.encode("utf-16"),
]


@pytest.mark.parametrize("body", BODIES, ids=range(len(BODIES)))
def test_json_bodies_read_as_the_stdlib_reads_them(body: bytes) -> None:
    expected = json.loads(body)
    parsed = parse_json_object(body)
    assert json.dumps(parsed, sort_keys=True) == json.dumps(expected, sort_keys=True)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"input": ', "not valid JSON (JSONDecodeError: Expecting value: line 1 column 11"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b"\xff\xfe\x00", "not valid JSON"),
    ],
)
def test_invalid_bodies_get_the_stdlibs_message(body: bytes, message: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        parse_json_object(body)
    assert refused.value.field == "body"
    assert refused.value.message.startswith(f"body: {message}")
