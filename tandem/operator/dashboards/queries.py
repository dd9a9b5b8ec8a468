"""What every dashboard panel shows: its PromQL, legend and unit, apart from where it sits (layout.py).

Selectors live in one place (as kubernetes-mixin keeps them): the replicas' series carry the labels a
ServiceMonitor gives them (`namespace`, `service` = the InferenceService's name, `pod`) and the server's
own `model`; the operator's series carry `namespace`, `name`, `kind`, `phase` and `model` (see
tandem.operator.status_metrics); the training head's carry `job` = the TrainingJob's name (scrape it
with honor_labels, so Prometheus keeps that label). Heavy aggregations read recording rules (rules.py).
The metric names are the exporters' own (tandem.workloads.serve.metrics, tandem.workloads.train.progress,
tandem.operator.metrics and status_metrics).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tandem.operator.autoscaler_metrics import INFERENCE_ROUTES

#: Dashboard variables, as Grafana expands them into label matchers (multi-value: a regex).
NS = 'namespace=~"$namespace"'
SERVICE = f'{NS},service=~"$service"'
INFERENCE = f'{SERVICE},route=~"{INFERENCE_ROUTES}"'
MODEL = f'{NS},model=~"$model"'
TRAINING_JOB = f'{NS},job=~"$job"'
RATE = "$__rate_interval"

# Recording rules (rules.py defines them; the dashboards and alerts read them).
REC_REQUESTS = "tandem:serve_requests:rate5m"
REC_TOKENS = "tandem:serve_generated_tokens:rate5m"
REC_PROMPT_TOKENS = "tandem:serve_prompt_tokens:rate5m"
REC_P99 = "tandem:serve_request_duration_seconds:p99_5m"
REC_TTFT_P99 = "tandem:serve_time_to_first_token_seconds:p99_5m"
REC_BUSY = "tandem:serve_busy_ratio:rate5m"
REC_USD_PER_M_REQUESTS = "tandem:serving_usd_per_million_requests"
REC_USD_PER_M_TOKENS = "tandem:serving_usd_per_million_tokens"
REC_IDLE_USD_PER_HOUR = "tandem:serving_idle_usd_per_hour"
REC_CROSSOVER = "tandem:model_crossover_timestamp_seconds"
SLO_P99 = "tandem:slo_latency_p99_seconds"
SLO_TTFT_P99 = "tandem:slo_time_to_first_token_p99_seconds"

Kind = Literal["timeseries", "stat", "table"]


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    """One panel's content. `unit` is a Grafana unit id (`s`, `reqps`, `currencyUSD`, `suffix:tok/s`)."""

    title: str
    unit: str
    queries: tuple[Query, ...]
    description: str = ""
    kind: Kind = "timeseries"
    #: For a stat or table: the value is the series' last one (an instant query).
    instant: bool = False


def quantiles(metric: str, selector: str, by: str = "") -> tuple[Query, ...]:
    """p50, p95 and p99 of a histogram over the panel's rate interval."""
    group = f"le{', ' + by if by else ''}"
    prefix = f"{{{{{by}}}}} " if by else ""
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
            f"{prefix}p{round(q * 100)}",
        )
        for q in (0.5, 0.95, 0.99)
    )


