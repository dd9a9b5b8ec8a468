"""Tensor descriptions shared by the Open Inference Protocol handlers and the torchscript runtime (numpy
only: no torch here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Open Inference Protocol datatypes this server accepts, and their numpy types. BYTES and BF16 have no
#: faithful JSON form for tensor models; UINT16-64 have no full torch support.
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
DATATYPE_OF: dict[np.dtype[Any], str] = {v: k for k, v in DATATYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: `shape` starts with the batch dimension; -1 means any size."""

    name: str
    datatype: str | None = None
    shape: tuple[int, ...] | None = None

    def as_metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "datatype": self.datatype or "FP32",
            "shape": list(self.shape) if self.shape is not None else [-1],
        }


@dataclass
class TensorSignature:
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)


#: One row of a batch: one array per model input (or output), without the batch dimension.
Row = tuple[np.ndarray[Any, Any], ...]
