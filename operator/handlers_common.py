"""What every resource's kopf handlers share: spec validation and the Accepted condition.

Reconcilers stay pure (spec and current status in, new status out); handlers are the thin layer that
reads what kopf and the caches hold and writes the status back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import kopf
from pydantic import BaseModel, ValidationError

from tandem.operator.api.common import Condition, describe_validation_error, set_condition

#: Condition every Tandem resource carries: is the spec valid and taken in hand?
ACCEPTED = "Accepted"

ModelT = TypeVar("ModelT", bound=BaseModel)
StatusT = TypeVar("StatusT", bound=BaseModel)


#: post(object, type, reason, message): an event on one of our resources.
EventPoster = Callable[[Mapping[str, Any], str, str, str], None]


def kopf_event(obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    """Post through kopf (only from within a kopf handler: its posting queue lives in the context)."""
    kopf.event(obj, type=type_, reason=reason, message=message)  # type: ignore[arg-type]


class WarningsOnce:
    """Warnings a reconcile would repeat each time it runs (a refused child, a bad progress record):
    each distinct message per (object uid, reason) becomes one event, not one per reconcile."""

    def __init__(self, post: EventPoster = kopf_event) -> None:
        self._post = post
        self._last: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def warn(self, body: Mapping[str, Any], uid: str, reason: str, message: str) -> None:
        with self._lock:
            if self._last.get((uid, reason)) == message:
                return
            self._last[(uid, reason)] = message
        self._post(body, "Warning", reason, message)

    def forget(self, uid: str) -> None:
        with self._lock:
            for key in [key for key in self._last if key[0] == uid]:
                del self._last[key]


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch of the top-level status fields that changed (None removes a field)."""
    patch = {key: value for key, value in new.items() if old.get(key) != value}
    patch |= {key: None for key in old if key not in new}
    return patch


def with_refusal(status: StatusT, condition_type: str, message: str, generation: int) -> StatusT:
    """The status after the API server refused a child: `condition_type`=False, reason CreateFailed."""
    refused = Condition(
        type=condition_type,
        status="False",
        reason="CreateFailed",
        message=message,
        observed_generation=generation,
        last_transition_time=utc_now(),
    )
    conditions = set_condition(getattr(status, "conditions", []), refused)
    return status.model_copy(update={"conditions": conditions})


def accepted(generation: int, conditions: Sequence[Condition]) -> list[Condition]:
    """`conditions` with Accepted=True for this generation."""
    return set_condition(
        conditions,
        Condition(
            type=ACCEPTED,
            status="True",
            reason="SpecValid",
            message="the spec is valid",
            observed_generation=generation,
            last_transition_time=utc_now(),
        ),
    )


def utc_now() -> datetime:
    """Now, to the second (Kubernetes timestamps have no fractions)."""
    return datetime.now(UTC).replace(microsecond=0)


def parse_spec_or_reject(
    model: type[ModelT],
    body: Mapping[str, Any],
    spec: Mapping[str, Any],
    status: Mapping[str, Any],
    generation: int,
    patch: kopf.Patch,
    phase_on_error: str,
    post: EventPoster = kopf_event,
) -> ModelT:
    """Validate the spec; an invalid one is a permanent failure with a condition that says why.

    The API server's schema and CEL rules reject most bad input before it is stored; this catches what
    they cannot express, and objects stored before a schema change.
    """
    try:
        return model.model_validate(dict(spec))
    except ValidationError as error:
        message = "; ".join(describe_validation_error(error, prefix="spec."))
        conditions = [Condition.model_validate(c) for c in status.get("conditions") or ()]
        rejected = Condition(
            type=ACCEPTED,
            status="False",
            reason="InvalidSpec",
            message=message,
            observed_generation=generation,
            last_transition_time=utc_now(),
        )
        patch.status["phase"] = phase_on_error
        patch.status["observedGeneration"] = generation
        patch.status["conditions"] = [c.to_dict() for c in set_condition(conditions, rejected)]
        post(body, "Warning", "InvalidSpec", message)
        raise kopf.PermanentError(f"invalid spec: {message}") from error
