"""What both controllers share: a spec the API server took but the models reject becomes a status that
says why (Accepted=False naming the field) and one Warning event, never a crash."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from tandem.api.trainingjob import TrainingJobSpec
from tandem.operator.controller_common import InvalidSpec, refusal_message, validated_spec

T = TypeVar("T")
VALID = {"trainer": {"builtin": {"size": "tiny", "dataset": {"uri": "file:///d"}}}, "batch": {"perDevice": 4}}


def coroutine_of(function: Callable[..., T]) -> Callable[..., Coroutine[Any, Any, T]]:
    """A plain function as the coroutine function it stands in for."""

    async def call(*args: Any) -> T:
        return function(*args)

    return call


def job(spec: dict[str, Any], generation: int = 3) -> dict[str, Any]:
    meta = {"name": "gpt", "namespace": "ml", "uid": "u1", "generation": generation, "resourceVersion": "7"}
    return {"apiVersion": "tandem.dev/v1alpha1", "kind": "TrainingJob", "metadata": meta, "spec": spec}


def test_a_valid_spec_is_returned_and_nothing_is_posted() -> None:
    posted: list[tuple[str, str, str]] = []
    post = coroutine_of(lambda _, *event: posted.append(event))
    spec = asyncio.run(validated_spec(TrainingJobSpec, job(VALID), "Failed", post=post))
    assert spec.batch.per_device == 4
    assert posted == []


def test_an_invalid_spec_is_a_failed_status_naming_the_field_and_one_warning() -> None:
    posted: list[tuple[str, str, str]] = []
    body = job({**VALID, "workers": {"replicas": 0}})
    post = coroutine_of(lambda _, *event: posted.append(event))
    with pytest.raises(InvalidSpec) as raised:
        asyncio.run(validated_spec(TrainingJobSpec, body, "Failed", post=post))
    status = raised.value.status
    assert status["phase"] == "Failed"
    assert status["observedGeneration"] == 3
    [accepted] = status["conditions"]
    assert (accepted["type"], accepted["status"], accepted["reason"]) == ("Accepted", "False", "InvalidSpec")
    assert "spec.workers.replicas" in accepted["message"]
    assert posted == [("Warning", "InvalidSpec", accepted["message"])]


def test_a_refused_service_is_failed_at_its_generation_and_waits_for_a_new_one() -> None:
    from tandem.api.common import find_condition
    from tandem.api.inferenceservice import InferenceServicePhase, InferenceServiceStatus
    from tandem.operator.controller_common import refused_at, with_refusal
    from tandem.operator.kube import MESSAGE_LIMIT, Refused

    error = Refused("x" * 50_000, status=422, reason="Invalid", field="spec.template.spec.nodeSelector")
    message = refusal_message("Deployment llm", error)
    assert message.startswith(
        "the API server refused Deployment llm (Invalid, field spec.template.spec.nodeSelector)"
    )
    status = with_refusal(
        InferenceServiceStatus(), "Ready", message, generation=4, phase=InferenceServicePhase.FAILED
    )
    stored = status.to_dict()
    assert stored["phase"] == "Failed"
    failed = find_condition(status.conditions, "Failed")
    ready = find_condition(status.conditions, "Ready")
    assert failed is not None
    assert failed.status == "True"
    assert len(failed.message) <= MESSAGE_LIMIT
    assert ready is not None
    assert ready.status == "False"
    assert ready.reason == "CreateRefused"
    assert refused_at(stored, 4)  # this spec: nothing to retry
    assert not refused_at(stored, 5)  # a new spec: try again
    assert not refused_at({}, 4)
