"""The operator's cost and status series: the status's numbers, labelled so spend joins per model."""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tandem.api.inferenceservice import InferenceServiceSpec, InferenceServiceStatus
from tandem.api.trainingjob import TrainingJobStatus
from tandem.operator import cost
from tandem.operator.status_metrics import StatusMetrics, serving_row, training_row

CHECKPOINT = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def exposition() -> str:
    metrics = StatusMetrics()
    job = TrainingJobStatus.model_validate(
        {
            "phase": "Running",
            "restarts": 2,
            "cost": {"usd": 120.5, "gpuHours": 30.0},
            "lastCheckpoint": {
                "step": 100,
                "uri": "s3://b/gpt/step-00000100",
                "time": CHECKPOINT.isoformat(),
            },
        }
    )
    metrics.record("TrainingJob", "ml", "gpt", training_row("gpt", job, cost.Rate(16.0, 4)))
    spec = InferenceServiceSpec.model_validate(
        {"model": {"trainingJobRef": {"name": "gpt"}}, "runtime": "causal-lm", "resources": {"gpu": 1}}
    )
    service = InferenceServiceStatus.model_validate(
        {
            "phase": "Ready",
            "replicas": {"desired": 3, "ready": 2},
            "cost": {"hourlyUSD": 8.0, "gpus": 2, "usd": 4.25, "gpuHours": 1.0625},
        }
    )
    metrics.record("InferenceService", "ml", "chat", serving_row(spec, service))
    metrics.record("InferenceService", "ml", "gone", serving_row(spec, InferenceServiceStatus()))
    metrics.forget("InferenceService", "ml", "gone")
    registry = CollectorRegistry()
    registry.register(metrics)
    return generate_latest(registry).decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_cost_counters_are_the_status_numbers_labelled_by_phase_and_model() -> None:
    got = samples(exposition())
    job = (
        ("kind", "TrainingJob"),
        ("model", "gpt"),
        ("name", "gpt"),
        ("namespace", "ml"),
        ("phase", "training"),
    )
    svc = (
        ("kind", "InferenceService"),
        ("model", "gpt"),
        ("name", "chat"),
        ("namespace", "ml"),
        ("phase", "serving"),
    )
    assert got["tandem_cost_usd_total", job] == 120.5
    assert got["tandem_gpu_seconds_total", job] == 30.0 * 3600
    assert got["tandem_cost_usd_per_hour", job] == 16.0
    assert got["tandem_allocated_gpus", job] == 4
    assert got["tandem_trainingjob_restarts_total", job] == 2
    assert got["tandem_trainingjob_last_checkpoint_timestamp_seconds", job] == CHECKPOINT.timestamp()
    assert got["tandem_resource_phase", (*job, ("status_phase", "Running"))] == 1
    assert got["tandem_cost_usd_total", svc] == 4.25
    assert got["tandem_gpu_seconds_total", svc] == 1.0625 * 3600
    assert got["tandem_cost_usd_per_hour", svc] == 8.0
    assert got["tandem_inferenceservice_replicas", (*svc, ("state", "desired"))] == 3
    assert got["tandem_inferenceservice_replicas", (*svc, ("state", "ready"))] == 2
    assert got["tandem_inferenceservice_autoscaler_info", tuple(sorted((*svc, ("mode", "fixed"))))] == 1
    assert not [key for key in got if ("name", "gone") in key[1]]  # a deleted resource's series go


def test_the_exposition_passes_promtool_check_metrics() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not on PATH: `make system-tools` installs Debian's prometheus package"
    result = subprocess.run(
        [promtool, "check", "metrics"], input=exposition(), capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
