"""The model layer: what a runtime must provide, and how a runtime is chosen and configured.

A model loads itself, warms up, and computes one batch at a time (`predict` runs in the batcher's worker
thread, never on the event loop). It knows nothing about HTTP or batching policy. Runtimes import torch inside
their methods, so importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import unquote, urlparse

from tandem.api.serving import CudaGraphs, Runtime, ServingPrecision
from tandem.errors import UserError

if TYPE_CHECKING:
    import torch

Precision = ServingPrecision
"""The served weights' precision (`tandem.api.serving.ServingPrecision`, declared there once)."""

In = TypeVar("In")
Out_co = TypeVar("Out_co", covariant=True)


class Model(Protocol[In, Out_co]):
    """A loaded model that computes one batch at a time."""

    name: str
    runtime: Runtime

    @property
    def ready(self) -> bool:
        """True once `load` and `warm_up` have both finished."""

    def load(self) -> None:
        """Read the weights and put them on the device (slow; runs in a worker thread)."""

    def warm_up(self, max_batch_size: int) -> None:
        """Run representative batches so the first real request is not slow; then `ready` is True."""

    def predict(self, batch: list[In]) -> Sequence[Out_co]:
        """Compute one batch: exactly one result per item, in order."""

    def metadata(self) -> dict[str, Any]:
        """Facts for the metadata endpoints (platform, inputs, outputs, dimensions)."""


@dataclass(frozen=True)
class ModelOptions:
    """What every runtime needs to load a model."""

    name: str
    path: Path
    device: str = "auto"
    """`auto` (the GPU if there is one), `cpu`, `cuda` or `cuda:N`."""
    precision: Precision = Precision.FP32
    kv_cache: bool = True
    """causal-lm: keep each sequence's keys and values between decoding steps (`runtimes.kv_cache`); False
    recomputes every context at every step."""
    cuda_graphs: CudaGraphs = CudaGraphs.AUTO
    """causal-lm: capture the decoding steps in CUDA graphs (auto: on a CUDA device with the cache)."""


def resolve_model_path(uri: str, cache_dir: Path | None = None) -> Path:
    """A local path or `file://` URI that must exist, or an `s3://BUCKET/KEY` model downloaded into
    `cache_dir` (default `$TANDEM_MODEL_CACHE` or `~/.cache/tandem/models`; a finished download is reused).
    `pvc://` models are mounted by the operator, which passes the mounted path."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        from tandem.workloads.storage import materialize

        return materialize(
            uri,
            cache_dir,
            what="--model-uri",
            credentials_hint=" (in an InferenceService: name a Secret with these keys in "
            "spec.model.credentialsSecret)",
        ).resolve()
    if parsed.scheme in ("", "file"):
        raw = unquote(parsed.path) if parsed.scheme == "file" else uri
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise UserError(f"--model-uri {uri!r}: file:// URIs must be local (file:///path)")
        path = Path(raw).expanduser()
        if not path.exists():
            raise UserError(f"--model-uri {uri!r}: {path} does not exist; pass a local directory or file")
        return path.resolve()
    if parsed.scheme == "pvc":
        raise UserError(
            f"--model-uri {uri!r}: the server reads local files only (and s3://); in a pod the operator "
            "mounts pvc:// models and passes the mounted path, locally pass the path"
        )
    raise UserError(
        f"--model-uri {uri!r}: unsupported scheme {parsed.scheme!r}; use a path, file:// or s3:// URI"
    )


def default_model_name(path: Path) -> str:
    """The directory (or file stem) name, skipping generic names like `model` for the parent's."""
    candidate = path if path.is_dir() else path.with_suffix("")
    for part in (candidate, *candidate.parents):
        if part.name and part.name.lower() not in ("model", "models", "checkpoint", "export", "1"):
            return part.name
    return "model"


def torch_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"--device {device!r}: {exc}; use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
    return resolved


def check_precision(precision: Precision, device: torch.device) -> None:
    """Refuse combinations that would be slow or unsupported, with what to use instead."""
    if precision is Precision.INT8 and device.type != "cpu":
        raise UserError(
            "--precision int8 is dynamic quantization of Linear layers, which runs on CPU only; "
            "on a GPU use bf16 or fp16"
        )
    if precision is Precision.FP16 and device.type == "cpu":
        raise UserError("--precision fp16 is for GPUs; on CPU use fp32, bf16 or int8")


def torch_dtype(precision: Precision) -> torch.dtype:
    import torch

    return {
        Precision.FP32: torch.float32,
        Precision.BF16: torch.bfloat16,
        Precision.FP16: torch.float16,
        Precision.INT8: torch.float32,  # int8 is applied by quantization, activations stay fp32
    }[precision]


def quantize_int8(module: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantization of every Linear layer: weights int8 per output channel, activations
    quantized per batch. Per-channel scales keep all-MiniLM-L6-v2 at ~0.97 cosine to fp32 (per-tensor
    scales drop it to ~0.90); docs/serving.md records the measured cost."""
    import warnings

    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization points at torchao
        warnings.simplefilter("ignore", UserWarning)
        quantized: torch.nn.Module = quantize_dynamic(  # type: ignore[no-untyped-call]
            module, {torch.nn.Linear: per_channel_dynamic_qconfig}
        )
    return quantized


def create_model(runtime: Runtime, options: ModelOptions) -> Model[Any, Any]:
    """The runtime's model object, not loaded yet (loading runs later, off the event loop)."""
    if runtime is Runtime.EMBEDDINGS:
        from tandem.workloads.serve.runtimes.embeddings import EmbeddingModel

        return EmbeddingModel(options)
    if runtime is Runtime.TORCHSCRIPT:
        from tandem.workloads.serve.runtimes.torchscript import TorchScriptModel

        return TorchScriptModel(options)
    if runtime is Runtime.NOOP:
        from tandem.workloads.serve.runtimes.noop import NoopModel

        return NoopModel(options)
    from tandem.workloads.serve.runtimes.causal_lm import CausalLM

    return CausalLM(options)
