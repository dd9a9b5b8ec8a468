"""OpenAI-compatible endpoints: `/v1/models`, `/v1/embeddings` and `/v1/completions` (with streaming)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from tandem.workloads.serve.dataplane import DataPlane
from tandem.workloads.serve.errors import (
    InvalidInput,
    ModelError,
    ModelNotFound,
    RequestTimeout,
    ServeError,
)
from tandem.workloads.serve.generation import GenerationHandle, SamplingParams, TokenEvent, collect
from tandem.workloads.serve.protocols.common import parse_json_object, validate

if TYPE_CHECKING:
    from tandem.workloads.serve.http import EventStream

#: OpenAI's own limit on inputs per embeddings request.
MAX_INPUTS = 2048
CREATED = int(time.time())


def _string_list(value: Any, *, most: int, what: str) -> list[str]:
    """A string or a non-empty list of non-empty strings, at most `most` of them (token arrays refused)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ValueError("must be a string or a list of strings")  # pydantic turns ValueError into a 400
    if not value:
        raise ValueError("must not be an empty list")
    if len(value) > most:
        raise ValueError(f"at most {most} {what} per request")
    for index, item in enumerate(value):
        if isinstance(item, int | list) and not isinstance(item, bool):
            raise ValueError("token arrays are not supported; send text")
        if not isinstance(item, str):
            raise ValueError(f"item {index} is {type(item).__name__}, expected a string")
        if not item:
            raise ValueError(f"item {index} is an empty string")
    return value


def _texts(value: Any) -> list[str]:
    return _string_list(value, most=MAX_INPUTS, what="strings")


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: Annotated[list[str], BeforeValidator(_texts)]
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1, strict=True)] | None = None
    user: StrictStr | None = None


def check_model(plane: DataPlane, requested: str | None) -> None:
    if requested is not None and requested != plane.model.name:
        raise ModelNotFound(
            f"model {requested!r} is not served here; this server serves {plane.model.name!r}"
        )


def models(plane: DataPlane) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": plane.model.name, "object": "model", "created": CREATED, "owned_by": "tandem"}],
    }


def _encode(vector: np.ndarray[Any, Any], encoding: str) -> np.ndarray[Any, Any] | str:
    """The vector as the response carries it: base64 of little-endian float32, or the array itself (the
    JSON encoder writes numpy arrays directly, much faster than a list of Python floats)."""
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    if not np.isfinite(vector).all():
        raise ModelError("the model produced NaN or infinity in an embedding, which JSON cannot carry")
    return vector


async def embeddings(plane: DataPlane, body: bytes) -> dict[str, Any]:
    request = validate(EmbeddingsRequest, parse_json_object(body))
    check_model(plane, request.model)
    dimensions = int(getattr(plane.model, "dimensions", 0))
    if request.dimensions is not None and request.dimensions != dimensions:
        raise InvalidInput("dimensions", f"this model makes {dimensions}-dimensional vectors only")
    results = await plane.infer(request.input)
    tokens = sum(r.tokens for r in results)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _encode(r.vector, request.encoding_format)}
            for i, r in enumerate(results)
        ],
        "model": plane.model.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


# -- completions ------------------------------------------------------------------------------------

#: Most prompts in one completions request, and most stop strings (OpenAI's limit).
MAX_PROMPTS = 64
MAX_STOPS = 4
MAX_TOKENS = 4096
#: Most entries in `logit_bias`, and the bias range (OpenAI's: -100 bans a token, +100 all but forces it).
MAX_LOGIT_BIAS = 300
LOGIT_BIAS_RANGE = 100.0


def _prompts(value: Any) -> list[str]:
    return _string_list(value, most=MAX_PROMPTS, what="prompts")


def _stops(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError("must be a non-empty string or a list of non-empty strings")
    if len(value) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop strings")
    return value


def _logit_bias(value: Any) -> dict[int, float] | None:
    """JSON object keys are strings: `{"257": -100}` -> `{257: -100.0}`."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError('must be an object mapping token ids to biases, e.g. {"257": -100}')
    if len(value) > MAX_LOGIT_BIAS:
        raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens (it has {len(value)})")
    biases: dict[int, float] = {}
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit()):
            raise ValueError(f"key {key!r} is not a token id (a non-negative integer, as a string)")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not abs(bias) <= LOGIT_BIAS_RANGE:
            raise ValueError(f"token {key}: the bias must be a number from -100 to 100, not {bias!r}")
        biases[int(key)] = float(bias)
    return biases


class CompletionsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: Annotated[list[str], BeforeValidator(_prompts)]
    model: StrictStr | None = None
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS, strict=True)] = 16
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    seed: StrictInt | None = None
    stop: Annotated[list[str] | None, BeforeValidator(_stops)] = None
    logit_bias: Annotated[dict[int, float] | None, BeforeValidator(_logit_bias)] = None
    stream: StrictBool = False
    n: Annotated[int, Field(ge=1, le=1, strict=True)] = 1
    echo: Literal[False] = False
    user: StrictStr | None = None


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def completions(plane: DataPlane, body: bytes) -> dict[str, Any] | EventStream:
    from tandem.workloads.serve.http import EventStream, error_parts

    request = validate(CompletionsRequest, parse_json_object(body))
    check_model(plane, request.model)
    scheduler = plane.generator()
    model = scheduler.model
    prompts = [model.encode(p) for p in request.prompt]
    bias = request.logit_bias or {}
    if bias and (highest := max(bias)) >= model.vocab_size:
        raise InvalidInput(
            "logit_bias",
            f"token {highest} is not in this model's vocabulary (ids 0-{model.vocab_size - 1})",
        )
    params = SamplingParams(
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        stop=tuple(request.stop or ()),
        logit_bias=tuple(bias.items()),
    )
    handle = scheduler.submit(prompts, params, stream=request.stream)
    head = {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": plane.model.name,
    }
    timeout_s = plane.batching.timeout_s
    if not request.stream:
        try:
            events = await collect(handle, len(prompts), timeout_s)
        finally:
            handle.cancel()
        generated = sum(e.completion_tokens for e in events)
        return {
            **head,
            "choices": [_choice(e) for e in events],
            "usage": _usage(handle, generated),
        }

    # Wait for the first event before answering, so that a timeout or a model error before the first
    # token is still a proper HTTP status rather than an error inside a 200 stream.
    try:
        async with asyncio.timeout(timeout_s):
            first = await handle.next_event()
    except TimeoutError:
        handle.cancel()
        raise RequestTimeout(f"no first token within {timeout_s:g} s (the server is overloaded)") from None
    except BaseException:
        handle.cancel()
        raise

    async def chunks() -> AsyncIterator[bytes]:
        event = first
        generated: dict[int, int] = {}
        try:
            while event is not None:
                generated[event.index] = event.completion_tokens
                yield _sse({**head, "choices": [_choice(event)]})
                event = await handle.next_event()
        except ServeError as exc:
            _, _, error = error_parts(exc, "openai")
            yield _sse(error)
        yield _sse({**head, "choices": [], "usage": _usage(handle, sum(generated.values()))})
        yield b"data: [DONE]\n\n"

    return EventStream(chunks(), close=handle.cancel)


def _choice(event: TokenEvent) -> dict[str, Any]:
    return {"text": event.text, "index": event.index, "logprobs": None, "finish_reason": event.finish_reason}


def _usage(handle: GenerationHandle, generated: int) -> dict[str, int]:
    prompt = handle.prompt_tokens
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}
