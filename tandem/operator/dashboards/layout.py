"""Where the panels sit: each dashboard's identity (stable UID), variables and rows of panel keys.

The content of a panel (query, unit) is in queries.py; this file only places it, so a query changes
without touching layout and a row moves without touching a query.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tandem.operator.dashboards import queries
from tandem.operator.dashboards.queries import Panel

#: Grid width of a Grafana dashboard.
GRID_WIDTH = 24
ROW_HEIGHT = 8


@dataclass(frozen=True)
class Variable:
    """A query variable: label values of `metric` (narrowed by the variables before it)."""

    name: str
    label: str
    query: str
    multi: bool = True


@dataclass(frozen=True)
class Dashboard:
    file: str
    uid: str
    title: str
    description: str
    panels: Mapping[str, Panel]
    #: Rows of (title, panel keys); panels of a row share its width equally.
    rows: tuple[tuple[str, tuple[str, ...]], ...]
    variables: tuple[Variable, ...]
    tags: tuple[str, ...] = ("tandem",)


NAMESPACE_OF = "label_values({metric}, namespace)"

SERVING = Dashboard(
    file="serving-latency.json",
    uid="tandem-serving-latency",
    title="Tandem / Serving latency",
    description="Per InferenceService: traffic, latency against the objective, queueing, batching, replicas.",
    panels=queries.SERVING,
    rows=(
        ("Traffic", ("requests", "tokens", "errors")),
        ("Latency", ("latency", "ttft", "itl")),
        ("Queueing and batching", ("queue_wait", "queue_depth", "batch_size")),
        ("Capacity", ("replicas", "autoscaler", "idle", "kv_cache")),
    ),
    variables=(
        Variable("namespace", "Namespace", NAMESPACE_OF.format(metric="tandem_serve_ready")),
        Variable(
            "service",
            "InferenceService",
            'label_values(tandem_serve_ready{namespace=~"$namespace"}, service)',
        ),
    ),
)

COST = Dashboard(
    file="cost.json",
    uid="tandem-cost",
    title="Tandem / Cost",
    description="What training and serving cost, per model, and when serving overtakes training.",
    panels=queries.COST,
    rows=(
        ("Spend now", ("hourly", "per_million_requests", "per_million_tokens")),
        ("Training to date, idle reservations", ("training_spend", "training_gpu_hours", "idle_cost")),
        ("Per model", ("cumulative", "crossover")),
    ),
    variables=(
        Variable("namespace", "Namespace", NAMESPACE_OF.format(metric="tandem_cost_usd_total")),
        Variable("model", "Model", 'label_values(tandem_cost_usd_total{namespace=~"$namespace"}, model)'),
    ),
)

TRAINING = Dashboard(
    file="training.json",
    uid="tandem-training",
    title="Tandem / Training",
    description=(
        "Per TrainingJob: loss, gradient norm, throughput, MFU, step time, data-loading wait, GPU "
        "utilisation and memory, checkpoints, restarts, GPU-hours."
    ),
    panels=queries.TRAINING,
    rows=(
        ("Progress", ("loss", "grad_norm", "progress", "tokens")),
        ("Efficiency", ("mfu", "step_time", "data_wait")),
        ("GPUs", ("gpu_utilization", "gpu_memory", "gpu_hours")),
        ("Resilience", ("checkpoint_age", "checkpoint_duration", "restarts")),
    ),
    variables=(
        Variable("namespace", "Namespace", NAMESPACE_OF.format(metric="tandem_train_step")),
        Variable("job", "TrainingJob", 'label_values(tandem_train_step{namespace=~"$namespace"}, job)'),
    ),
)

OPERATOR = Dashboard(
    file="operator.json",
    uid="tandem-operator",
    title="Tandem / Operator",
    description="The operator's reconciles, latency and errors, the resources it manages, its footprint.",
    panels=queries.OPERATOR,
    rows=(
        ("Reconciles", ("reconciles", "latency", "errors")),
        ("API and watches", ("api_latency", "watch_age", "queue")),
        ("Resources and footprint", ("phases", "cpu", "memory")),
    ),
    variables=(
        Variable("operator", "Operator scrape job", "label_values(tandem_operator_reconcile_total, job)"),
        Variable("namespace", "Namespace", NAMESPACE_OF.format(metric="tandem_resource_phase")),
    ),
)

DASHBOARDS = (SERVING, COST, TRAINING, OPERATOR)
