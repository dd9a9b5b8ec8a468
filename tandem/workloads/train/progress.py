"""Progress of a run as the platform sees it: the pod annotation, Prometheus metrics, a progress bar.

`ProgressReporter` receives step metrics and checkpoint events (in the head process) and fans them out:

- the `tandem.dev/progress` annotation on the head pod, through an injectable `AnnotationWriter`
  (`PodAnnotationWriter` in a pod, a list in tests), rate-limited to one write per `min_interval` seconds
  plus one for every checkpoint and one at the end;
- Prometheus metrics (`TrainMetrics`, on its own registry);
- optionally a one-line progress bar on a terminal (`tandem train --local`);
- optionally a `tracking.Tracker` (`spec.tracking`: TensorBoard, MLflow).

Nothing here imports torch or ray.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol, TextIO

from tandem.workloads.train.checkpoint import rfc3339

if TYPE_CHECKING:
    from tandem.workloads.train.tracking import Tracker

log = logging.getLogger(__name__)

ANNOTATION: Final = "tandem.dev/progress"


class AnnotationWriter(Protocol):
    """Writes the progress annotation (a JSON string) somewhere the operator reads it."""

    def write(self, value: str) -> None: ...


class PodAnnotationWriter:
    """Patches `tandem.dev/progress` on this pod (`POD_NAME`/`POD_NAMESPACE`) with in-cluster credentials."""

    def __init__(self, pod_name: str, namespace: str) -> None:
        self.pod_name, self.namespace = pod_name, namespace
        self._api: Any = None

    @classmethod
    def from_env(cls) -> PodAnnotationWriter | None:
        """A writer for this pod, or None outside a pod (no `POD_NAME`)."""
        name, ns = os.environ.get("POD_NAME"), os.environ.get("POD_NAMESPACE")
        return cls(name, ns) if name and ns else None

    def write(self, value: str) -> None:
        if self._api is None:
            from kubernetes import client, config

            config.load_incluster_config()  # type: ignore[no-untyped-call]
            self._api = client.CoreV1Api()
        body = {"metadata": {"annotations": {ANNOTATION: value}}}
        self._api.patch_namespaced_pod(self.pod_name, self.namespace, body)


@dataclass
class ListWriter:
    """An `AnnotationWriter` that keeps what it was given (tests, local runs)."""

    values: list[str] = field(default_factory=list)

    def write(self, value: str) -> None:
        self.values.append(value)

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(v) for v in self.values]


#: From 10 us: windows of an in-memory corpus take tens of microseconds, a slow reader seconds.
DATA_WAIT_BUCKETS: Final = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 1, 5,
)  # fmt: skip


class TrainMetrics:
    """The head's Prometheus metrics (a private registry; `serve(port)` exposes it).

    A series that means nothing for a run is absent, not 0: MFU without a known GPU peak (a CPU run),
    the gradient norm and the data-loading wait before a step reports them (a user entrypoint does
    not), the GPU series without a GPU, utilisation without NVML. Their children are created when the
    first value arrives.
    """

    def __init__(self, job: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        labels = ["job"]
        self._job = job

        def g(name: str, doc: str) -> Any:
            return Gauge(name, doc, labels, registry=self.registry).labels(job)

        def gpu(name: str, doc: str) -> Any:
            return Gauge(name, doc, [*labels, "rank"], registry=self.registry)

        self.step = g("tandem_train_step", "Optimizer steps done")
        self.total_steps = g("tandem_train_total_steps", "Optimizer steps of the whole run")
        self.loss = g("tandem_train_loss", "Training loss of the last reported step")
        self.lr = g("tandem_train_learning_rate", "Learning rate of the last reported step")
        self.samples_per_second = g("tandem_train_samples_per_second", "Training samples/s over all workers")
        self.tokens_per_second = g("tandem_train_tokens_per_second", "Training tokens/s over all workers")
        self._mfu = Gauge(
            "tandem_train_mfu_ratio",
            "Estimated model FLOPs utilisation (0-1); absent without a known GPU peak (CPU runs)",
            labels,
            registry=self.registry,
        )
        self._grad_norm = Gauge(
            "tandem_train_grad_norm",
            "L2 norm of all gradients of the last reported step, before clipping",
            labels,
            registry=self.registry,
        )
        self.step_seconds = Histogram(
            "tandem_train_step_seconds",
            "Wall time of one optimizer step",
            labels,
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        ).labels(job)
        self._data_wait = Histogram(
            "tandem_train_data_wait_seconds",
            "Time one optimizer step waited for its batches (read, collate, copy to the device), rank 0",
            labels,
            registry=self.registry,
            buckets=DATA_WAIT_BUCKETS,
        )
        self.restarts = Counter(
            "tandem_train_restarts",
            "Worker-group restarts inside this run (Ray Train's max_failures), from its last checkpoint",
            labels,
            registry=self.registry,
        ).labels(job)
        self._gpu_utilization = gpu(
            "tandem_train_gpu_utilization_ratio",
            "Share of the last sample period the rank's GPU was busy (NVML; absent without it)",
        )
        self._gpu_allocated = gpu(
            "tandem_train_gpu_memory_allocated_bytes", "GPU memory held by tensors (torch's allocator)"
        )
        self._gpu_reserved = gpu(
            "tandem_train_gpu_memory_reserved_bytes", "GPU memory reserved by torch's caching allocator"
        )
        self._gpu_total = gpu("tandem_train_gpu_memory_total_bytes", "The rank's GPU memory")
        self.checkpoint_seconds = Histogram(
            "tandem_train_checkpoint_save_seconds",
            "Time to write and publish a checkpoint",
            labels,
            registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        ).labels(job)
        self.checkpoint_bytes = g("tandem_train_checkpoint_bytes", "Size of the last checkpoint")
        self.checkpoints = Counter(
            "tandem_train_checkpoints", "Checkpoints published", labels, registry=self.registry
        ).labels(job)
        self.last_checkpoint_step = g("tandem_train_last_checkpoint_step", "Step of the latest checkpoint")
        self.eval_loss = g("tandem_train_eval_loss", "Loss on the held-out data at the last evaluation")

    def set_mfu(self, value: float) -> None:
        self._mfu.labels(self._job).set(value)

    def set_grad_norm(self, value: float) -> None:
        self._grad_norm.labels(self._job).set(value)

    def observe_data_wait(self, seconds: float) -> None:
        self._data_wait.labels(self._job).observe(seconds)

    def set_device(self, rank: int, sample: Mapping[str, float]) -> None:
        """One rank's GPU sample (`tandem.workloads.train.devices.gpu_sample`); keys it lacks stay absent."""
        for key, gauge in (
            ("utilization", self._gpu_utilization),
            ("allocated_bytes", self._gpu_allocated),
            ("reserved_bytes", self._gpu_reserved),
            ("total_bytes", self._gpu_total),
        ):
            if key in sample:
                gauge.labels(self._job, str(rank)).set(sample[key])

    def serve(self, port: int) -> None:
        """Start the HTTP endpoint (`/metrics`) in a daemon thread."""
        from prometheus_client import start_http_server

        start_http_server(port, registry=self.registry)

    def text(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


class ProgressBar:
    """`step 120/2000 [#####.....] loss 2.31  1.2k tok/s  eta 4m10s` on one terminal line."""

    def __init__(self, stream: TextIO | None = None, width: int = 24) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self._tty = self.stream.isatty()

    def update(self, record: dict[str, Any]) -> None:
        step, total = record["step"], max(1, record["totalSteps"])
        filled = int(self.width * min(step, total) / total)
        bar = "#" * filled + "." * (self.width - filled)
        line = (
            f"step {step}/{total} [{bar}] loss {record['loss']:.4f}  "
            f"{_rate(record)}  eta {_duration(record['etaSeconds'])}"
        )
        if "evalLoss" in record:
            line += f"  eval {record['evalLoss']:.4f}"
        if "checkpoint" in record:
            line += f"  ckpt@{record['checkpoint']['step']}"
        self.stream.write(("\r" + line + "\033[K") if self._tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()


def _rate(record: dict[str, Any]) -> str:
    """Tokens/s, or samples/s for a run that reports no tokens (a user loop on other data)."""
    if record["tokensPerSecond"] or not record["samplesPerSecond"]:
        return f"{_si(record['tokensPerSecond'])} tok/s"
    return f"{_si(record['samplesPerSecond'])} samples/s"


def _si(v: float) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if v >= div:
            return f"{v / div:.1f}{unit}"
    return f"{v:.0f}"


def _duration(s: int) -> str:
    h, rem = divmod(int(s), 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


class ProgressReporter:
    """Folds step metrics and checkpoint events into the progress record and publishes it.

    Thread-safe. `step(...)` and `checkpoint(...)` take the dicts of `StepMetrics` / `CheckpointEvent`.
    """

    def __init__(
        self,
        *,
        writer: AnnotationWriter | None = None,
        metrics: TrainMetrics | None = None,
        bar: ProgressBar | None = None,
        min_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        bar_interval: float = 0.5,
        tracker: Tracker | None = None,
    ) -> None:
        self.writer, self.metrics, self.bar, self.tracker = writer, metrics, bar, tracker
        self.min_interval, self.clock, self.bar_interval = min_interval, clock, bar_interval
        self._lock = threading.Lock()
        self._last_write = -float("inf")
        self._last_bar = -float("inf")
        self._record: dict[str, Any] | None = None
        self._checkpoint: dict[str, Any] | None = None
        #: The last evaluation: {"evalLoss", "evalStep"}, carried in every record after it.
        self._eval: dict[str, Any] = {}
        self._rate: float | None = None  # smoothed steps/s for the ETA
        self.write_errors = 0

    @property
    def record(self) -> dict[str, Any] | None:
        """The latest progress record (what the annotation holds), or None before the first step."""
        with self._lock:
            return None if self._record is None else dict(self._record)

    def step(self, m: dict[str, Any]) -> None:
        with self._lock:
            sps = 1.0 / m["step_seconds"] if m["step_seconds"] > 0 else 0.0
            self._rate = sps if self._rate is None else 0.8 * self._rate + 0.2 * sps
            remaining = max(0, m["total_steps"] - m["step"])
            record: dict[str, Any] = {
                "step": m["step"],
                "totalSteps": m["total_steps"],
                "epoch": m["epoch"],
                "loss": round(float(m["loss"]), 6),
                "samplesPerSecond": round(m["samples_per_second"], 3),
                "tokensPerSecond": round(m["tokens_per_second"], 1),
                "etaSeconds": int(remaining / self._rate) if self._rate else 0,
            }
            if m.get("eval_loss") is not None:
                self._eval = {"evalLoss": round(float(m["eval_loss"]), 6), "evalStep": m["step"]}
                if self.metrics is not None:
                    self.metrics.eval_loss.set(m["eval_loss"])
            record |= self._eval
            if self._checkpoint is not None:
                record["checkpoint"] = self._checkpoint
                # A late step report (the ranks batch theirs) never takes the record below its checkpoint.
                record["step"] = max(record["step"], self._checkpoint["step"])
            record["time"] = rfc3339()
            self._record = record
            if self.metrics is not None:
                mt = self.metrics
                mt.step.set(m["step"])
                mt.total_steps.set(m["total_steps"])
                mt.loss.set(m["loss"])
                mt.lr.set(m["lr"])
                mt.samples_per_second.set(m["samples_per_second"])
                mt.tokens_per_second.set(m["tokens_per_second"])
                mt.step_seconds.observe(m["step_seconds"])
                if m.get("mfu") is not None:
                    mt.set_mfu(m["mfu"])
                if m.get("grad_norm") is not None:
                    mt.set_grad_norm(m["grad_norm"])
                if m.get("data_wait_seconds") is not None:
                    mt.observe_data_wait(m["data_wait_seconds"])
            now = self.clock()
            if self.bar is not None and (
                now - self._last_bar >= self.bar_interval or m["step"] == m["total_steps"]
            ):
                self._last_bar = now
                self.bar.update(record)
            if now - self._last_write >= self.min_interval:
                self._write_locked(now)
            if self.tracker is not None:
                self.tracker.step(m)

    def checkpoint(self, ev: dict[str, Any]) -> None:
        with self._lock:
            if self.tracker is not None:
                self.tracker.checkpoint(ev)
            self._checkpoint = {"step": ev["step"], "uri": ev["uri"], "time": ev["time"]}
            if self.metrics is not None:
                self.metrics.checkpoint_seconds.observe(ev["seconds"])
                self.metrics.checkpoint_bytes.set(ev["bytes"])
                self.metrics.checkpoints.inc()
                self.metrics.last_checkpoint_step.set(ev["step"])
            if self._record is not None:
                self._record["checkpoint"] = self._checkpoint
                # Checkpoint events can overtake the ranks' batched step reports: a checkpoint at step N
                # means N steps are done, so the record never shows fewer (kubectl showed STEP 80 beside
                # CHECKPOINT 100).
                self._record["step"] = max(self._record["step"], ev["step"])
                self._write_locked(self.clock())

    def restarted(self) -> None:
        """Ray Train restarted the worker group (a rank died; they resume from the last checkpoint)."""
        if self.metrics is not None:
            self.metrics.restarts.inc()

    def device(self, rank: int, sample: Mapping[str, float]) -> None:
        """A rank's GPU sample (utilisation, memory), taken when it reported, never on the step path."""
        if self.metrics is not None:
            self.metrics.set_device(rank, sample)

    def flush(self) -> None:
        """Write the latest record now (end of run)."""
        with self._lock:
            if self._record is not None:
                self._write_locked(self.clock())
        if self.bar is not None:
            self.bar.close()

    def _write_locked(self, now: float) -> None:
        if self.writer is None or self._record is None:
            return
        self._last_write = now
        try:
            self.writer.write(json.dumps(self._record, separators=(",", ":")))
        except Exception as exc:  # progress must never kill training
            self.write_errors += 1
            log.warning("could not write the %s annotation: %s", ANNOTATION, exc)
