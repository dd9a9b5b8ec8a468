"""Shared API pieces: constants, quantities, tolerations, metadata, conditions, helpers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from tandem.api import common
from tandem.api.common import (
    Condition,
    ObjectMeta,
    Quantity,
    Resources,
    Toleration,
    describe_validation_error,
    display_fraction,
    display_usd,
    find_condition,
    set_condition,
)


def test_group_version() -> None:
    assert common.GROUP == "tandem.dev"
    assert common.VERSION == "v1alpha1"
    assert common.API_VERSION == "tandem.dev/v1alpha1"


class _Q(BaseModel):
    q: Quantity


@pytest.mark.parametrize("value", [0, 8, "8", "500m", "1.5", "32Gi", "512Mi", "1e3", ".5"])
def test_quantity_accepts(value: Any) -> None:
    assert _Q(q=value).q == value


@pytest.mark.parametrize("value", [0.5, True, -1, "8 GB", "32gb", "", "-1", "1.2.3"])
def test_quantity_rejects(value: Any) -> None:
    with pytest.raises(ValidationError, match="quantity"):
        _Q(q=value)


def test_resources_defaults_and_camel_case() -> None:
    res = Resources.model_validate({"gpu": 1, "cpu": "8", "memory": "32Gi"})
    assert res.to_dict() == {"gpu": 1, "cpu": "8", "memory": "32Gi"}
    assert Resources().to_dict() == {"gpu": 0}
    with pytest.raises(ValidationError, match="gpus"):
        Resources.model_validate({"gpus": 1})  # unknown fields are errors in specs


@pytest.mark.parametrize(
    ("toleration", "field"),
    [
        ({"key": "a", "operator": "Exists", "value": "x"}, "tolerations[].value"),
        ({"operator": "Equal", "value": "x"}, "tolerations[].key"),
        ({"key": "a", "value": "x", "tolerationSeconds": 30}, "tolerations[].tolerationSeconds"),
        ({"key": "a", "effect": "NoSchedule", "tolerationSeconds": 30}, "tolerations[].tolerationSeconds"),
    ],
)
def test_toleration_rules(toleration: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        Toleration.model_validate(toleration)
    assert field in str(info.value)


@pytest.mark.parametrize(
    "toleration",
    [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"operator": "Exists"},
        {"key": "dedicated", "value": "gpu"},
        {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute", "tolerationSeconds": 60},
    ],
)
def test_toleration_valid(toleration: dict[str, Any]) -> None:
    assert Toleration.model_validate(toleration).to_dict()["operator"] in ("Exists", "Equal")


@pytest.mark.parametrize("name", ["gpt-tiny", "a", "x" * 50])
def test_metadata_name_valid(name: str) -> None:
    assert ObjectMeta.model_validate({"name": name}).name == name


@pytest.mark.parametrize("name", ["x" * 51, "1abc", "Gpt", "a_b", "a-", "a.b"])
def test_metadata_name_invalid(name: str) -> None:
    with pytest.raises(ValidationError, match=r"metadata\.name"):
        ObjectMeta.model_validate({"name": name})


def test_metadata_keeps_unknown_keys() -> None:
    meta = ObjectMeta.model_validate(
        {"name": "a", "creationTimestamp": "2025-01-02T03:04:05Z", "managedFields": [{"manager": "x"}]}
    )
    assert meta.creation_timestamp == datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert meta.model_dump(mode="json", exclude_none=True)["managedFields"] == [{"manager": "x"}]


def test_condition_wire_form() -> None:
    cond = Condition.model_validate(
        {
            "type": "Ready",
            "status": "True",
            "reason": "AllReplicasReady",
            "lastTransitionTime": "2025-01-02T03:04:05Z",
            "observedGeneration": 3,
        }
    )
    assert cond.to_dict() == {
        "type": "Ready",
        "status": "True",
        "reason": "AllReplicasReady",
        "message": "",
        "lastTransitionTime": "2025-01-02T03:04:05Z",
        "observedGeneration": 3,
    }
    with pytest.raises(ValidationError):
        Condition(type="Ready", status="Yes")  # type: ignore[arg-type]


def test_set_condition_keeps_transition_time_when_status_unchanged() -> None:
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    t1 = datetime(2025, 1, 2, tzinfo=UTC)
    first = set_condition([], Condition(type="Ready", status="False", last_transition_time=t0))
    same = set_condition(first, Condition(type="Ready", status="False", reason="X", last_transition_time=t1))
    assert len(same) == 1
    assert same[0].last_transition_time == t0
    assert same[0].reason == "X"
    flipped = set_condition(same, Condition(type="Ready", status="True", last_transition_time=t1))
    assert flipped[0].last_transition_time == t1
    both = set_condition(flipped, Condition(type="Failed", status="False"))
    assert [c.type for c in both] == ["Ready", "Failed"]
    found = find_condition(both, "Failed")
    assert found is not None
    assert found.status == "False"
    assert find_condition(both, "Nope") is None


def test_display_helpers() -> None:
    assert display_fraction(2, 4) == "2/4"
    assert display_fraction(120, None) == "120"
    assert display_fraction(None, 4) == "0/4"
    assert display_fraction(None, None) is None
    assert display_usd(1.234) == "$1.23"
    assert display_usd(1234.5) == "$1,234.50"
    assert display_usd(None) is None
    assert display_usd(0) == "$0.00"
    assert display_usd(0.004612) == "$0.0046"  # a few CPU-minutes: seen to move, not "$0.00"


def test_describe_validation_error_names_fields() -> None:
    class Outer(common.SpecModel):
        tolerations: list[Toleration]

    with pytest.raises(ValidationError) as info:
        Outer.model_validate({"tolerations": [{"key": "a"}, {"operator": "Exists", "value": "v"}]})
    lines = describe_validation_error(info.value, prefix="spec.")
    assert lines == [
        "spec.tolerations[1]: tolerations[].value must be empty when tolerations[].operator is Exists"
    ]