SERVING: dict[str, Panel] = {
    "requests": Panel(
        "Requests per second by status code",
        "reqps",
        (
            Query(
                f"sum by (code) (rate(tandem_serve_request_duration_seconds_count{{{INFERENCE}}}[{RATE}]))",
                "{{code}}",
            ),
        ),
        "Inference requests answered (health checks and /metrics excluded).",
    ),
    "tokens": Panel(
        "Tokens per second",
        "suffix:tok/s",
        (
            Query(
                f"sum by (service) (rate(tandem_serve_generated_tokens_total{{{SERVICE}}}[{RATE}]))",
                "{{service}} generated",
            ),
            Query(
                f"sum by (service) (rate(tandem_serve_prompt_tokens_total{{{SERVICE}}}[{RATE}]))",
                "{{service}} prompt",
            ),
        ),
        "Tokens generated (causal-lm) and tokens read from requests (prompts; the texts an embeddings "
        "replica embeds). A TorchScript replica has no tokens.",
    ),
    "latency": Panel(
        "End-to-end latency vs SLO",
        "s",
        (
            *quantiles("tandem_serve_request_duration_seconds", INFERENCE),
            Query(SLO_P99, "p99 SLO"),
        ),
        "Time from receiving a request to sending its response; the SLO line is the p99 objective that "
        "the TandemLatencyP99OverSLO alert uses.",
    ),
    "ttft": Panel(
        "Time to first token",
        "s",
        (*quantiles("tandem_serve_time_to_first_token_seconds", SERVICE), Query(SLO_TTFT_P99, "p99 SLO")),
        "From receiving a generation request (streamed or not) to its first token (causal-lm).",
    ),
    "itl": Panel(
        "Inter-token latency",
        "s",
        quantiles("tandem_serve_inter_token_latency_seconds", SERVICE),
        "Time between two consecutive tokens of one generated sequence (causal-lm).",
    ),
    "queue_wait": Panel(
        "Queue wait",
        "s",
        quantiles("tandem_serve_queue_wait_seconds", SERVICE)[::2],
        "Time an item waited for its batch to start (p50, p99).",
    ),
    "queue_depth": Panel(
        "Queue depth and requests in flight",
        "short",
        (
            Query(f"sum(tandem_serve_queue_depth{{{SERVICE}}})", "waiting for a batch"),
            Query(f"sum(tandem_serve_inflight_requests{{{SERVICE}}})", "in flight"),
        ),
    ),
    "batch_size": Panel(
        "Batch size",
        "short",
        (
            Query(
                f"sum(rate(tandem_serve_batch_size_sum{{{SERVICE}}}[{RATE}])) / "
                f"sum(rate(tandem_serve_batch_size_count{{{SERVICE}}}[{RATE}]))",
                "mean",
            ),
            Query(
                "histogram_quantile(0.9, sum by (le) "
                f"(rate(tandem_serve_batch_size_bucket{{{SERVICE}}}[{RATE}])))",
                "p90",
            ),
        ),
        "Items per forward pass (causal-lm: sequences per decoding step).",
    ),
    "replicas": Panel(
        "Replicas desired vs ready",
        "short",
        (Query(f'sum by (state) (tandem_inferenceservice_replicas{{{NS},name=~"$service"}})', "{{state}}"),),
        "From the operator: the count it converges to (after the autoscaler) and the ready replicas.",
    ),
    "autoscaler": Panel(
        "Autoscaler",
        "none",
        (
            Query(
                f'max by (name, mode) (tandem_inferenceservice_autoscaler_info{{{NS},name=~"$service"}})',
                "{{name}}: {{mode}}",
            ),
        ),
        "Who scales the service: builtin (the operator), external (HPA or KEDA), fixed (no autoscaling).",
        kind="stat",
        instant=True,
    ),
    "errors": Panel(
        "Errors by status code",
        "reqps",
        (
            Query(
                "sum by (code) (rate(tandem_serve_request_duration_seconds_count"
                f'{{{SERVICE},code=~"4..|5.."}}[{RATE}]))',
                "{{code}}",
            ),
            Query(
                f"sum by (reason) (rate(tandem_serve_dropped_requests_total{{{SERVICE}}}[{RATE}]))",
                "dropped: {{reason}}",
            ),
        ),
        'Answers with a 4xx or 5xx code (unknown routes count under route="(unmatched)"), and queued '
        "items dropped without an answer.",
    ),
    "idle": Panel(
        "Model idle time",
        "percentunit",
        (Query(f"clamp_min(1 - {REC_BUSY}{{{SERVICE}}}, 0)", "{{service}}"),),
        "Share of replica time with no batch running: the GPU's idle time as the server sees it (a "
        "GPU-utilisation exporter would measure the device itself).",
    ),
    "kv_cache": Panel(
        "KV cache usage",
        "percentunit",
        (
            Query(
                f"tandem_serve_kv_cache_sequences{{{SERVICE}}} "
                f"/ clamp_min(tandem_serve_kv_cache_capacity_sequences{{{SERVICE}}}, 1)",
                "{{pod}}",
            ),
        ),
        "Per replica: sequences whose keys and values are cached over the slots allocated (causal-lm; "
        "the cache grows to --max-batch-size). Near 1 with requests queued: more replicas or a larger "
        "batch help.",
    ),
}

