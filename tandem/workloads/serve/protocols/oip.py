"""The Open Inference Protocol (KServe v2) REST API: tensor models (torchscript) and text models (embeddings,
one BYTES input `text`, one FP32 output `embedding`).

Each request's tensors are split into rows (dimension 0) so rows of concurrent requests share one forward
pass; the answer stacks the request's rows back together.

The binary tensor data extension (what `tritonclient` and perf_analyzer send by default) is supported both
ways: with an `Inference-Header-Content-Length: N` header the first N bytes of the body are the JSON request
and the rest holds, in input order, the raw little-endian bytes of every input whose `parameters` give a
`binary_data_size` (BYTES elements each as a 4-byte little-endian length and the bytes). Outputs come back
the same way when the request's `parameters.binary_data_output` or an output's `parameters.binary_data` is
true.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Final

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from tandem import __version__
from tandem.api.serving import Runtime
from tandem.workloads.serve.dataplane import DataPlane
from tandem.workloads.serve.errors import InvalidInput, ModelError, ModelNotFound
from tandem.workloads.serve.protocols.common import BinaryAnswer, parse_json_object, validate
from tandem.workloads.serve.tensors import DATATYPE_OF, DATATYPES, Row, TensorSpec

#: Most elements in one input tensor (the body size limit usually bites first).
MAX_ELEMENTS = 64 * 1024 * 1024
#: The binary extension's header: the JSON part's length in bytes (lower case: as ASGI gives headers).
HEADER_LENGTH: Final = "inference-header-content-length"
BINARY_CONTENT_TYPE: Final = "application/octet-stream"
#: The extensions `GET /v2` reports.
EXTENSIONS: Final = ["binary_tensor_data"]
#: The text runtimes' tensors (embeddings): one string per row in, one vector per row out.
TEXT_INPUT: Final = "text"
EMBEDDING_OUTPUT: Final = "embedding"


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr
    shape: list[Annotated[StrictInt, Field(ge=0)]]
    datatype: StrictStr
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None
    """JSON data; absent when `parameters.binary_data_size` says the data is in the binary part."""


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


#: The parameters this server reads, where it reads them; any other is refused by name, never ignored
#: (sequence_id, priority, timeout, shared memory, classification: not implemented here).
KNOWN_PARAMETERS: Final = {
    "request": {"binary_data_output"},
    "input": {"binary_data_size"},
    "output": {"binary_data"},
}


def check_parameters(request: InferenceRequest) -> None:
    """A 400 naming the first parameter this server does not implement."""
    places = [("parameters", request.parameters, KNOWN_PARAMETERS["request"])]
    places += [
        (f"inputs[{i}].parameters", t.parameters, KNOWN_PARAMETERS["input"])
        for i, t in enumerate(request.inputs)
    ]
    places += [
        (f"outputs[{i}].parameters", o.parameters, KNOWN_PARAMETERS["output"])
        for i, o in enumerate(request.outputs or [])
    ]
    for where, given, known in places:
        for key in given or {}:
            if key not in known:
                raise InvalidInput(f"{where}.{key}", "not supported by this server")


def server_metadata() -> dict[str, Any]:
    return {"name": "tandem", "version": __version__, "extensions": EXTENSIONS}


def check_model(plane: DataPlane, name: str, version: str | None = None) -> None:
    if name != plane.model.name:
        raise ModelNotFound(f"model {name!r} is not served here; this server serves {plane.model.name!r}")
    if version is not None and version != "1":
        raise ModelNotFound(f"model {name!r} has only version '1'")


def _text_tensors(plane: DataPlane) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    dimensions = int(getattr(plane.model, "dimensions", 0)) or -1
    return (
        [{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [-1]}],
        [{"name": EMBEDDING_OUTPUT, "datatype": "FP32", "shape": [-1, dimensions]}],
    )


def model_metadata(plane: DataPlane) -> dict[str, Any]:
    """The protocol's model metadata: the tensors `infer` takes and returns (none for causal-lm, which
    serves the OpenAI endpoints only), plus the runtime's own facts under `parameters`."""
    meta = plane.model.metadata()
    inputs, outputs = meta.get("inputs", []), meta.get("outputs", [])
    if plane.model.runtime is Runtime.EMBEDDINGS:
        inputs, outputs = _text_tensors(plane)
    extra = {k: v for k, v in meta.items() if k not in ("platform", "inputs", "outputs")}
    answer: dict[str, Any] = {
        "name": plane.model.name,
        "versions": ["1"],
        "platform": meta.get("platform", ""),
        "inputs": inputs,
        "outputs": outputs,
    }
    if extra:
        answer["parameters"] = extra
    return answer


