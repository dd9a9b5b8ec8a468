"""OpenAI's `/v1/chat/completions` for the causal-lm runtime: messages -> one prompt through a chat template,
then the same generation as `/v1/completions` (`protocols.openai.generate`).

The template is the model's own when it declares one: a `chat_template.jinja` file (Hugging Face's format:
`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`) in the checkpoint directory,
or in the checkpoint root above a `step-*` directory. Otherwise `DEFAULT_TEMPLATE`, for the built-in
byte-level GPT (which has no special tokens for turns): every message as `Role: content` and a blank line,
then `Assistant:`; generation stops where the model starts a new `User:` or `System:` turn. Templates run in
Jinja's sandbox, as Hugging Face runs them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, model_validator

from tandem.workloads.serve.dataplane import DataPlane
from tandem.workloads.serve.errors import InvalidInput
from tandem.workloads.serve.generation import GenerativeModel, TokenEvent, TokenLogprob, prompt_ids
from tandem.workloads.serve.protocols.common import parse_json_object, request_id, validate
from tandem.workloads.serve.protocols.openai import (
    MAX_LOGPROBS,
    MAX_TOKENS,
    GenerationRequest,
    check_model,
    check_vocabulary,
    generate,
    token_text,
)

if TYPE_CHECKING:
    from jinja2 import Template

    from tandem.workloads.serve.http import EventStream

TEMPLATE_FILE: Final = "chat_template.jinja"
#: The built-in byte-level GPT's template (docs/serving.md shows what it renders).
DEFAULT_TEMPLATE: Final = (
    "{% for message in messages %}{{ message.role | capitalize }}: {{ message.content }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
#: Where the default template's answer ends: the model starting the next turn.
DEFAULT_STOPS: Final = ("\nUser:", "\nSystem:")
#: Roles a message may have; `developer` is OpenAI's newer name for `system` and is rendered as it.
ROLES: Final = ("system", "developer", "user", "assistant")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: StrictStr
    content: StrictStr | list[TextPart]

    @model_validator(mode="after")
    def _known_role(self) -> Message:
        if self.role not in ROLES:
            raise ValueError(
                f"role {self.role!r} is not supported; use one of {', '.join(ROLES)} (no tool calling here)"
            )
        return self

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(GenerationRequest):
    messages: Annotated[list[Message], Field(min_length=1, max_length=2048)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS, strict=True)] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS, strict=True)] | None = None

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidInput("top_logprobs", "needs logprobs: true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise InvalidInput(
                "max_tokens", "give max_completion_tokens or max_tokens (deprecated), not both"
            )


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    stops: tuple[str, ...]
    origin: str
    """Where it came from (for error messages): a file path or `the default template`."""


def find_template(model_dir: Path | None) -> ChatTemplate:
    """The model's declared template (`chat_template.jinja`) or the documented default."""
    if model_dir is not None:
        candidates = [model_dir]
        if model_dir.name.startswith("step-"):
            candidates.append(model_dir.parent)
        for directory in candidates:
            path = directory / TEMPLATE_FILE
            if path.is_file():
                return ChatTemplate(path.read_text(encoding="utf-8"), (), str(path))
    return ChatTemplate(DEFAULT_TEMPLATE, DEFAULT_STOPS, "the default template")


class TemplateError(Exception):
    """`raise_exception(...)` in a template: the messages do not fit it."""


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


@cache
def compiled(source: str) -> Template:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = _raise_exception
    return environment.from_string(source)


def render(template: ChatTemplate, messages: list[Message]) -> str:
    """The prompt for `messages` (`developer` rendered as `system`); a template's refusal is a 400."""
    from jinja2 import TemplateError as JinjaError

    plain = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    try:
        return compiled(template.source).render(
            messages=plain, add_generation_prompt=True, bos_token="", eos_token=""
        )
    except TemplateError as exc:
        raise InvalidInput("messages", f"{exc} ({template.origin})") from None
    except JinjaError as exc:
        raise InvalidInput("messages", f"the chat template failed: {exc} ({template.origin})") from None


def template_for(plane: DataPlane) -> ChatTemplate:
    options = getattr(plane.model, "options", None)
    return _template_at(getattr(options, "path", None))


@cache
def _template_at(path: Path | None) -> ChatTemplate:
    return find_template(path if path is not None and path.is_dir() else None)


def chat_logprobs(model: GenerativeModel, entries: tuple[TokenLogprob, ...]) -> dict[str, Any]:
    def item(token: int, logprob: float) -> dict[str, Any]:
        text, raw = token_text(model, token)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    return {
        "content": [
            {**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries
        ],
        "refusal": None,
    }


async def chat_completions(plane: DataPlane, body: bytes) -> dict[str, Any] | EventStream:
    request = validate(ChatRequest, parse_json_object(body))
    request.check()
    check_model(plane, request.model)
    model = plane.generator().model
    check_vocabulary(request, model)
    template = template_for(plane)
    prompt = render(template, request.messages)
    if not prompt:
        raise InvalidInput("messages", f"the chat template made an empty prompt ({template.origin})")
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    params = request.sampling(request.max_completion_tokens or request.max_tokens, logprobs)
    if template.stops:
        params = replace(params, stop=params.stop + template.stops)
    head = {
        "id": request_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": plane.model.name,
    }

    def formatted_logprobs(event: TokenEvent) -> dict[str, Any] | None:
        return chat_logprobs(model, event.logprobs) if request.logprobs else None

    def choice(event: TokenEvent) -> dict[str, Any]:
        return {
            "index": event.index,
            "message": {"role": "assistant", "content": event.text, "refusal": None},
            "logprobs": formatted_logprobs(event),
            "finish_reason": event.finish_reason,
        }

    def chunk_choice(event: TokenEvent) -> dict[str, Any]:
        return {
            "index": event.index,
            "delta": {"content": event.text},
            "logprobs": formatted_logprobs(event),
            "finish_reason": event.finish_reason,
        }

    chunk_head = {**head, "object": "chat.completion.chunk"}
    first = {
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ]
    }
    return await generate(
        plane,
        request,
        [prompt_ids(model, prompt)],
        params,
        head=chunk_head if request.stream else head,
        choice=choice,
        chunk_choice=chunk_choice,
        first_chunk=first,
    )
