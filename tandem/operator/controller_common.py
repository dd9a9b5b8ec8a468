"""What every resource's controller shares: spec validation, the Accepted condition, the newest bodies.

Reconcilers stay pure (spec and current status in, new status out); controllers are the thin layer that
reads what kopf and the caches hold and writes the status back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from tandem.api.common import (
    API_VERSION,
    GROUP,
    VERSION,
    Condition,
    describe_validation_error,
    set_condition,
)
from tandem.operator import kube

#: Condition every Tandem resource carries: is the spec valid and taken in hand?
ACCEPTED = "Accepted"
#: The finalizer kopf put on objects with a timer or daemon. Tandem uses neither any more; objects
#: made by an older operator still carry it, and would never finish deleting unless it is taken off.
KOPF_FINALIZER = "tandem.dev/finalizer"

ModelT = TypeVar("ModelT", bound=BaseModel)
StatusT = TypeVar("StatusT", bound=BaseModel)


#: post(object, type, reason, message): an event on one of our resources.
EventPoster = Callable[[Mapping[str, Any], str, str, str], Awaitable[None]]


class WarningsOnce:
    """Warnings a reconcile would repeat each time it runs (a refused child, a bad progress record):
    each distinct message per (object uid, reason) becomes one event, not one per reconcile."""

    def __init__(self, post: EventPoster | None = None) -> None:
        self._post = post or kube.post_event
        self._last: dict[tuple[str, str], str] = {}

    async def warn(self, body: Mapping[str, Any], uid: str, reason: str, message: str) -> None:
        if self._last.get((uid, reason)) == message:
            return
        self._last[(uid, reason)] = message
        await self._post(body, "Warning", reason, message)

    def forget(self, uid: str) -> None:
        for key in [key for key in self._last if key[0] == uid]:
            del self._last[key]


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch of the top-level status fields that changed (None removes a field)."""
    patch = {key: value for key, value in new.items() if old.get(key) != value}
    patch |= {key: None for key in old if key not in new}
    return patch


#: Reason of the conditions of a resource the API server refused a child of for good (422, 403, 400).
CREATE_REFUSED = "CreateRefused"


def with_refusal(
    status: StatusT, condition_type: str, message: str, generation: int, phase: StrEnum
) -> StatusT:
    """The status after the API server refused a child for good: `phase`, `condition_type`=False and
    Failed=True, both with reason CreateRefused and the (bounded) message, at this generation."""
    conditions = getattr(status, "conditions", [])
    states: tuple[tuple[str, Literal["True", "False"]], ...] = ((condition_type, "False"), ("Failed", "True"))
    for type_, state in states:
        refused = Condition(
            type=type_,
            status=state,
            reason=CREATE_REFUSED,
            message=kube.bounded(message),
            observed_generation=generation,
            last_transition_time=utc_now(),
        )
        conditions = set_condition(conditions, refused)
    return status.model_copy(update={"conditions": conditions, "phase": phase})


def refusal_message(child: str, refusal: kube.Refused) -> str:
    """What the condition and the event say: the child, the field the API server named, its words."""
    field = f", field {refusal.field}" if refusal.field else ""
    reason = refusal.reason or str(refusal.status)
    return kube.bounded(f"the API server refused {child} ({reason}{field}): {refusal}")


def refused_at(status: Mapping[str, Any], generation: int) -> bool:
    """Whether the stored status says the API server refused a child of this generation of the spec
    for good: nothing to retry until the spec changes."""
    return any(
        c.get("type") == "Failed"
        and c.get("reason") == CREATE_REFUSED
        and c.get("status") == "True"
        and c.get("observedGeneration") == generation
        for c in status.get("conditions") or ()
    )


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


class InvalidSpec(Exception):
    """A spec the API server took but the models reject: `status` says why (write it, then wait for
    the spec to change)."""

    def __init__(self, message: str, status: dict[str, Any]) -> None:
        super().__init__(f"invalid spec: {message}")
        self.status = status


async def validated_spec(
    model: type[ModelT], body: Mapping[str, Any], phase_on_error: str, post: EventPoster | None = None
) -> ModelT:
    """The spec, validated; an invalid one raises InvalidSpec with a status whose Accepted=False
    condition names the field, after a Warning event that says the same.

    The API server's schema and CEL rules reject most bad input before it is stored; this catches what
    they cannot express, and objects stored before a schema change.
    """
    meta, status = body["metadata"], body.get("status") or {}
    try:
        return model.model_validate(dict(body.get("spec") or {}))
    except ValidationError as error:
        message = kube.bounded("; ".join(describe_validation_error(error, prefix="spec.")))
        generation = int(meta.get("generation") or 0)
        conditions = [Condition.model_validate(c) for c in status.get("conditions") or ()]
        rejected = Condition(
            type=ACCEPTED,
            status="False",
            reason="InvalidSpec",
            message=message,
            observed_generation=generation,
            last_transition_time=utc_now(),
        )
        await (post or kube.post_event)(body, "Warning", "InvalidSpec", message)
        raise InvalidSpec(
            message,
            {
                "phase": phase_on_error,
                "observedGeneration": generation,
                "conditions": [c.to_dict() for c in set_condition(conditions, rejected)],
            },
        ) from error


class BodyStore:
    """The newest body seen of each object of one of Tandem's kinds (by namespace and name): from the
    watch, or from the reply to our own status write.

    A reconcile that ran on a body older than its own last status write would redo what that write
    recorded (count a restart twice), so a reply newer than the watch's copy replaces it, and a watch
    event older than what is held is ignored.
    """

    def __init__(self, kind: str, plural: str) -> None:
        self.kind, self.plural = kind, plural
        self._bodies: dict[tuple[str, str], dict[str, Any]] = {}

    def observe(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """An object as listed or watched, with its apiVersion and kind (list items may lack them;
        events name them): the watch cache's observation."""
        return {"apiVersion": API_VERSION, "kind": self.kind, **obj}

    async def write_status(self, namespace: str, name: str, changes: Mapping[str, Any]) -> None:
        """Merge-patch the status (nothing to write: no call) and keep the stored reply."""
        if changes:
            stored = await kube.patch_custom_object_status(
                GROUP, VERSION, self.plural, namespace, name, changes
            )
            self.put(self.observe(stored))

    def get(self, key: tuple[str, str]) -> dict[str, Any] | None:
        return self._bodies.get(key)

    def put(self, body: dict[str, Any]) -> bool:
        """Keep `body` unless what is held is newer; True if it is news (not the version held)."""
        meta = body["metadata"]
        key = (str(meta["namespace"]), str(meta["name"]))
        held = (self._bodies.get(key) or {}).get("metadata") or {}
        if held.get("uid") == meta.get("uid") and not _newer(meta, held):
            return False  # older, or the version held (the watch's echo of our own status write)
        self._bodies[key] = body
        return True

    def drop(self, key: tuple[str, str]) -> None:
        self._bodies.pop(key, None)


def _newer(meta: Mapping[str, Any], held: Mapping[str, Any]) -> bool:
    """Whether `meta`'s resourceVersion is past the held one's (etcd's are integers; else: differs)."""
    new, old = str(meta.get("resourceVersion", "")), str(held.get("resourceVersion", ""))
    return int(new) > int(old) if new.isdigit() and old.isdigit() else new != old


async def release_kopf_finalizer(body: Mapping[str, Any], plural: str) -> None:
    """Take KOPF_FINALIZER off an object that still carries it (see there); a no-op for the rest."""
    if KOPF_FINALIZER in (body["metadata"].get("finalizers") or ()):
        await kube.remove_finalizer(body, plural, KOPF_FINALIZER)