COST: dict[str, Panel] = {
    "hourly": Panel(
        "Cost per hour by service and job",
        "currencyUSD",
        (Query(f"sum by (kind, name) (tandem_cost_usd_per_hour{{{MODEL}}})", "{{kind}} {{name}}"),),
        "What the pods on nodes cost per hour now (OpenCost's allocation: max(request, usage) x price).",
    ),
    "per_million_requests": Panel(
        "Dollars per million requests",
        "currencyUSD",
        (Query(f"{REC_USD_PER_M_REQUESTS}{{{MODEL}}}", "{{name}}"),),
        "Serving cost per hour over requests per hour, per InferenceService (last 5 minutes).",
    ),
    "per_million_tokens": Panel(
        "Dollars per million tokens",
        "currencyUSD",
        (Query(f"{REC_USD_PER_M_TOKENS}{{{MODEL}}}", "{{name}}"),),
        "Serving cost per hour over tokens per hour, per InferenceService (last 5 minutes): generated "
        "tokens where the service generates, else the tokens it embeds.",
    ),
    "training_spend": Panel(
        "Training spend to date",
        "currencyUSD",
        (Query(f'sum(tandem_cost_usd_total{{{MODEL},phase="training"}})', "training"),),
        kind="stat",
        instant=True,
    ),
    "training_gpu_hours": Panel(
        "Training GPU-hours",
        "h",
        (Query(f'sum(tandem_gpu_seconds_total{{{MODEL},phase="training"}}) / 3600', "GPU-hours"),),
        kind="stat",
        instant=True,
    ),
    "cumulative": Panel(
        "Cumulative spend per model: training vs serving",
        "currencyUSD",
        (Query(f"sum by (model, phase) (tandem_cost_usd_total{{{MODEL}}})", "{{model}} {{phase}}"),),
        "Where a model's serving line passes its training line, serving has cost more than training did "
        "(marked by the Crossover annotation).",
    ),
    "crossover": Panel(
        "Projected crossover date",
        "dateTimeAsIso",
        (Query(f"{REC_CROSSOVER}{{{MODEL}}} * 1000", "{{model}}"),),
        "When serving spend passes training spend at the cost per hour now (an ended TrainingJob adds "
        "nothing more).",
        kind="table",
        instant=True,
    ),
    "idle_cost": Panel(
        "Idle cost per hour (reserved, no batch running)",
        "currencyUSD",
        (Query(f"{REC_IDLE_USD_PER_HOUR}{{{MODEL}}}", "{{name}}"),),
        "Serving cost per hour times the replicas' idle share.",
    ),
}

#: The crossover annotation on the cumulative panel: serving spend at or above training spend.
CROSSOVER_ANNOTATION = (
    f'sum by (model) (tandem_cost_usd_total{{{MODEL},phase="serving"}}) >= '
    f'sum by (model) (tandem_cost_usd_total{{{MODEL},phase="training"}}) > 0'
)

TRAINING: dict[str, Panel] = {
    "loss": Panel("Loss", "short", (Query(f"tandem_train_loss{{{TRAINING_JOB}}}", "{{job}}"),)),
    "tokens": Panel(
        "Training tokens per second",
        "suffix:tok/s",
        (Query(f"tandem_train_tokens_per_second{{{TRAINING_JOB}}}", "{{job}}"),),
    ),
    "mfu": Panel(
        "Model FLOPs utilisation",
        "percentunit",
        (Query(f"tandem_train_mfu_ratio{{{TRAINING_JOB}}}", "{{job}}"),),
        "Estimated; GPU runs on GPUs of known peak only (absent on a CPU).",
    ),
    "grad_norm": Panel(
        "Gradient norm",
        "short",
        (Query(f"tandem_train_grad_norm{{{TRAINING_JOB}}}", "{{job}}"),),
        "L2 norm of all gradients before clipping: spikes come before loss spikes and divergence.",
    ),
    "data_wait": Panel(
        "Data-loading wait per step",
        "s",
        quantiles("tandem_train_data_wait_seconds", TRAINING_JOB, by="job")[::2],
        "Time a step waited for its batches on rank 0 (read, collate, copy to the device), p50 and p99: "
        "near the step time means the input pipeline, not the model, sets the pace.",
    ),
    "gpu_utilization": Panel(
        "GPU utilisation",
        "percentunit",
        (Query(f"tandem_train_gpu_utilization_ratio{{{TRAINING_JOB}}}", "{{job}} rank {{rank}}"),),
        "Share of time each rank's GPU was busy (NVML); absent on a CPU or without NVML.",
    ),
    "gpu_memory": Panel(
        "GPU memory",
        "bytes",
        (
            Query(
                f"tandem_train_gpu_memory_allocated_bytes{{{TRAINING_JOB}}}", "{{job}} rank {{rank}} tensors"
            ),
            Query(
                f"tandem_train_gpu_memory_reserved_bytes{{{TRAINING_JOB}}}", "{{job}} rank {{rank}} reserved"
            ),
            Query(
                f"max by (job) (tandem_train_gpu_memory_total_bytes{{{TRAINING_JOB}}})", "{{job}} GPU memory"
            ),
        ),
        "Memory held by tensors and reserved by torch's caching allocator, per rank, against the GPU's "
        "(absent on a CPU).",
    ),
    "step_time": Panel(
        "Step time",
        "s",
        quantiles("tandem_train_step_seconds", TRAINING_JOB, by="job")[::2],
        "Wall time of one optimizer step (p50, p99).",
    ),
    "progress": Panel(
        "Progress",
        "percentunit",
        (
            Query(
                f"tandem_train_step{{{TRAINING_JOB}}} / tandem_train_total_steps{{{TRAINING_JOB}}}", "{{job}}"
            ),
        ),
    ),
    "checkpoint_age": Panel(
        "Checkpoint age",
        "s",
        (
            Query(
                f'time() - tandem_trainingjob_last_checkpoint_timestamp_seconds{{{NS},name=~"$job"}}',
                "{{name}}",
            ),
        ),
        "Time since the latest complete checkpoint (from the TrainingJob's status).",
    ),
    "checkpoint_duration": Panel(
        "Checkpoint save time",
        "s",
        quantiles("tandem_train_checkpoint_save_seconds", TRAINING_JOB, by="job")[2:],
        "Time to write and publish a checkpoint (p99).",
    ),
    "restarts": Panel(
        "Restarts",
        "short",
        (
            Query(f'tandem_trainingjob_restarts_total{{{NS},name=~"$job"}}', "{{name}} gang"),
            Query(f"tandem_train_restarts_total{{{TRAINING_JOB}}}", "{{job}} worker group"),
        ),
        "Gang restarts after a failure (status.restarts: new pods), and Ray Train's worker-group restarts "
        "inside the running attempt (a rank died, the group resumed from the last checkpoint).",
    ),
    "gpu_hours": Panel(
        "GPU-hours",
        "h",
        (Query(f'tandem_gpu_seconds_total{{{NS},name=~"$job",phase="training"}} / 3600', "{{name}}"),),
    ),
}

