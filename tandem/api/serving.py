"""The model server's configuration: one model for `tandem serve`'s options and the InferenceService.

`ServerOptions` is what a server process runs with. Its fields are `tandem serve`'s options (generated
by `tandem.api.options`), and the InferenceService builder writes a replica's command line from it, so
a field is declared and defaulted once. `Batching` is shared verbatim with the InferenceService's
`spec.batching`: the CRD, the CLI and the server read the same defaults.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, ClassVar, Final

from pydantic import BaseModel, Field

from tandem.api.common import ApiModel, Rule, SpecModel

#: The port a replica's server listens on in its pod.
HTTP_PORT: Final = 8080


class Runtime(StrEnum):
    """How the model server loads the model and which protocol serves it."""

    CAUSAL_LM = "causal-lm"
    EMBEDDINGS = "embeddings"
    TORCHSCRIPT = "torchscript"
    NOOP = "noop"
    """No model: the embeddings protocol answering zero vectors, to measure the server's own cost."""


class ServingPrecision(StrEnum):
    """Numeric precision of the served weights; int8 is dynamic quantization of Linear layers (CPU)."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    INT8 = "int8"


class CudaGraphs(StrEnum):
    """Whether causal-lm captures its decoding steps in CUDA graphs."""

    AUTO = "auto"
    """On a CUDA device with the KV cache on; off elsewhere."""
    ON = "on"
    """Always: refused on a CPU or without the KV cache."""
    OFF = "off"
    """Never: every step launches its kernels one by one (a baseline, or to rule graphs out)."""


class LogLevel(StrEnum):
    """How much the server logs."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class Batching(SpecModel):
    """Dynamic batching: requests wait up to maxQueueDelayMs to share one forward pass."""

    max_batch_size: int = Field(default=32, ge=1, le=4096)
    """Most requests in one forward pass."""
    max_queue_delay_ms: float = Field(default=5.0, ge=0, le=60000)
    """Longest a request waits for a batch to fill, in milliseconds; 0 runs whatever is queued."""
    max_queue_size: int = Field(default=1024, ge=1, le=1_000_000)
    """Most requests queued per server process; beyond it requests get 429 with Retry-After."""
    preferred_batch_sizes: list[Annotated[int, Field(ge=1, le=4096)]] | None = Field(
        default=None, max_length=16
    )
    """Batch sizes the model runs best at (compiled shapes): a batch leaves as soon as the largest is
    queued, and when the delay expires the largest queued preferred size goes first. Unset: none."""
    max_concurrent_batches: int = Field(default=1, ge=1, le=64)
    """Batches computing at once; more than 1 overlaps pre- and post-processing with GPU compute."""
    request_timeout_s: float = Field(default=30.0, ge=0, le=86400)
    """A request still unanswered after this many seconds (queueing included) gets 504; 0 = no limit."""
    max_queue_wait_ms: float = Field(default=1000.0, ge=0, le=3_600_000)
    """Admission by expected wait: a request whose items would wait longer than this in the queue (the
    batches ahead of them at the recent batch compute time) gets 429 with Retry-After at once instead of a
    late answer; 0 = no limit. The request timeout bounds it too. Dynamic batching only (not causal-lm)."""
    workers: int = Field(default=1, ge=1, le=16)
    """Server processes per replica, each with its own model copy and batcher, on one port and one GPU.
    More than 1 pays when one process's Python work (tokenizing, launching kernels) fills a CPU core
    before the GPU is busy, as with small models; each costs one more model copy in GPU memory."""

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            rule="self.maxQueueSize >= self.maxBatchSize",
            message="spec.batching.maxQueueSize must be >= spec.batching.maxBatchSize "
            "(a full batch has to fit in the queue)",
            check=lambda b: b.max_queue_size >= b.max_batch_size,
            field_path=".maxQueueSize",
        ),
        Rule(
            rule="!has(self.preferredBatchSizes) || self.preferredBatchSizes.all(s, s <= self.maxBatchSize)",
            message="spec.batching.preferredBatchSizes must each be <= spec.batching.maxBatchSize",
            check=lambda b: all(size <= b.max_batch_size for size in b.preferred_batch_sizes or ()),
            field_path=".preferredBatchSizes",
        ),
    )


