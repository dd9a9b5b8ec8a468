"""OpenAI-compatible endpoints: `/v1/models`, `/v1/embeddings` and `/v1/completions` (with streaming); the
generation parts that `/v1/chat/completions` (`protocols.chat`) shares.

Every request model forbids fields it does not know, so a parameter this server does not implement is a 400
that names it instead of being silently ignored."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple

import numpy as np
import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
)

from tandem.workloads.serve.dataplane import DataPlane
from tandem.workloads.serve.errors import (
    InvalidInput,
    ModelError,
    ModelNotFound,
    RequestTimeout,
    ServeError,
)
from tandem.workloads.serve.generation import (
    GenerationHandle,
    GenerativeModel,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
    collect,
    prompt_ids,
)
from tandem.workloads.serve.protocols.common import parse_json_object, request_id, validate
from tandem.workloads.serve.runtimes.embeddings import Embedding
from tandem.workloads.serve.sampling import MAX_TOP_LOGPROBS

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
    model_config = ConfigDict(extra="forbid")

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


def _model_object(plane: DataPlane) -> dict[str, Any]:
    return {"id": plane.model.name, "object": "model", "created": CREATED, "owned_by": "tandem"}


def models(plane: DataPlane) -> dict[str, Any]:
    return {"object": "list", "data": [_model_object(plane)]}


def model(plane: DataPlane, model_id: str) -> dict[str, Any]:
    """`GET /v1/models/{id}`: the model object, 404 for any other id."""
    check_model(plane, model_id)
    return _model_object(plane)


class EmbeddingsCall(NamedTuple):
    """What an embeddings request asks for, from either way of reading it (`embeddings_call`)."""

    input: list[str]
    model: str | None
    encoding_format: str
    dimensions: int | None


def _encode(embedding: Embedding, encoding: str) -> np.ndarray[Any, Any] | str:
    """The vector as the response carries it: base64 of little-endian float32, or the array itself (the
    JSON encoder writes numpy arrays directly, much faster than a list of Python floats)."""
    vector = embedding.vector
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    finite = embedding.finite  # the model's check of its whole batch, if it made one
    if not (finite if finite is not None else np.isfinite(vector).all()):
        raise ModelError("the model produced NaN or infinity in an embedding, which JSON cannot carry")
    return vector


_PLAIN_EMBEDDINGS_FIELDS = frozenset(("input", "model", "encoding_format"))


def _plain_embeddings_request(data: dict[str, Any]) -> EmbeddingsCall | None:
    """The common request (`input`: a non-empty string or up to `MAX_INPUTS` of them; `model` and
    `encoding_format` valid or absent) read without pydantic's validation, which it would pass unchanged:
    validating, even `model_construct`, cost 2-4% of the event loop per request. Anything else (None) is
    validated as before, so every error is the same."""
    if not data.keys() <= _PLAIN_EMBEDDINGS_FIELDS:
        return None
    texts = data.get("input")
    if type(texts) is str:
        texts = [texts]
    elif type(texts) is not list or not 0 < len(texts) <= MAX_INPUTS:
        return None
    if not all(type(text) is str and text for text in texts):
        return None
    model = data.get("model")
    encoding = data.get("encoding_format", "float")
    if (model is not None and type(model) is not str) or encoding not in ("float", "base64"):
        return None
    return EmbeddingsCall(texts, model, encoding, None)


def embeddings_call(data: dict[str, Any]) -> EmbeddingsCall:
    """The request's fields: the common request read directly, any other validated (`EmbeddingsRequest`:
    a 400 naming the field)."""
    plain = _plain_embeddings_request(data)
    if plain is not None:
        return plain
    request = validate(EmbeddingsRequest, data)
    return EmbeddingsCall(request.input, request.model, request.encoding_format, request.dimensions)


async def embeddings(plane: DataPlane, body: bytes) -> dict[str, Any]:
    request = embeddings_call(parse_json_object(body))
    check_model(plane, request.model)
    if request.dimensions is not None:
        dimensions = int(getattr(plane.model, "dimensions", 0))
        if request.dimensions != dimensions:
            raise InvalidInput("dimensions", f"this model makes {dimensions}-dimensional vectors only")
    results: list[Embedding] = await plane.infer_many(request.input)
    tokens = sum(r.tokens for r in results)
    plane.metrics.prompt_tokens(tokens)
    encoding = request.encoding_format
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _encode(r, encoding)}
            for i, r in enumerate(results)
        ],
        "model": plane.model.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


# -- generation (completions and chat completions) ------------------------------------------------------

#: Most prompts in one completions request, and most stop strings (OpenAI's limit).
MAX_PROMPTS = 64
MAX_STOPS = 4
MAX_TOKENS = 4096
#: Most entries in `logit_bias`, and the bias range (OpenAI's: -100 bans a token, +100 all but forces it).
MAX_LOGIT_BIAS = 300
LOGIT_BIAS_RANGE = 100.0
#: Most alternatives per token in `logprobs` / `top_logprobs` (OpenAI's completions limit).
MAX_LOGPROBS = MAX_TOP_LOGPROBS
#: `seed`'s range: what a 64-bit random generator takes (negative seeds wrap around, as in torch).
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1


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


def _only(default: Any, hint: str) -> Any:
    """A validator for a parameter accepted only at its default (`null` or the default value): anything
    else is a 400 that says so, instead of being ignored."""

    def check(value: Any) -> Any:
        if value is not None and value != default:
            raise ValueError(f"only {default!r} is supported by this server; {hint}")
        return value

    return BeforeValidator(check)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False
    """Send one last chunk, before `[DONE]`, with the request's `usage` and no choices."""


Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class GenerationRequest(BaseModel):
    """Parameters that completions and chat completions share."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS, strict=True)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    seed: Annotated[StrictInt, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    stop: Annotated[list[str] | None, BeforeValidator(_stops)] = None
    logit_bias: Annotated[dict[int, float] | None, BeforeValidator(_logit_bias)] = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=1, strict=True)] | None = None
    user: StrictStr | None = None

    def check(self) -> None:
        """Rules between fields (after validation, so that the 400 names the field)."""
        if self.stream_options is not None and not self.stream:
            raise InvalidInput("stream_options", "only allowed with stream: true")

    def sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=tuple(self.stop or ()),
            logit_bias=tuple((self.logit_bias or {}).items()),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logprobs=logprobs,
        )


#: Completions' `max_tokens` default (OpenAI's).
DEFAULT_MAX_TOKENS = 16


class CompletionsRequest(GenerationRequest):
    prompt: Annotated[list[str], BeforeValidator(_prompts)]
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS, strict=True)] | None = None
    echo: Annotated[bool | None, _only(False, "the answer never repeats the prompt")] = None
    best_of: Annotated[int | None, _only(1, "ask n times and choose yourself")] = None
    suffix: Annotated[str | None, _only(None, "this model only continues text (no insertion)")] = None


def check_vocabulary(request: GenerationRequest, model: GenerativeModel) -> None:
    bias = request.logit_bias or {}
    if bias and (highest := max(bias)) >= model.vocab_size:
        raise InvalidInput(
            "logit_bias",
            f"token {highest} is not in this model's vocabulary (ids 0-{model.vocab_size - 1})",
        )


def _sse(data: dict[str, Any]) -> bytes:
    """One server-sent event: compact UTF-8 JSON written by orjson, as every other answer is (`dump_json`;
    the stdlib's encoder cost the event loop ~10x more on every streamed chunk)."""
    return b"data: " + orjson.dumps(data) + b"\n\n"


ChoiceFormat = Callable[[TokenEvent], dict[str, Any]]


async def generate(
    plane: DataPlane,
    request: GenerationRequest,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    head: dict[str, Any],
    choice: ChoiceFormat,
    chunk_choice: ChoiceFormat,
    first_chunk: dict[str, Any] | None = None,
) -> dict[str, Any] | EventStream:
    """Run one generation request: the whole answer (`choice` per sequence), or a stream of chunks
    (`chunk_choice` per event; `first_chunk` goes first, e.g. chat's assistant role). The stream ends with a
    usage chunk only when `stream_options.include_usage` asks for it (as OpenAI's API does: clients read
    `chunk.choices[0]` on every other chunk)."""
    from tandem.workloads.serve.http import EventStream, error_parts

    scheduler = plane.generator()
    handle = scheduler.submit(prompts, params, stream=bool(request.stream))
    plane.metrics.prompt_tokens(handle.prompt_tokens)
    timeout_s = plane.batching.timeout_s
    if not request.stream:
        try:
            events = await collect(handle, len(prompts), timeout_s)
        finally:
            handle.cancel()
        generated = sum(e.completion_tokens for e in events)
        return {**head, "choices": [choice(e) for e in events], "usage": _usage(handle, generated)}

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
    include_usage = request.stream_options is not None and request.stream_options.include_usage
    extra: dict[str, Any] = {"usage": None} if include_usage else {}

    # Every chunk is `{**head, "choices": [choice], **extra}`: the parts around the choice are written once
    # per request, so a token costs the encoding of its choice alone (the same bytes).
    before_choice = b"data: " + orjson.dumps(head)[:-1] + b',"choices":['
    after_choice = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"

    async def chunks() -> AsyncIterator[bytes]:
        event = first
        generated: dict[int, int] = {}
        if first_chunk is not None:
            yield _sse({**head, **first_chunk, **extra})
        try:
            while event is not None:
                generated[event.index] = event.completion_tokens
                yield before_choice + orjson.dumps(chunk_choice(event)) + after_choice
                event = await handle.next_event()
        except ServeError as exc:
            _, _, error = error_parts(exc, "openai")
            yield _sse(error)
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(handle, sum(generated.values()))})
        yield b"data: [DONE]\n\n"

    return EventStream(chunks(), close=handle.cancel)