OPERATOR_JOB = 'job=~"$operator"'

OPERATOR: dict[str, Panel] = {
    "reconciles": Panel(
        "Reconciles per second",
        "ops",
        (
            Query(
                f"sum by (kind, result) (rate(tandem_operator_reconcile_total{{{OPERATOR_JOB}}}[{RATE}]))",
                "{{kind}} {{result}}",
            ),
        ),
    ),
    "latency": Panel(
        "Reconcile latency",
        "s",
        quantiles("tandem_operator_reconcile_duration_seconds", OPERATOR_JOB, by="kind")[::2],
    ),
    "errors": Panel(
        "Reconcile errors per second",
        "ops",
        (
            Query(
                "sum by (kind) (rate(tandem_operator_reconcile_total"
                f'{{{OPERATOR_JOB},result="error"}}[{RATE}]))',
                "{{kind}}",
            ),
        ),
    ),
    "api_latency": Panel(
        "Kubernetes API latency",
        "s",
        quantiles("tandem_operator_api_request_duration_seconds", OPERATOR_JOB, by="verb")[::2],
        "The operator's API calls (watches excluded) by verb, p50 and p99.",
    ),
    "watch_age": Panel(
        "Watch freshness",
        "s",
        (
            Query(
                "time() - max by (resource) "
                f"(tandem_operator_watch_last_event_timestamp_seconds{{{OPERATOR_JOB}}})",
                "{{resource}}",
            ),
        ),
        "Seconds since each watch last heard from the API server (an event or a bookmark, about every "
        "minute): growing past a few minutes means a stuck watch.",
    ),
    "queue": Panel(
        "Work-queue depth",
        "short",
        (Query(f"sum by (kind) (tandem_operator_workqueue_depth{{{OPERATOR_JOB}}})", "{{kind}}"),),
        "Resources waiting for a reconcile: a queue that keeps growing means the operator falls behind.",
    ),
    "phases": Panel(
        "Resources by phase",
        "short",
        (Query(f"sum by (kind, status_phase) (tandem_resource_phase{{{NS}}})", "{{kind}} {{status_phase}}"),),
    ),
    "cpu": Panel(
        "Operator CPU",
        "percentunit",
        (Query(f"rate(process_cpu_seconds_total{{{OPERATOR_JOB}}}[{RATE}])", "{{instance}}"),),
    ),
    "memory": Panel(
        "Operator memory",
        "bytes",
        (Query(f"process_resident_memory_bytes{{{OPERATOR_JOB}}}", "{{instance}}"),),
    ),
}
