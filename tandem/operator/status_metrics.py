"""The resources' status as Prometheus series: what the dashboards and alerts read of the operator.

Cost and GPU time are counters whose value *is* the status's spend so far (`status.cost.usd`,
`status.cost.gpuHours`): the status survives an operator restart, so the counters do too, and
`kubectl get` and Grafana show the same numbers. Every series carries namespace, name, kind, phase
(`training` or `serving`) and model (the TrainingJob whose weights it is: a job's own name, the job a
service serves, empty for a service with a model from elsewhere), so spend joins per model in PromQL:

    sum by (model, phase) (tandem_cost_usd_total)

How the hourly cost was allocated is a series too: `tandem_cost_containers{basis="usage"|"requests"}`
counts the containers on nodes charged max(request, measured usage) and those charged their requests
alone (no usage series: a kwok node, no kubelet scrape, Prometheus down), and
`tandem_cost_idle_gpu_usd_per_hour` the price of the requested GPUs that DCGM saw idle.

A collector (not prometheus_client's Counter objects) because the values are set from the status, not
incremented; each reconcile `record`s its resource and a deleted resource is `forget`-ten. One table for
the process, registered in prometheus_client's default registry like tandem.operator.metrics.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from prometheus_client import REGISTRY
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from tandem.api.inferenceservice import InferenceServiceSpec, InferenceServiceStatus
from tandem.api.trainingjob import TrainingJobStatus
from tandem.operator import cost

Phase = Literal["training", "serving"]
LABELS = ("namespace", "name", "kind", "phase", "model")

COST = "tandem_cost_usd"
GPU_SECONDS = "tandem_gpu_seconds"
HOURLY = "tandem_cost_usd_per_hour"
GPUS = "tandem_allocated_gpus"
RESTARTS = "tandem_trainingjob_restarts"
CHECKPOINT_TIME = "tandem_trainingjob_last_checkpoint_timestamp_seconds"
STATUS_PHASE = "tandem_resource_phase"
REPLICAS = "tandem_inferenceservice_replicas"
AUTOSCALER = "tandem_inferenceservice_autoscaler_info"
CONTAINERS = "tandem_cost_containers"
IDLE_GPU = "tandem_cost_idle_gpu_usd_per_hour"


@dataclass(frozen=True)
class Row:
    """What one resource's status says, as numbers."""

    phase: Phase
    model: str
    usd: float
    gpu_hours: float
    usd_per_hour: float
    gpus: int
    status_phase: str | None = None
    restarts: int | None = None
    last_checkpoint: datetime | None = None
    #: InferenceService replicas by state (desired, ready).
    replicas: Mapping[str, int] = field(default_factory=dict)
    #: Who scales an InferenceService: builtin, external (an HPA or KEDA) or fixed (no autoscaling).
    autoscaler: str | None = None
    #: Containers on nodes priced now, and how many of them by measured usage (None: not reported).
    containers: int | None = None
    measured: int = 0
    #: What the requested GPUs that DCGM saw idle cost per hour (None: no DCGM utilisation).
    idle_gpu_usd_per_hour: float | None = None