# -- request tensors ------------------------------------------------------------------------------------


class BinaryPart:
    """The binary part of a request body, read input by input in order."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.offset = 0

    def take(self, index: int, tensor: RequestInput) -> bytes | None:
        """This input's raw bytes, or None when its data is in the JSON."""
        size = (tensor.parameters or {}).get("binary_data_size")
        where = f"inputs[{index}].parameters.binary_data_size"
        if size is None:
            if tensor.data is None:
                raise InvalidInput(f"inputs[{index}].data", "missing (send data, or binary_data_size)")
            return None
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidInput(where, f"must be a non-negative integer, not {size!r}")
        if tensor.data is not None:
            raise InvalidInput(f"inputs[{index}].data", "give either data or binary_data_size, not both")
        end = self.offset + size
        if end > len(self.data):
            raise InvalidInput(
                where,
                f"{size} bytes from offset {self.offset}, but the binary part has {len(self.data)} bytes",
            )
        raw = bytes(self.data[self.offset : end])
        self.offset = end
        return raw

    def check_used(self) -> None:
        if self.offset != len(self.data):
            raise InvalidInput(
                "body",
                f"the binary part has {len(self.data) - self.offset} bytes no input's binary_data_size "
                "accounts for",
            )


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, BinaryPart]:
    """The JSON part and the binary part of a request body."""
    if header_length is None:
        return body, BinaryPart(b"")
    if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
        raise InvalidInput(
            "Inference-Header-Content-Length",
            f"{header_length!r} is not a byte count within the {len(body)}-byte body",
        )
    length = int(header_length)
    return body[:length], BinaryPart(body[length:])


def _check_shape(where: str, shape: list[int], spec: TensorSpec) -> int:
    if not shape:
        raise InvalidInput(f"{where}.shape", "needs at least the batch dimension")
    if shape[0] == 0:
        raise InvalidInput(f"{where}.shape", "the batch dimension must be at least 1")
    if spec.shape is not None:
        declared = spec.shape
        if len(declared) != len(shape) or any(
            d not in (-1, s) for d, s in zip(declared[1:], shape[1:], strict=True)
        ):
            raise InvalidInput(f"{where}.shape", f"input {spec.name!r} takes shape {list(declared)}")
    elements = math.prod(shape)
    if elements > MAX_ELEMENTS:
        raise InvalidInput(f"{where}.shape", f"at most {MAX_ELEMENTS} elements per tensor")
    return elements


def _tensor(index: int, tensor: RequestInput, spec: TensorSpec, raw: bytes | None) -> np.ndarray[Any, Any]:
    where = f"inputs[{index}]"
    dtype = DATATYPES.get(tensor.datatype)
    if dtype is None:
        raise InvalidInput(f"{where}.datatype", f"{tensor.datatype!r} is not one of {', '.join(DATATYPES)}")
    if spec.datatype is not None and tensor.datatype != spec.datatype:
        raise InvalidInput(f"{where}.datatype", f"input {spec.name!r} takes {spec.datatype}")
    shape = tensor.shape
    elements = _check_shape(where, shape, spec)
    if raw is not None:
        if len(raw) != elements * dtype.itemsize:
            raise InvalidInput(
                f"{where}.parameters.binary_data_size",
                f"{len(raw)} bytes, shape {shape} of {tensor.datatype} needs {elements * dtype.itemsize}",
            )
        array = np.frombuffer(raw, dtype.newbyteorder("<")).astype(dtype)
    else:
        try:
            array = np.asarray(tensor.data)
        except (ValueError, TypeError, RecursionError):
            raise InvalidInput(f"{where}.data", "must be a flat (or evenly nested) list of numbers") from None
        kind = array.dtype.kind
        allowed = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}[dtype.kind]
        if array.size and kind not in allowed:
            raise InvalidInput(f"{where}.data", f"must hold {tensor.datatype} values")
        if array.size != elements:
            raise InvalidInput(f"{where}.data", f"has {array.size} values, shape {shape} needs {elements}")
        if dtype.kind in "iu" and array.size:
            info = np.iinfo(dtype)
            if array.min() < info.min or array.max() > info.max:
                raise InvalidInput(f"{where}.data", f"values out of {tensor.datatype} range")
        array = array.astype(dtype, copy=False)
    if dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInput(f"{where}.data", "holds NaN or infinity; send finite numbers")
    return array.reshape(shape)


