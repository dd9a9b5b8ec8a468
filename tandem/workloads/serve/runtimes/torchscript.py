"""The `torchscript` runtime: any TorchScript tensor model, served over the Open Inference Protocol.

`--model-uri` is a TorchScript file, or a directory holding `model.pt` and optionally `model.json`:

    {"inputs":  [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
     "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]}

Shapes start with the batch dimension. With `model.json` the server validates requests, reports exact
metadata and warms up; without it input names come from `forward()`'s signature and outputs are named
`output__0`, `output__1`, ... (dict outputs keep their keys).

The model must compute each row independently (dimension 0 is the batch): the batcher stacks rows of
several requests into one forward pass. Rows of different shapes or datatypes run as separate passes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tandem.api.serving import Runtime
from tandem.api.serving import ServingPrecision as Precision
from tandem.errors import UserError
from tandem.workloads.serve.errors import ModelError
from tandem.workloads.serve.model import ModelOptions, check_precision, torch_device, torch_dtype
from tandem.workloads.serve.tensors import DATATYPES, Row, TensorSignature, TensorSpec

if TYPE_CHECKING:
    import torch

MODEL_FILES = ("model.pt", "model.ts", "model.torchscript")
CONFIG_FILE = "model.json"


def _spec(entry: Any, where: str) -> TensorSpec:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise UserError(f"{where}: each entry needs a string 'name'")
    datatype = entry.get("datatype")
    if datatype is not None and datatype not in DATATYPES:
        raise UserError(f"{where}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
    shape = entry.get("shape")
    if shape is not None and (
        not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= -1 for d in shape)
    ):
        raise UserError(f"{where}: shape must be a list of ints (-1 for any size), batch dimension first")
    return TensorSpec(entry["name"], datatype, tuple(shape) if shape is not None else None)


def read_signature(path: Path) -> TensorSignature | None:
    """The tensors `model.json` declares, or None without one."""
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected an object with 'inputs' and 'outputs'")
    return TensorSignature(
        inputs=[_spec(e, f"{path} inputs[{i}]") for i, e in enumerate(raw.get("inputs", []))],
        outputs=[_spec(e, f"{path} outputs[{i}]") for i, e in enumerate(raw.get("outputs", []))],
    )


class TorchScriptModel:
    runtime = Runtime.TORCHSCRIPT

    def __init__(self, options: ModelOptions) -> None:
        self.name = options.name
        self.options = options
        self.signature = TensorSignature()
        self.declared = False
        self._module: Any = None
        self._device: torch.device | None = None
        self._float_dtype: torch.dtype | None = None
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    def _files(self) -> tuple[Path, Path | None]:
        path = self.options.path
        if path.is_file():
            return path, path.with_name(CONFIG_FILE)
        for name in MODEL_FILES:
            if (path / name).is_file():
                return path / name, path / CONFIG_FILE
        raise UserError(f"{path}: no TorchScript file ({', '.join(MODEL_FILES)}); pass the file itself")

    def load(self) -> None:
        import torch

        model_file, config_file = self._files()
        device = torch_device(self.options.device)
        check_precision(self.options.precision, device)
        if self.options.precision is Precision.INT8:
            raise UserError(
                "--precision int8 is not available for torchscript models; quantize before scripting "
                "and serve the result as fp32"
            )
        try:
            module = torch.jit.load(str(model_file), map_location=device)  # type: ignore[no-untyped-call]
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"{model_file}: not a TorchScript model ({exc})") from exc
        module.eval()
        dtype = torch_dtype(self.options.precision)
        if dtype != torch.float32:
            module = module.to(dtype)
        self._module, self._device, self._float_dtype = module, device, dtype
        declared = read_signature(config_file) if config_file else None
        arguments = [a.name for a in module.forward.schema.arguments[1:]]
        if declared is not None and declared.inputs:
            names = [s.name for s in declared.inputs]
            if sorted(names) != sorted(arguments):
                raise UserError(
                    f"{config_file}: inputs {names} do not match forward()'s arguments {arguments}"
                )
            self.signature = declared
            self.declared = True
        else:
            self.signature = TensorSignature(
                inputs=[TensorSpec(name) for name in arguments],
                outputs=declared.outputs if declared else [],
            )
        torch.set_grad_enabled(False)

    def warm_up(self, max_batch_size: int) -> None:
        shapes = [s.shape for s in self.signature.inputs]
        if self.declared and all(shape is not None and -1 not in shape[1:] for shape in shapes):
            for size in sorted({1, max_batch_size}):
                row = tuple(
                    np.zeros(s.shape[1:] if s.shape else (), DATATYPES[s.datatype or "FP32"])
                    for s in self.signature.inputs
                )
                self.predict([row] * size)
        self._ready = True

    def predict(self, batch: list[Row]) -> list[Row]:
        groups: dict[tuple[tuple[tuple[int, ...], str], ...], list[int]] = {}
        for index, row in enumerate(batch):
            key = tuple((a.shape, a.dtype.str) for a in row)
            groups.setdefault(key, []).append(index)
        results: list[Row | None] = [None] * len(batch)
        for indices in groups.values():
            for index, row in zip(indices, self._forward([batch[i] for i in indices]), strict=True):
                results[index] = row
        return [r for r in results if r is not None]

    def _forward(self, rows: list[Row]) -> list[Row]:
        import torch

        assert self._module is not None, "load() first"
        assert self._device is not None
        inputs = []
        for column in range(len(rows[0])):
            tensor = torch.from_numpy(np.stack([row[column] for row in rows])).to(self._device)
            if tensor.is_floating_point() and self._float_dtype is not None:
                tensor = tensor.to(self._float_dtype)
            inputs.append(tensor)
        with torch.inference_mode():
            raw = self._module(*inputs)
        names, tensors = self._name_outputs(raw)
        arrays = []
        for name, tensor in zip(names, tensors, strict=True):
            if tensor.dim() == 0 or tensor.shape[0] != len(rows):
                raise ModelError(
                    f"output {name!r} has shape {list(tensor.shape)} for a batch of {len(rows)}: a batched "
                    "model must keep dimension 0 as the batch (or serve it with --max-batch-size 1)"
                )
            carried = tensor.float() if tensor.dtype == torch.bfloat16 else tensor  # numpy has no bf16
            arrays.append(carried.detach().cpu().numpy())
        return [tuple(array[i] for array in arrays) for i in range(len(rows))]

    def _name_outputs(self, raw: Any) -> tuple[list[str], list[Any]]:
        import torch

        declared = [s.name for s in self.signature.outputs]
        if isinstance(raw, torch.Tensor):
            tensors = [raw]
        elif isinstance(raw, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in raw):
            tensors = list(raw)
        elif isinstance(raw, dict) and all(isinstance(t, torch.Tensor) for t in raw.values()):
            keys = [str(k) for k in raw]
            if not self.signature.outputs:
                self.signature.outputs = [TensorSpec(k) for k in keys]
            return keys, list(raw.values())
        else:
            raise ModelError(f"the model returned {type(raw).__name__}; expected tensors (or a tuple/dict)")
        if len(declared) != len(tensors):
            if declared:
                raise ModelError(f"the model returned {len(tensors)} outputs, model.json declares {declared}")
            self.signature.outputs = [TensorSpec(f"output__{i}") for i in range(len(tensors))]
            declared = [s.name for s in self.signature.outputs]
        return declared, tensors

    def metadata(self) -> dict[str, Any]:
        return {
            "platform": "pytorch_torchscript",
            "inputs": [s.as_metadata() for s in self.signature.inputs],
            "outputs": [s.as_metadata() for s in self.signature.outputs],
        }
