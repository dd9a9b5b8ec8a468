"""Prometheus metrics of one model server, every series labelled with the model name.

One registry per server (not the process-global one), so several servers in one process (tests) never
collide. The names below are the contract with the operator's autoscaler and the Grafana dashboards.

Token series exist only where tokens do (`token_series`): causal-lm reads prompts and generates (prompt
and generated tokens, time to first token, inter-token latency), the embeddings runtimes read prompts
(prompt tokens), TorchScript has no tokens and exports none of them, rather than series stuck at 0.

With `--workers N` every worker process writes its samples to files in a directory that the supervisor
creates fresh at each start (prometheus_client's multiprocess mode, `PROMETHEUS_MULTIPROC_DIR`), and
`/metrics` in any worker merges them: counters and histograms add up, `queue_depth` and `inflight_requests`
are summed over the live workers, `model_load_seconds` is the slowest worker's, and `ready` is 1 only when
every worker is (read from the supervisor's worker board, not from a file). The per-process `process_*` and
`python_*` collectors are left out there: they would describe whichever worker answered the scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

PREFIX: Final = "tandem_serve"
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

#: Metric names (the autoscaler and dashboards read these).
REQUEST_DURATION: Final = f"{PREFIX}_request_duration_seconds"
QUEUE_WAIT: Final = f"{PREFIX}_queue_wait_seconds"
BATCH_SIZE: Final = f"{PREFIX}_batch_size"
BATCH_DURATION: Final = f"{PREFIX}_batch_duration_seconds"
QUEUE_DEPTH: Final = f"{PREFIX}_queue_depth"
INFLIGHT: Final = f"{PREFIX}_inflight_requests"
DROPPED: Final = f"{PREFIX}_dropped_requests_total"
MODEL_LOAD: Final = f"{PREFIX}_model_load_seconds"
READY: Final = f"{PREFIX}_ready"
TOKENS_GENERATED: Final = f"{PREFIX}_generated_tokens_total"
PROMPT_TOKENS: Final = f"{PREFIX}_prompt_tokens_total"
TIME_TO_FIRST_TOKEN: Final = f"{PREFIX}_time_to_first_token_seconds"
INTER_TOKEN_LATENCY: Final = f"{PREFIX}_inter_token_latency_seconds"
KV_CACHE_SEQUENCES: Final = f"{PREFIX}_kv_cache_sequences"
KV_CACHE_CAPACITY: Final = f"{PREFIX}_kv_cache_capacity_sequences"
KV_CACHE_BYTES: Final = f"{PREFIX}_kv_cache_bytes"

#: Time between two tokens of one sequence: from half a millisecond (a small model's decoding step).
INTER_TOKEN_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Powers of two up to the largest batch, so `le="1"` counts the unbatched passes exactly."""
    buckets = [1.0]
    while buckets[-1] < max_batch_size:
        buckets.append(buckets[-1] * 2)
    return tuple(buckets)


@dataclass(frozen=True)
class TokenSeries:
    """Which token series a runtime's server exports."""

    #: Tokens read from requests (prompts, texts to embed).
    prompt: bool
    #: Tokens generated, time to first token, inter-token latency.
    generated: bool


def token_series(runtime: str | None) -> TokenSeries:
    """A runtime's token series (by `tandem.api.serving.Runtime` value); None (a test's server): all."""
    if runtime in ("embeddings", "noop"):
        return TokenSeries(prompt=True, generated=False)
    if runtime == "torchscript":
        return TokenSeries(prompt=False, generated=False)
    return TokenSeries(prompt=True, generated=True)


READY_HELP: Final = "1 when the model is loaded, warmed up and not draining (every worker, with --workers)."


def multiprocess_values() -> bool:
    """True when prometheus_client was imported with `PROMETHEUS_MULTIPROC_DIR` set (values go to files)."""
    from prometheus_client import values

    return bool(getattr(values.ValueClass, "_multiprocess", False))


class _ServerReady:
    """`tandem_serve_ready` of a multi-process server: 1 only while every worker is ready."""

    def __init__(self, model: str, server_ready: Callable[[], bool]) -> None:
        self.model = model
        self.server_ready = server_ready

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(READY, READY_HELP, labels=["model"])
        family.add_metric([self.model], 1.0 if self.server_ready() else 0.0)
        yield family


