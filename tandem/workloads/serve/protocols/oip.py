"""The Open Inference Protocol (KServe v2) REST API for tensor models.

Each request's tensors are split into rows (dimension 0) so rows of concurrent requests share one forward
pass; the answer stacks the request's rows back together.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from tandem import __version__
from tandem.workloads.serve.dataplane import DataPlane
from tandem.workloads.serve.errors import InvalidInput, ModelError, ModelNotFound
from tandem.workloads.serve.protocols.common import parse_json_object, validate
from tandem.workloads.serve.tensors import DATATYPE_OF, DATATYPES, Row, TensorSpec

#: Most elements in one input tensor (the body size limit usually bites first).
MAX_ELEMENTS = 64 * 1024 * 1024


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: StrictStr
    shape: list[Annotated[StrictInt, Field(ge=0)]]
    datatype: StrictStr
    parameters: dict[str, Any] | None = None
    data: list[Any]


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: StrictStr
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


def server_metadata() -> dict[str, Any]:
    return {"name": "tandem", "version": __version__, "extensions": []}


def check_model(plane: DataPlane, name: str, version: str | None = None) -> None:
    if name != plane.model.name:
        raise ModelNotFound(f"model {name!r} is not served here; this server serves {plane.model.name!r}")
    if version is not None and version != "1":
        raise ModelNotFound(f"model {name!r} has only version '1'")


def model_metadata(plane: DataPlane) -> dict[str, Any]:
    meta = plane.model.metadata()
    return {
        "name": plane.model.name,
        "versions": ["1"],
        "platform": meta.get("platform", ""),
        "inputs": meta.get("inputs", []),
        "outputs": meta.get("outputs", []),
    }


def _tensor(index: int, tensor: RequestInput, spec: TensorSpec) -> np.ndarray[Any, Any]:
    where = f"inputs[{index}]"
    dtype = DATATYPES.get(tensor.datatype)
    if dtype is None:
        raise InvalidInput(f"{where}.datatype", f"{tensor.datatype!r} is not one of {', '.join(DATATYPES)}")
    if spec.datatype is not None and tensor.datatype != spec.datatype:
        raise InvalidInput(f"{where}.datatype", f"input {spec.name!r} takes {spec.datatype}")
    shape = tensor.shape
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
    return array.astype(dtype, copy=False).reshape(shape)


def to_rows(request: InferenceRequest, inputs: list[TensorSpec]) -> list[Row]:
    by_name: dict[str, int] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name in by_name:
            raise InvalidInput(f"inputs[{index}].name", f"input {tensor.name!r} appears twice")
        by_name[tensor.name] = index
    names = [s.name for s in inputs]
    for name, index in by_name.items():
        if name not in names:
            raise InvalidInput(f"inputs[{index}].name", f"the model has no input {name!r}; it takes {names}")
    missing = [n for n in names if n not in by_name]
    if missing:
        raise InvalidInput("inputs", f"missing input(s) {missing}; the model takes {names}")
    arrays = [_tensor(by_name[s.name], request.inputs[by_name[s.name]], s) for s in inputs]
    rows = {a.shape[0] for a in arrays}
    if len(rows) != 1:
        raise InvalidInput("inputs", f"every input needs the same batch dimension, got {sorted(rows)}")
    return [tuple(a[r] for a in arrays) for r in range(arrays[0].shape[0])]


def _check_outputs(wanted: list[str] | None, names: list[str]) -> None:
    for index, output in enumerate(wanted or []):
        if output not in names:
            raise InvalidInput(
                f"outputs[{index}].name", f"the model has no output {output!r}; it has {names}"
            )


async def infer(plane: DataPlane, name: str, body: bytes, version: str | None = None) -> dict[str, Any]:
    check_model(plane, name, version)
    request = validate(InferenceRequest, parse_json_object(body))
    signature = getattr(plane.model, "signature", None)
    if signature is None:
        raise InvalidInput("inputs", f"model {name!r} ({plane.model.runtime}) does not take tensors here")
    rows = to_rows(request, signature.inputs)
    wanted = [o.name for o in request.outputs] if request.outputs else None
    if signature.outputs:  # known before the first forward pass when model.json declares them
        _check_outputs(wanted, [s.name for s in signature.outputs])
    results: list[Row] = await plane.infer(rows)
    names = [s.name for s in signature.outputs]
    _check_outputs(wanted, names)
    outputs = []
    for column, output_name in enumerate(names):
        if wanted is not None and output_name not in wanted:
            continue
        stacked = np.stack([row[column] for row in results])
        datatype = DATATYPE_OF.get(stacked.dtype)
        if datatype is None:
            raise ModelError(
                f"output {output_name!r} has dtype {stacked.dtype}, which the protocol cannot carry"
            )
        if stacked.dtype.kind == "f" and not np.isfinite(stacked).all():
            raise ModelError(f"output {output_name!r} holds NaN or infinity, which JSON cannot carry")
        outputs.append(
            {
                "name": output_name,
                "shape": list(stacked.shape),
                "datatype": datatype,
                "data": stacked.ravel().tolist(),
            }
        )
    response: dict[str, Any] = {"model_name": plane.model.name, "model_version": "1", "outputs": outputs}
    if request.id is not None:
        response["id"] = request.id
    return response