def _usage(handle: GenerationHandle, generated: int) -> dict[str, int]:
    prompt = handle.prompt_tokens
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def token_text(model: GenerativeModel, token: int) -> tuple[str, bytes]:
    """A token as OpenAI's logprobs show it: its text, or `bytes:\\xNN` when it is part of a character."""
    to_bytes = getattr(model, "token_bytes", None)
    raw = to_bytes(token) if to_bytes is not None else model.decode([token]).encode()
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw


def completion_logprobs(
    model: GenerativeModel, entries: Sequence[TokenLogprob], offset: int
) -> dict[str, Any]:
    """The completions API's `logprobs` object; `offset` is the text offset of the first token."""
    tokens, offsets, tops = [], [], []
    for entry in entries:
        text, _ = token_text(model, entry.token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text) if not text.startswith("bytes:") else 0
        tops.append({token_text(model, t)[0]: lp for t, lp in entry.top})
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


async def completions(plane: DataPlane, body: bytes) -> dict[str, Any] | EventStream:
    request = validate(CompletionsRequest, parse_json_object(body))
    request.check()
    check_model(plane, request.model)
    scheduler = plane.generator()
    model = scheduler.model
    check_vocabulary(request, model)
    prompts = [prompt_ids(model, p) for p in request.prompt]
    params = request.sampling(request.max_tokens, request.logprobs)
    head = {
        "id": request_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": plane.model.name,
    }
    offsets = [0] * len(prompts)

    def choice(event: TokenEvent) -> dict[str, Any]:
        logprobs = None
        if request.logprobs is not None:
            logprobs = completion_logprobs(model, event.logprobs, offsets[event.index])
            offsets[event.index] += len(event.text)
        return {
            "text": event.text,
            "index": event.index,
            "logprobs": logprobs,
            "finish_reason": event.finish_reason,
        }

    return await generate(plane, request, prompts, params, head=head, choice=choice, chunk_choice=choice)
