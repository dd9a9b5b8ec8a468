"""Both reconcilers charge max(request, measured usage) and say how they allocated; without usage,
requests, as before."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tandem.api.inferenceservice import InferenceServiceSpec, InferenceServiceStatus
from tandem.api.trainingjob import TrainingJobSpec, TrainingJobStatus
from tandem.operator import cost
from tandem.operator.config import OperatorSettings
from tandem.operator.cost_usage import UsageSnapshot
from tandem.operator.inferenceservice.builders import Service
from tandem.operator.inferenceservice.observe import ObservedReplica
from tandem.operator.inferenceservice.reconcile import Observed
from tandem.operator.inferenceservice.reconcile import decide as decide_service
from tandem.operator.trainingjob import builders
from tandem.operator.trainingjob.observe import ClusterView, ObservedNode, ObservedPod
from tandem.operator.trainingjob.reconcile import Job
from tandem.operator.trainingjob.reconcile import decide as decide_job

T0 = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
CPU = cost.OPENCOST_CPU_USD_PER_VCPU_HOUR
#: A container asking 2 vCPUs and no memory; its usage: 6 vCPUs.
ASKED = (cost.Container(cost.Amounts(cpu=2.0), name="main"),)
BUSY = UsageSnapshot({("ml", "p-0"): {"main": cost.Usage(cpu=6.0, memory_bytes=0.0)}})
SPEC: dict[str, Any] = {
    "trainer": {"builtin": {"size": "tiny", "dataset": {"uri": "file:///d"}, "maxSteps": 1000}},
    "workers": {"replicas": 1, "resources": {"gpu": 0}},
    "checkpoint": {"storage": {"uri": "file:///c"}},
}


def training_rate(usage: UsageSnapshot | None) -> cost.Rate:
    job = Job("gpt", "ml", "uid", 1, TrainingJobSpec.model_validate(SPEC), "img")
    running = ObservedPod(
        name="p-0",
        role="head",
        attempt=1,
        index=None,
        phase="Running",
        node="c0",
        ready=True,
        deleting=False,
        created=T0,
        started=T0,
        gpus=0,
        failure="",
        scheduler_message="",
        progress=None,
        spec_hash=builders.pod_spec_hash(job.spec),
        containers=ASKED,
    )
    nodes = ClusterView({"c0": ObservedNode("c0", True, 0, None, False)}, gpus_in_use=dict)
    status = TrainingJobStatus.model_validate({"phase": "Running", "attempt": 1})
    return decide_job(job, status, [running], nodes, T0, OperatorSettings().prices(), usage).rate


SETTINGS = OperatorSettings()
SERVICE = Service(
    "s",
    "ml",
    "uid",
    InferenceServiceSpec.model_validate({"model": {"uri": "pvc://m/x"}, "runtime": "embeddings"}),
    "img",
)
REPLICA = ObservedReplica("p-0", "10.0.0.1", True, True, False, "", "", on_node=True, containers=ASKED)


def serving_rate(usage: UsageSnapshot | None) -> cost.Rate:
    observed = Observed(replicas=[REPLICA], usage=usage)
    return decide_service(SERVICE, 1, InferenceServiceStatus(), observed, T0, SETTINGS).rate


@pytest.mark.parametrize("rate_of", [training_rate, serving_rate])
def test_usage_above_the_request_is_charged_and_counted(rate_of: Any) -> None:
    measured, requested = rate_of(BUSY), rate_of(None)
    assert requested.usd_per_hour == pytest.approx(2.0 * CPU)
    assert measured.usd_per_hour == pytest.approx(6.0 * CPU)
    assert (measured.basis, requested.basis) == ("usage", "requests")
    # A snapshot that did not measure this pod (a kwok node) charges the request.
    unmeasured = rate_of(UsageSnapshot(problem="no series"))
    assert unmeasured.basis == "requests"
    assert unmeasured.usd_per_hour == pytest.approx(2.0 * CPU)


def test_the_serving_status_accrues_the_usage_rate() -> None:
    observed = Observed(replicas=[REPLICA], usage=BUSY)
    first = decide_service(SERVICE, 1, InferenceServiceStatus(), observed, T0, SETTINGS)
    assert first.status.cost is not None
    assert first.status.cost.hourly_usd == pytest.approx(round(6.0 * CPU, 4))
    hour = decide_service(SERVICE, 1, first.status, observed, T0 + timedelta(hours=1), SETTINGS)
    assert hour.status.cost is not None
    assert hour.status.cost.usd == pytest.approx(round(6.0 * CPU, 4), abs=1e-6)
