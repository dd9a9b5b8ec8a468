"""OpenAI-compatible endpoints: `/v1/models` and `/v1/embeddings`."""

from __future__ import annotations

import base64
import time
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictStr

from tandem.workloads.serve.dataplane import DataPlane
from tandem.workloads.serve.errors import InvalidInput, ModelNotFound
from tandem.workloads.serve.protocols.common import parse_json_object, validate

#: OpenAI's own limit on inputs per embeddings request.
MAX_INPUTS = 2048
CREATED = int(time.time())


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ValueError("must be a string or a list of strings")  # pydantic turns ValueError into a 400
    if not value:
        raise ValueError("must not be an empty list")
    if len(value) > MAX_INPUTS:
        raise ValueError(f"at most {MAX_INPUTS} strings per request")
    for index, item in enumerate(value):
        if isinstance(item, int | list) and not isinstance(item, bool):
            raise ValueError("token arrays are not supported; send text")
        if not isinstance(item, str):
            raise ValueError(f"item {index} is {type(item).__name__}, expected a string")
        if not item:
            raise ValueError(f"item {index} is an empty string")
    return value


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


def _encode(vector: np.ndarray[Any, Any], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    values: list[float] = vector.tolist()
    return values


async def embeddings(plane: DataPlane, body: bytes) -> dict[str, Any]:
    request = validate(EmbeddingsRequest, parse_json_object(body))
    check_model(plane, request.model)
    dimensions = int(plane.model.metadata().get("dimensions", 0))
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