class StatusMetrics:
    """The table of rows, and the collector that exposes it."""

    def __init__(self) -> None:
        self._rows: dict[tuple[str, str, str], Row] = {}
        self._lock = threading.Lock()

    def record(self, kind: str, namespace: str, name: str, row: Row) -> None:
        with self._lock:
            self._rows[kind, namespace, name] = row

    def forget(self, kind: str, namespace: str, name: str) -> None:
        with self._lock:
            self._rows.pop((kind, namespace, name), None)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            rows = dict(self._rows)
        cost = CounterMetricFamily(COST, "Spend so far, US dollars (status.cost.usd).", labels=LABELS)
        gpu = CounterMetricFamily(
            GPU_SECONDS, "GPU time held so far (status.cost.gpuHours x 3600).", labels=LABELS
        )
        hourly = GaugeMetricFamily(
            HOURLY, "What the pods on nodes cost per hour now, US dollars.", labels=LABELS
        )
        gpus = GaugeMetricFamily(GPUS, "GPUs that the resource's pods on nodes hold now.", labels=LABELS)
        phase = GaugeMetricFamily(
            STATUS_PHASE, "1 for the resource's status.phase.", labels=[*LABELS, "status_phase"]
        )
        restarts = CounterMetricFamily(
            RESTARTS, "Gang restarts of a TrainingJob (status.restarts).", labels=LABELS
        )
        checkpoint = GaugeMetricFamily(
            CHECKPOINT_TIME, "When the latest complete checkpoint was written (Unix time).", labels=LABELS
        )
        replicas = GaugeMetricFamily(
            REPLICAS, "An InferenceService's replicas, desired and ready.", labels=[*LABELS, "state"]
        )
        autoscaler = GaugeMetricFamily(
            AUTOSCALER,
            "1 for who scales an InferenceService (builtin, external, fixed).",
            labels=[*LABELS, "mode"],
        )
        containers = GaugeMetricFamily(
            CONTAINERS,
            "Containers on nodes priced now, by basis: max(request, usage) or requests alone.",
            labels=[*LABELS, "basis"],
        )
        idle = GaugeMetricFamily(
            IDLE_GPU, "Price per hour of the requested GPUs that DCGM saw idle, US dollars.", labels=LABELS
        )
        for (kind, namespace, name), row in sorted(rows.items()):
            labels = [namespace, name, kind, row.phase, row.model]
            cost.add_metric(labels, row.usd)
            gpu.add_metric(labels, row.gpu_hours * 3600)
            hourly.add_metric(labels, row.usd_per_hour)
            gpus.add_metric(labels, row.gpus)
            if row.status_phase:
                phase.add_metric([*labels, row.status_phase], 1)
            if row.restarts is not None:
                restarts.add_metric(labels, row.restarts)
            if row.last_checkpoint is not None:
                checkpoint.add_metric(labels, row.last_checkpoint.timestamp())
            for state, count in sorted(row.replicas.items()):
                replicas.add_metric([*labels, state], count)
            if row.autoscaler:
                autoscaler.add_metric([*labels, row.autoscaler], 1)
            if row.containers is not None:
                containers.add_metric([*labels, "usage"], row.measured)
                containers.add_metric([*labels, "requests"], row.containers - row.measured)
            if row.idle_gpu_usd_per_hour is not None:
                idle.add_metric(labels, row.idle_gpu_usd_per_hour)
        yield from (cost, gpu, hourly, gpus, phase, restarts, checkpoint, replicas, autoscaler)
        yield from (containers, idle)


STATUS_METRICS = StatusMetrics()
REGISTRY.register(STATUS_METRICS)


def _allocation(rate: cost.Rate | None) -> dict[str, Any]:
    """The row's allocation fields from the rate the reconcile priced (none: not reported)."""
    if rate is None:
        return {}
    return {
        "containers": rate.containers,
        "measured": rate.measured,
        "idle_gpu_usd_per_hour": rate.idle_gpu_usd_per_hour if rate.gpu_measured else None,
    }


def training_row(name: str, status: TrainingJobStatus, rate: cost.Rate) -> Row:
    """A TrainingJob's row: its own name is the model's."""
    spent = status.cost
    return Row(
        phase="training",
        model=name,
        usd=(spent.usd or 0.0) if spent else 0.0,
        gpu_hours=(spent.gpu_hours or 0.0) if spent else 0.0,
        usd_per_hour=rate.usd_per_hour,
        gpus=rate.gpus,
        status_phase=status.phase.value if status.phase else None,
        restarts=status.restarts or 0,
        last_checkpoint=status.last_checkpoint.time if status.last_checkpoint else None,
        **_allocation(rate),
    )


def serving_row(
    spec: InferenceServiceSpec, status: InferenceServiceStatus, rate: cost.Rate | None = None
) -> Row:
    """An InferenceService's row: the model is the TrainingJob it serves (status.model once rolled
    out, else the spec's reference), empty when its weights come from elsewhere. `rate`, the replicas'
    priced now, gives the allocation series."""
    ref = spec.model.training_job_ref
    model = (status.model.training_job if status.model else None) or (ref.name if ref else "")
    spent = status.cost
    replicas = status.replicas
    return Row(
        phase="serving",
        model=model,
        usd=(spent.usd or 0.0) if spent else 0.0,
        gpu_hours=(spent.gpu_hours or 0.0) if spent else 0.0,
        usd_per_hour=(spent.hourly_usd or 0.0) if spent else 0.0,
        gpus=(spent.gpus or 0) if spent else 0,
        status_phase=status.phase.value if status.phase else None,
        replicas={"desired": replicas.desired or 0, "ready": replicas.ready or 0} if replicas else {},
        autoscaler=spec.autoscaling.mode.value if spec.autoscaling else "fixed",
        **_allocation(rate),
    )