class ModelSettings(ApiModel):
    """Model."""

    model_uri: str = Field(min_length=1, max_length=2048)
    """The model: a local path, file:///PATH or s3://BUCKET/KEY (a prefix, or one object)."""
    runtime: Runtime
    """How to load and serve it: causal-lm, embeddings, torchscript, or noop (no model: the server's own
    cost)."""
    model_name: str | None = Field(default=None, min_length=1, max_length=253, pattern=r"^[^/]+$")
    """The name clients use; unset: the model directory's name."""
    model_cache_dir: str | None = None
    """Where s3:// models are downloaded, a finished download being reused; unset: $TANDEM_MODEL_CACHE,
    else ~/.cache/tandem/models."""
    precision: ServingPrecision = ServingPrecision.FP32
    """fp32; bf16 or fp16 on a GPU; int8 = dynamic quantization of Linear layers on the CPU."""
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")
    """auto (a GPU if there is one), cpu, cuda or cuda:N."""
    kv_cache: bool = True
    """causal-lm: keep each sequence's keys and values between decoding steps; off recomputes every
    context at every step."""
    cuda_graphs: CudaGraphs = CudaGraphs.AUTO
    """causal-lm: capture the decoding steps in CUDA graphs (auto: on a GPU with the KV cache)."""


class HttpSettings(ApiModel):
    """HTTP."""

    host: str = "127.0.0.1"
    """Address to listen on; 0.0.0.0 in a container."""
    port: int = Field(default=HTTP_PORT, ge=0, le=65535)
    """Port; 0 picks a free one."""
    max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=1)
    """Largest request body; larger ones get 413."""
    body_timeout_s: float = Field(default=15.0, gt=0, le=3600)
    """Longest wait for the next part of a request body; a client that stops sending gets 408."""
    header_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    """Longest wait for a request's headers, from the connection's opening or the request's first byte; a
    client that sends nothing or half of its headers is closed (408 if it sent some)."""
    max_connections: int = Field(default=2048, ge=1, le=1_000_000)
    """Most open connections per server process; beyond it a new connection gets 503 and is closed at once
    (the open ones are unaffected). Keep it under the process's open-file limit (ulimit -n)."""
    drain_timeout_s: float = Field(default=30.0, ge=0)
    """On SIGTERM, how long requests already accepted may take to finish (idle connections then take up
    to 2 s more to close cleanly)."""
    log_level: LogLevel = LogLevel.INFO
    """How much to log."""
    access_log: bool = False
    """Log every request."""


class ServerOptions(ApiModel):
    """Everything a `tandem serve` process runs with; its options are these fields."""

    model: ModelSettings
    batching: Batching = Field(default_factory=Batching)
    http: HttpSettings = Field(default_factory=HttpSettings)

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            rule="",
            message="--kv-cache applies to --runtime causal-lm only: remove it for other runtimes",
            check=lambda o: o.model.kv_cache or o.model.runtime == Runtime.CAUSAL_LM,
        ),
        Rule(
            rule="",
            message="--cuda-graphs applies to --runtime causal-lm only: remove it for other runtimes",
            check=lambda o: o.model.cuda_graphs is CudaGraphs.AUTO or o.model.runtime == Runtime.CAUSAL_LM,
        ),
        Rule(
            rule="",
            message="--cuda-graphs on needs --kv-cache on (graphs capture the cached decoding step)",
            check=lambda o: o.model.cuda_graphs is not CudaGraphs.ON or o.model.kv_cache,
        ),
    )


def default_of(model: type[BaseModel], name: str) -> Any:
    """A field's declared default (for a default that another model shares)."""
    return model.model_fields[name].get_default(call_default_factory=True)
