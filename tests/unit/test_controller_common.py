"""What both controllers share: a spec the API server took but the models reject becomes a status that
says why (Accepted=False naming the field) and one Warning event, never a crash."""

from __future__ import annotations

from typing import Any

import pytest

from tandem.api.trainingjob import TrainingJobSpec
from tandem.operator.controller_common import InvalidSpec, validated_spec

VALID = {"trainer": {"builtin": {"size": "tiny", "dataset": {"uri": "file:///d"}}}, "batch": {"perDevice": 4}}


def job(spec: dict[str, Any], generation: int = 3) -> dict[str, Any]:
    meta = {"name": "gpt", "namespace": "ml", "uid": "u1", "generation": generation, "resourceVersion": "7"}
    return {"apiVersion": "tandem.dev/v1alpha1", "kind": "TrainingJob", "metadata": meta, "spec": spec}


def test_a_valid_spec_is_returned_and_nothing_is_posted() -> None:
    posted: list[tuple[str, str, str]] = []
    spec = validated_spec(TrainingJobSpec, job(VALID), "Failed", post=lambda _, *event: posted.append(event))
    assert spec.batch.per_device == 4
    assert posted == []


def test_an_invalid_spec_is_a_failed_status_naming_the_field_and_one_warning() -> None:
    posted: list[tuple[str, str, str]] = []
    body = job({**VALID, "workers": {"replicas": 0}})
    with pytest.raises(InvalidSpec) as raised:
        validated_spec(TrainingJobSpec, body, "Failed", post=lambda _, *event: posted.append(event))
    status = raised.value.status
    assert status["phase"] == "Failed"
    assert status["observedGeneration"] == 3
    [accepted] = status["conditions"]
    assert (accepted["type"], accepted["status"], accepted["reason"]) == ("Accepted", "False", "InvalidSpec")
    assert "spec.workers.replicas" in accepted["message"]
    assert posted == [("Warning", "InvalidSpec", accepted["message"])]