def _inputs_by_name(request: InferenceRequest, names: list[str]) -> dict[str, int]:
    by_name: dict[str, int] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name in by_name:
            raise InvalidInput(f"inputs[{index}].name", f"input {tensor.name!r} appears twice")
        by_name[tensor.name] = index
    for name, index in by_name.items():
        if name not in names:
            raise InvalidInput(f"inputs[{index}].name", f"the model has no input {name!r}; it takes {names}")
    missing = [n for n in names if n not in by_name]
    if missing:
        raise InvalidInput("inputs", f"missing input(s) {missing}; the model takes {names}")
    return by_name


def to_rows(
    request: InferenceRequest, inputs: list[TensorSpec], binary: BinaryPart | None = None
) -> list[Row]:
    binary = binary or BinaryPart(b"")
    by_name = _inputs_by_name(request, [s.name for s in inputs])
    raws = [binary.take(i, t) for i, t in enumerate(request.inputs)]  # in request order, as sent
    binary.check_used()
    arrays = [
        _tensor(by_name[s.name], request.inputs[by_name[s.name]], s, raws[by_name[s.name]]) for s in inputs
    ]
    rows = {a.shape[0] for a in arrays}
    if len(rows) != 1:
        raise InvalidInput("inputs", f"every input needs the same batch dimension, got {sorted(rows)}")
    return [tuple(a[r] for a in arrays) for r in range(arrays[0].shape[0])]


def decode_bytes(raw: bytes, where: str) -> list[bytes]:
    """BYTES elements of the binary format: each a 4-byte little-endian length, then that many bytes."""
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput(where, f"a BYTES element's 4-byte length is cut off at byte {offset}")
        length = int.from_bytes(raw[offset : offset + 4], "little")
        offset += 4
        if offset + length > len(raw):
            raise InvalidInput(where, f"a BYTES element of {length} bytes runs past the end of the data")
        items.append(raw[offset : offset + length])
        offset += length
    return items


def to_texts(request: InferenceRequest, binary: BinaryPart) -> list[str]:
    """The strings of a text model's BYTES input `text` (shape [N] or [N, 1]), one per row."""
    _inputs_by_name(request, [TEXT_INPUT])
    tensor = request.inputs[0]
    where = "inputs[0]"
    if tensor.datatype != "BYTES":
        raise InvalidInput(f"{where}.datatype", f"input {TEXT_INPUT!r} takes BYTES (UTF-8 strings)")
    raw = binary.take(0, tensor)
    binary.check_used()
    shape = tensor.shape
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or not shape[0]:
        raise InvalidInput(f"{where}.shape", f"input {TEXT_INPUT!r} takes shape [N] or [N, 1], N >= 1")
    if raw is not None:
        items: list[Any] = decode_bytes(raw, f"{where}.parameters.binary_data_size")
    else:
        items = np.asarray(tensor.data, dtype=object).ravel().tolist() if tensor.data else []
    if len(items) != shape[0]:
        raise InvalidInput(f"{where}.data", f"has {len(items)} strings, shape {shape} needs {shape[0]}")
    texts = []
    for i, item in enumerate(items):
        text = item
        if isinstance(item, bytes):
            try:
                text = item.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(f"{where}.data[{i}]", "is not valid UTF-8") from None
        if not isinstance(text, str) or not text:
            raise InvalidInput(f"{where}.data[{i}]", "must be a non-empty string")
        texts.append(text)
    return texts


