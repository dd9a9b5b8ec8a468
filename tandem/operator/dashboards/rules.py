"""Prometheus rules: the recording rules behind the dashboards' heavy queries, the objectives, the alerts.

Objectives and the budget are recording rules (`tandem:slo_*`, `tandem:budget_*`) rather than numbers
inside alert expressions, so the dashboards draw the same line the alerts fire on, and changing one
(the chart's `prometheusRules.objectives`) changes both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tandem.operator.autoscaler_metrics import INFERENCE_ROUTES
from tandem.operator.dashboards import queries as q

#: Default objectives and budget; the chart's `prometheusRules.objectives` values repeat these.
OBJECTIVES: dict[str, float] = {
    "latencyP99Seconds": 1.0,
    "timeToFirstTokenP99Seconds": 0.5,
    "checkpointMaxAgeSeconds": 3600.0,
    "restartsPerHour": 3.0,
    "modelBudgetUsdPerDay": 1000.0,
}
SERVE_SELECTOR = f'route=~"{INFERENCE_ROUTES}"'


def _record(name: str, expr: str) -> dict[str, Any]:
    return {"record": name, "expr": expr}


def _service(recorded: str) -> str:
    return f'label_replace({recorded}, "name", "$1", "service", "(.*)")'


def recording_rules() -> list[dict[str, Any]]:
    by = "namespace, service"
    serving_hourly = 'sum by (namespace, name, model) (tandem_cost_usd_per_hour{phase="serving"})'
    return [
        _record(
            q.REC_REQUESTS,
            f"sum by ({by}) (rate(tandem_serve_request_duration_seconds_count{{{SERVE_SELECTOR}}}[5m]))",
        ),
        _record(q.REC_TOKENS, f"sum by ({by}) (rate(tandem_serve_generated_tokens_total[5m]))"),
        _record(q.REC_PROMPT_TOKENS, f"sum by ({by}) (rate(tandem_serve_prompt_tokens_total[5m]))"),
        _record(
            q.REC_P99,
            f"histogram_quantile(0.99, sum by ({by}, le) "
            f"(rate(tandem_serve_request_duration_seconds_bucket{{{SERVE_SELECTOR}}}[5m])))",
        ),
        _record(
            q.REC_TTFT_P99,
            f"histogram_quantile(0.99, sum by ({by}, le) "
            "(rate(tandem_serve_time_to_first_token_seconds_bucket[5m])))",
        ),
        _record(
            q.REC_BUSY,
            f"clamp_max(sum by ({by}) (rate(tandem_serve_batch_duration_seconds_sum[5m])) "
            f"/ count by ({by}) (tandem_serve_ready), 1)",
        ),
        _record(
            q.REC_USD_PER_M_REQUESTS,
            f"{serving_hourly} / on (namespace, name) group_left () "
            f"({_service(q.REC_REQUESTS)} * 3600 > 0) * 1e6",
        ),
        _record(
            q.REC_USD_PER_M_TOKENS,
            f"{serving_hourly} / on (namespace, name) group_left () "
            f"(({_service(q.REC_TOKENS)} or {_service(q.REC_PROMPT_TOKENS)}) * 3600 > 0) * 1e6",
        ),
        _record(
            q.REC_IDLE_USD_PER_HOUR,
            f"{serving_hourly} * on (namespace, name) group_left () (1 - {_service(q.REC_BUSY)})",
        ),
        _record(q.REC_CROSSOVER, crossover_expr()),
    ]


def crossover_expr() -> str:
    """When serving spend S + s*t passes training spend T + r*t: t = (T - S) / (s - r), at the cost per
    hour now (the operator's gauge, not a windowed rate of the counter): right from the moment serving
    starts, where a rate over the last hour would spread a young service's spend over the whole hour (and
    over the time it waited for its checkpoint at $0), and right after training ends, where that hour
    still holds the job's last spending. A TrainingJob that has ended (Succeeded or Failed) counts 0 per
    hour even while its pods are torn down: its spend is fixed."""

    def spent(phase: str) -> str:
        return f'sum by (namespace, model) (tandem_cost_usd_total{{phase="{phase}"}})'

    ended = 'tandem_resource_phase{phase="training",status_phase=~"Succeeded|Failed"}'
    training, serving = spent("training"), spent("serving")
    serving_hourly = 'sum by (namespace, model) (tandem_cost_usd_per_hour{phase="serving"})'
    training_hourly = (
        '(sum by (namespace, model) (tandem_cost_usd_per_hour{phase="training"} '
        f"unless on (namespace, name) {ended}) or 0 * {training})"
    )
    return f"time() + ({training} - {serving}) * 3600 / ({serving_hourly} - {training_hourly} > 0) > time()"


def restarts_expr() -> str:
    """A TrainingJob's restarts over the last hour: the operator's gang restarts (new pods) plus the
    training driver's worker-group restarts inside an attempt (Ray Train's, which the operator never sees;
    the driver's `job` label is the TrainingJob's name). A `source` label keeps both sides of the `or`."""
    gang = 'label_replace(increase(tandem_trainingjob_restarts_total[1h]), "source", "gang", "", "")'
    group = (
        'label_replace(label_replace(increase(tandem_train_restarts_total[1h]), "name", "$1", "job", "(.*)"),'
        ' "source", "worker-group", "", "")'
    )
    return f"sum by (namespace, name) ({gang} or {group})"


def objective_rules(objectives: Mapping[str, float]) -> list[dict[str, Any]]:
    return [
        _record(q.SLO_P99, f"vector({objectives['latencyP99Seconds']})"),
        _record(q.SLO_TTFT_P99, f"vector({objectives['timeToFirstTokenP99Seconds']})"),
        _record("tandem:slo_checkpoint_max_age_seconds", f"vector({objectives['checkpointMaxAgeSeconds']})"),
        _record("tandem:slo_restarts_per_hour", f"vector({objectives['restartsPerHour']})"),
        _record("tandem:budget_model_usd_per_day", f"vector({objectives['modelBudgetUsdPerDay']})"),
    ]


def _alert(name: str, expr: str, for_: str, severity: str, summary: str, description: str) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": for_,
        "labels": {"severity": severity},
        "annotations": {"summary": summary, "description": description},
    }


def alert_rules() -> list[dict[str, Any]]:
    return [
        _alert(
            "TandemLatencyP99OverSLO",
            f"{q.REC_P99} > on () group_left () {q.SLO_P99}",
            "5m",
            "warning",
            "InferenceService {{ $labels.namespace }}/{{ $labels.service }}: p99 latency over its objective",
            "p99 end-to-end latency is {{ $value | humanizeDuration }} over the last 5 minutes.",
        ),
        _alert(
            "TandemTimeToFirstTokenOverSLO",
            f"{q.REC_TTFT_P99} > on () group_left () {q.SLO_TTFT_P99}",
            "5m",
            "warning",
            "InferenceService {{ $labels.namespace }}/{{ $labels.service }}: time to first token over SLO",
            "p99 time to first token is {{ $value | humanizeDuration }} over the last 5 minutes.",
        ),
        _alert(
            "TandemTrainingJobRestarting",
            f"{restarts_expr()} > on () group_left () tandem:slo_restarts_per_hour",
            "0m",
            "warning",
            "TrainingJob {{ $labels.namespace }}/{{ $labels.name }} keeps restarting",
            "{{ $value | humanize }} restarts in the last hour (gang restarts and Ray Train's worker-group "
            "restarts together).",
        ),
        _alert(
            "TandemTrainingJobNoCheckpoint",
            "time() - tandem_trainingjob_last_checkpoint_timestamp_seconds > on () group_left () "
            "tandem:slo_checkpoint_max_age_seconds and on (namespace, name) "
            'tandem_resource_phase{kind="TrainingJob",status_phase="Running"}',
            "10m",
            "warning",
            "TrainingJob {{ $labels.namespace }}/{{ $labels.name }} has not checkpointed for too long",
            "The latest checkpoint is {{ $value | humanizeDuration }} old while the job runs.",
        ),
        _alert(
            "TandemTrainingJobFailed",
            'tandem_resource_phase{kind="TrainingJob",status_phase="Failed"} == 1',
            "0m",
            "critical",
            "TrainingJob {{ $labels.namespace }}/{{ $labels.name }} failed",
            "See `kubectl describe trainingjob {{ $labels.name }} -n {{ $labels.namespace }}` for why.",
        ),
        _alert(
            "TandemModelSpendOverBudget",
            "sum by (namespace, model) (increase(tandem_cost_usd_total[1d])) "
            "> on () group_left () tandem:budget_model_usd_per_day",
            "0m",
            "warning",
            "Model {{ $labels.model }} in {{ $labels.namespace }} spent over its daily budget",
            'Training and serving together cost ${{ $value | printf "%.2f" }} in the last 24 hours.',
        ),
    ]


def rule_groups(objectives: Mapping[str, float] = OBJECTIVES) -> dict[str, Any]:
    """The whole rules file (Prometheus' `groups:` format; a PrometheusRule's spec is the same)."""
    return {
        "groups": [
            {"name": "tandem.objectives", "rules": objective_rules(objectives)},
            {"name": "tandem.recording", "rules": recording_rules()},
            {"name": "tandem.alerts", "rules": alert_rules()},
        ]
    }
