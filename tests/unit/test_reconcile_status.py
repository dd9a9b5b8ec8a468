"""The status a valid resource gets before its children exist: every printer column has a value."""

from __future__ import annotations

from typing import Any

from tandem.operator.api.common import find_condition
from tandem.operator.api.inferenceservice import InferenceServiceSpec
from tandem.operator.api.trainingjob import TrainingJobSpec
from tandem.operator.config import OperatorSettings
from tandem.operator.inferenceservice.reconcile import accepted_status as service_status
from tandem.operator.trainingjob.reconcile import accepted_status as job_status

JOB: dict[str, Any] = {
    "trainer": {"builtin": {"size": "tiny", "dataset": {"uri": "file:///data"}, "maxSteps": 300}},
    "workers": {"replicas": 4, "resources": {"gpu": 1}},
    "batch": {"global": 64, "perDevice": 8},
}
SERVICE: dict[str, Any] = {
    "model": {"uri": "file:///models/minilm"},
    "runtime": "embeddings",
    "resources": {"gpu": 2},
    "gpuProduct": "NVIDIA-H100-80GB-HBM3",
    "replicas": {"min": 1, "max": 4, "count": 3},
}


def test_new_trainingjob_is_pending_with_every_column() -> None:
    status = job_status(TrainingJobSpec.model_validate(JOB), {}, generation=1).to_dict()
    assert status["phase"] == "Pending"
    assert status["workersDisplay"] == "0/4"
    assert status["stepDisplay"] == "0/300"
    assert status["costDisplay"] == "$0.00"
    assert status["restarts"] == 0
    assert status["observedGeneration"] == 1
    accepted = [c for c in status["conditions"] if c["type"] == "Accepted"]
    assert accepted[0]["status"] == "True"
    assert accepted[0]["observedGeneration"] == 1


def test_trainingjob_keeps_observed_facts_across_reconciles() -> None:
    current = {
        "phase": "Running",
        "progress": {"step": 120, "totalSteps": 300, "loss": 2.5},
        "restarts": 2,
        "workers": {"desired": 4, "ready": 3},
        "cost": {"gpuHours": 1.5, "usd": 6.0},
    }
    status = job_status(TrainingJobSpec.model_validate(JOB), current, generation=2)
    assert status.phase == "Running"
    assert status.progress is not None
    assert status.progress.step == 120
    assert status.restarts == 2
    assert status.to_dict()["workersDisplay"] == "3/4"
    assert status.to_dict()["costDisplay"] == "$6.00"


def test_suspended_trainingjob_and_resume() -> None:
    suspended = job_status(TrainingJobSpec.model_validate({**JOB, "suspend": True}), {}, generation=1)
    assert suspended.phase == "Suspended"
    resumed = job_status(TrainingJobSpec.model_validate(JOB), suspended.to_dict(), generation=2)
    assert resumed.phase == "Pending"


def test_inferenceservice_status_prices_its_replicas() -> None:
    settings = OperatorSettings()
    spec = InferenceServiceSpec.model_validate(SERVICE)
    status = service_status("minilm", spec, {}, generation=1, settings=settings)
    wire = status.to_dict()
    assert wire["phase"] == "Pending"
    assert wire["replicas"] == {"desired": 3, "ready": 0}
    assert wire["selector"] == "tandem.dev/inferenceservice=minilm"
    assert wire["cost"]["hourlyUSD"] == 3 * 2 * 4.0
    assert wire["model"]["uri"] == "file:///models/minilm"
    accepted = find_condition(status.conditions, "Accepted")
    assert accepted is not None
    assert accepted.status == "True"


def test_suspended_inferenceservice_wants_no_replicas_and_costs_nothing() -> None:
    spec = InferenceServiceSpec.model_validate({**SERVICE, "suspend": True})
    status = service_status("minilm", spec, {}, generation=1, settings=OperatorSettings())
    assert status.phase == "Suspended"
    assert status.replicas is not None
    assert status.replicas.desired == 0
    assert status.cost is not None
    assert status.cost.hourly_usd == 0