# -- answers --------------------------------------------------------------------------------------------


def _check_outputs(wanted: list[str] | None, names: list[str]) -> None:
    for index, output in enumerate(wanted or []):
        if output not in names:
            raise InvalidInput(
                f"outputs[{index}].name", f"the model has no output {output!r}; it has {names}"
            )


def _binary_wanted(request: InferenceRequest) -> dict[str, bool]:
    """Which outputs go in the binary part: the request's default, overridden per output."""
    default = (request.parameters or {}).get("binary_data_output") is True
    wanted = {o.name: (o.parameters or {}).get("binary_data", default) is True for o in request.outputs or []}
    wanted[""] = default
    return wanted


def _answer(
    plane: DataPlane, request: InferenceRequest, columns: list[tuple[str, np.ndarray[Any, Any]]]
) -> dict[str, Any] | BinaryAnswer:
    binary = _binary_wanted(request)
    outputs = []
    parts: list[bytes] = []
    for name, stacked in columns:
        datatype = DATATYPE_OF.get(stacked.dtype)
        if datatype is None:
            raise ModelError(f"output {name!r} has dtype {stacked.dtype}, which the protocol cannot carry")
        entry: dict[str, Any] = {"name": name, "shape": list(stacked.shape), "datatype": datatype}
        if binary.get(name, binary[""]):
            data = np.ascontiguousarray(stacked, stacked.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            parts.append(data)
        else:
            if stacked.dtype.kind == "f" and not np.isfinite(stacked).all():
                raise ModelError(
                    f"output {name!r} holds NaN or infinity, which JSON cannot carry (ask for binary data)"
                )
            entry["data"] = stacked.ravel().tolist()
        outputs.append(entry)
    response: dict[str, Any] = {"model_name": plane.model.name, "model_version": "1", "outputs": outputs}
    if request.id is not None:
        response["id"] = request.id
    if not parts:
        return response
    from tandem.workloads.serve.http import dump_json  # the transport's JSON writer (no import cycle)

    head = dump_json(response)
    return BinaryAnswer(
        head + b"".join(parts),
        (("content-type", BINARY_CONTENT_TYPE), ("Inference-Header-Content-Length", str(len(head)))),
    )


async def infer(
    plane: DataPlane,
    name: str,
    body: bytes,
    version: str | None = None,
    *,
    header_length: str | None = None,
) -> dict[str, Any] | BinaryAnswer:
    check_model(plane, name, version)
    head, binary = split_body(body, header_length)
    request = validate(InferenceRequest, parse_json_object(head))
    check_parameters(request)
    wanted = [o.name for o in request.outputs] if request.outputs else None
    if plane.model.runtime is Runtime.EMBEDDINGS:
        _check_outputs(wanted, [EMBEDDING_OUTPUT])
        texts = to_texts(request, binary)
        embeddings = await plane.infer_many(texts)
        plane.metrics.prompt_tokens(sum(e.tokens for e in embeddings))
        vectors = np.stack([e.vector for e in embeddings]).astype(np.float32, copy=False)
        return _answer(plane, request, [(EMBEDDING_OUTPUT, vectors)])
    signature = getattr(plane.model, "signature", None)
    if signature is None:
        raise InvalidInput("inputs", f"model {name!r} ({plane.model.runtime}) does not take tensors here")
    rows = to_rows(request, signature.inputs, binary)
    if signature.outputs:  # known before the first forward pass when model.json declares them
        _check_outputs(wanted, [s.name for s in signature.outputs])
    results: list[Row] = await plane.infer(rows)
    names = [s.name for s in signature.outputs]
    _check_outputs(wanted, names)
    columns = [
        (output_name, np.stack([row[column] for row in results]))
        for column, output_name in enumerate(names)
        if wanted is None or output_name in wanted
    ]
    return _answer(plane, request, columns)
