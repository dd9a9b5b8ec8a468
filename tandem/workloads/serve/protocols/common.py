"""Parsing helpers shared by the protocols: JSON bodies and pydantic errors -> `InvalidInput`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from tandem.workloads.serve.errors import InvalidInput

M = TypeVar("M", bound=BaseModel)

#: The message of a request field this server does not implement (pydantic's `extra_forbidden`).
NOT_SUPPORTED = "not supported by this server (docs/serving.md lists what is); leave it out"


@dataclass(frozen=True)
class BinaryAnswer:
    """A non-JSON answer body (the Open Inference Protocol's binary tensor data) and its headers."""

    body: bytes
    headers: tuple[tuple[str, str], ...]


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise InvalidInput("body", "empty; send a JSON object")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise InvalidInput("body", f"not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise InvalidInput("body", f"expected a JSON object, got {type(data).__name__}")
    return data


def field_path(loc: tuple[int | str, ...]) -> str:
    """`('inputs', 0, 'shape')` -> `inputs[0].shape`."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


def validate(model: type[M], data: dict[str, Any]) -> M:
    """The wire model, or `InvalidInput` naming the first bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = NOT_SUPPORTED
        raise InvalidInput(field_path(tuple(error["loc"])), message) from None
