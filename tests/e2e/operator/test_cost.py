"""Cost through the real operator: what is on a node is priced, the status and /metrics agree."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import yaml
from kubeobjects import priced_job, status_of
from operator_process import OperatorProcess, wait_for
from promcheck import check_metrics

from tandem.devinstall import Kubectl

WAIT = 60
#: One worker: 2 H100s at the chart's $4.00, 4 vCPUs and 16 GiB at OpenCost's prices; the head (CPU) too.
H100 = 4.0

pytestmark = pytest.mark.usefixtures("operator")


def apply(kubectl: Kubectl, namespace: str, manifest: dict[str, Any]) -> None:
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(manifest))


def test_a_running_job_costs_what_its_pods_hold_and_metrics_show_the_status(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    apply(kubectl, namespace, priced_job("priced"))
    labels = {
        "namespace": namespace,
        "name": "priced",
        "kind": "TrainingJob",
        "phase": "training",
        "model": "priced",
    }
    wait_for(lambda: operator.sample("tandem_allocated_gpus", **labels) == 2, WAIT, "2 GPUs on nodes")
    hourly = operator.sample("tandem_cost_usd_per_hour", **labels)
    assert hourly is not None
    assert 2 * H100 + 4 * 0.031611 + 16 * 0.004237 <= hourly < 2 * H100 + 1  # + the head's CPU and memory

    def agree() -> bool:
        usd = (status_of(kubectl, namespace, "tj", "priced").get("cost") or {}).get("usd") or 0.0
        return usd > 0 and operator.sample("tandem_cost_usd_total", **labels) == usd

    wait_for(agree, WAIT, "the spend in status and in /metrics, the same and above zero")
    # The session's operator has no Prometheus: nothing measured, every container priced by its requests.
    assert status_of(kubectl, namespace, "tj", "priced")["cost"]["allocation"] == "requests"
    check_metrics(f"http://127.0.0.1:{operator.metrics_port}/metrics")

    # `tandem cost` without Prometheus reads the same status through the kubeconfig.
    result = subprocess.run(
        [sys.executable, "-m", "tandem", "cost", "-n", namespace, "-o", "json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["source"] == "status"
    (row,) = report["models"]
    assert row["model"] == "priced"
    assert row["trainingUSD"] > 0
    assert row["servingUSD"] == 0
    assert row["crossover"] is None  # nothing serves it
    assert row["allocation"] == "requests"  # from the status: how the job is priced


def test_a_service_with_nothing_scheduled_costs_nothing(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    service = {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "huge"},
        "spec": {
            "model": {"uri": "file:///models/minilm"},
            "runtime": "embeddings",
            "resources": {"gpu": 8},
            "gpuProduct": "NVIDIA-L4",  # no such nodes here: nothing can be scheduled
            "replicas": {"min": 1, "max": 100, "count": 100},
        },
    }
    apply(kubectl, namespace, service)

    def pending() -> dict[str, Any] | None:
        status = status_of(kubectl, namespace, "tisvc", "huge")
        return status if status.get("phase") == "Pending" and status.get("cost") else None

    status = wait_for(pending, WAIT, "the service Pending with a cost")
    assert status["cost"]["hourlyUSD"] == 0  # 100 x 8 GPUs asked for, none on a node: not $3,200/h
    assert status["hourlyCostDisplay"] == "$0.00"
    labels = {"namespace": namespace, "name": "huge", "kind": "InferenceService", "phase": "serving"}
    wait_for(
        lambda: operator.sample("tandem_cost_usd_per_hour", **labels) == 0.0,
        WAIT,
        "$0/h in /metrics",
    )
