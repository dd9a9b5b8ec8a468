"""The status a valid InferenceService gets before its replicas exist: every printer column has a value."""

from __future__ import annotations

from typing import Any

from tandem.operator.api.common import find_condition
from tandem.operator.api.inferenceservice import InferenceServiceSpec
from tandem.operator.config import OperatorSettings
from tandem.operator.inferenceservice.reconcile import accepted_status as service_status

SERVICE: dict[str, Any] = {
    "model": {"uri": "file:///models/minilm"},
    "runtime": "embeddings",
    "resources": {"gpu": 2},
    "gpuProduct": "NVIDIA-H100-80GB-HBM3",
    "replicas": {"min": 1, "max": 4, "count": 3},
}


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