class ServeMetrics:
    """The server's metrics; also the batcher's observer (`tandem.workloads.serve.batcher.BatchObserver`).

    `multiprocess_dir` (a worker of a multi-process server): samples go to files there, `render` merges every
    worker's, and `server_ready` says whether the whole server is ready. `runtime` decides the token series
    (`token_series`).
    """

    def __init__(
        self,
        model: str,
        max_batch_size: int,
        *,
        runtime: str | None = None,
        process_metrics: bool = True,
        multiprocess_dir: Path | None = None,
        server_ready: Callable[[], bool] | None = None,
    ) -> None:
        self.model = model
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self._exposition = reg
        multiprocess = multiprocess_dir is not None
        if multiprocess:
            if not multiprocess_values():
                raise RuntimeError(
                    "PROMETHEUS_MULTIPROC_DIR must be set before prometheus_client is imported "
                    "(the supervisor sets it for its workers)"
                )
            self._exposition = CollectorRegistry()
            MultiProcessCollector(self._exposition, path=str(multiprocess_dir))  # type: ignore[no-untyped-call]
            self._exposition.register(_ServerReady(model, server_ready or (lambda: False)))
        elif process_metrics:
            ProcessCollector(registry=reg)
            PlatformCollector(registry=reg)
            GCCollector(registry=reg)
        self.request_duration = Histogram(
            REQUEST_DURATION,
            "Time from receiving a request to sending its response, by route and status code.",
            ["model", "route", "code"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.queue_wait = Histogram(
            QUEUE_WAIT,
            "Time an item waited in the batch queue before its batch started.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.batch_size = Histogram(
            BATCH_SIZE,
            "Items per forward pass.",
            ["model"],
            buckets=batch_size_buckets(max_batch_size),
            registry=reg,
        )
        self.batch_duration = Histogram(
            BATCH_DURATION,
            "Time the model took to compute one batch (pre- and post-processing included).",
            ["model", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.queue_depth_gauge = Gauge(
            QUEUE_DEPTH, "Items waiting for a batch.", ["model"], registry=reg, multiprocess_mode="livesum"
        )
        self.inflight = Gauge(
            INFLIGHT,
            "Inference requests received and not yet answered.",
            ["model"],
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.dropped_total = Counter(
            DROPPED.removesuffix("_total"),
            "Queued items abandoned without an answer, by reason (cancelled: the client went away).",
            ["model", "reason"],
            registry=reg,
        )
        self.model_load = Gauge(
            MODEL_LOAD,
            "Seconds spent loading and warming up the model (the slowest worker's, with --workers).",
            ["model"],
            registry=reg,
            multiprocess_mode="max",
        )
        # With several workers `ready` is computed at scrape time from every worker's state (`_ServerReady`).
        self.ready: Gauge | None = None if multiprocess else Gauge(READY, READY_HELP, ["model"], registry=reg)
        # Create every label set the server will use, so dashboards see zeros rather than no data.
        per_model: list[Histogram | Gauge | Counter] = [
            self.queue_wait,
            self.batch_size,
            self.queue_depth_gauge,
            self.inflight,
            self.model_load,
        ]
        if self.ready is not None:
            per_model.append(self.ready)
        self.token_series = token_series(runtime)
        self._add_token_series(reg, model)
        for metric in per_model:
            metric.labels(model)
        for reason in ("cancelled", "timeout"):
            self.dropped_total.labels(model, reason)
        self._queue_wait = self.queue_wait.labels(model)
        self._batch_size = self.batch_size.labels(model)
        self._queue_depth = self.queue_depth_gauge.labels(model)
        self._batch_ok = self.batch_duration.labels(model, "ok")
        self._batch_error = self.batch_duration.labels(model, "error")
        self._requests: dict[tuple[str, int], Any] = {}
        self._dropped = {
            reason: self.dropped_total.labels(model, reason) for reason in ("cancelled", "timeout")
        }

    def _add_token_series(self, reg: CollectorRegistry, model: str) -> None:
        """The token series of `self.token_series`, created with their label set (zeros, not no data)."""
        self._prompt_tokens: Any = None
        self._tokens: Any = None
        self._ttft: Any = None
        self._itl: Any = None
        self._kv: list[Any] = []
        if self.token_series.prompt:
            self.prompt_tokens_total = Counter(
                PROMPT_TOKENS.removesuffix("_total"),
                "Tokens read from requests: prompts (causal-lm), texts to embed (embeddings).",
                ["model"],
                registry=reg,
            )
            self._prompt_tokens = self.prompt_tokens_total.labels(model)
        if self.token_series.generated:
            self.tokens_generated = Counter(
                TOKENS_GENERATED.removesuffix("_total"),
                "Tokens generated (causal-lm).",
                ["model"],
                registry=reg,
            )
            self.time_to_first_token = Histogram(
                TIME_TO_FIRST_TOKEN,
                "Time from receiving a generation request (streamed or not) to its first token (causal-lm).",
                ["model"],
                buckets=LATENCY_BUCKETS,
                registry=reg,
            )
            self.inter_token_latency = Histogram(
                INTER_TOKEN_LATENCY,
                "Time between two consecutive generated tokens of one sequence (causal-lm).",
                ["model"],
                buckets=INTER_TOKEN_BUCKETS,
                registry=reg,
            )
            self._tokens = self.tokens_generated.labels(model)
            self._ttft = self.time_to_first_token.labels(model)
            self._itl = self.inter_token_latency.labels(model)
            kv = (
                (KV_CACHE_SEQUENCES, "Sequences whose keys and values the KV cache holds (causal-lm)."),
                (KV_CACHE_CAPACITY, "Sequence slots the KV cache has allocated (grows to --max-batch-size)."),
                (KV_CACHE_BYTES, "Memory the KV cache has allocated (keys and values of every slot)."),
            )
            self.kv_cache_gauges = [
                Gauge(name, text, ["model"], registry=reg, multiprocess_mode="livesum") for name, text in kv
            ]
            self._kv = [gauge.labels(model) for gauge in self.kv_cache_gauges]

    def render(self) -> bytes:
        """The text exposition format for `/metrics` (every worker's samples merged, with --workers)."""
        return generate_latest(self._exposition)

    def set_ready(self, ready: bool) -> None:
        if self.ready is not None:
            self.ready.labels(self.model).set(1 if ready else 0)

    def set_model_load(self, seconds: float) -> None:
        self.model_load.labels(self.model).set(seconds)

    def observe_request(self, route: str, code: int, seconds: float) -> None:
        child = self._requests.get((route, code))
        if child is None:
            child = self._requests[route, code] = self.request_duration.labels(self.model, route, str(code))
        child.observe(seconds)

    def prompt_tokens(self, count: int) -> None:
        """Tokens a request brought (a prompt, texts to embed); nothing for a runtime without tokens."""
        if self._prompt_tokens is not None and count > 0:
            self._prompt_tokens.inc(count)

    def tokens(self, count: int) -> None:
        if self._tokens is not None:
            self._tokens.inc(count)

    def kv_cache(self, sequences: int, slots: int, nbytes: int) -> None:
        """What the KV cache holds and has allocated, after a decoding step (causal-lm)."""
        for gauge, value in zip(self._kv, (sequences, slots, nbytes), strict=False):
            gauge.set(value)

    def first_token(self, seconds: float) -> None:
        if self._ttft is not None:
            self._ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        if self._itl is not None:
            self._itl.observe(seconds)

    def inter_tokens(self, seconds: float, count: int) -> None:
        """`count` inter-token latencies of `seconds` (a decoding step's sequences share one interval): one
        update, not `count` (`observe` takes ~2 us, once per generated token). prometheus_client has no
        weighted observe, so this adds to the sum and the bucket as `observe` does."""
        itl = self._itl
        if itl is None:
            return
        itl._sum.inc(seconds * count)
        for i, bound in enumerate(itl._upper_bounds):
            if seconds <= bound:
                itl._buckets[i].inc(count)
                break

    # BatchObserver ------------------------------------------------------------------------------

    def queue_depth(self, depth: int) -> None:
        self._queue_depth.set(depth)

    def batch_started(self, size: int, queue_waits_s: Sequence[float]) -> None:
        if size:  # causal-lm reports queue waits on admission (size 0) and each step's size separately
            self._batch_size.observe(size)
        for wait in queue_waits_s:
            self._queue_wait.observe(wait)

    def batch_finished(self, size: int, seconds: float, error: BaseException | None) -> None:
        (self._batch_ok if error is None else self._batch_error).observe(seconds)

    def dropped(self, reason: str) -> None:
        child = self._dropped.get(reason)
        (child or self.dropped_total.labels(self.model, reason)).inc()
