"""What /healthz says: per controller, its caches' freshness, its queue's depth and its last good
reconcile, and whether this replica leads; and it fails (HTTP 500, the kubelet restarts the pod) when
a watch task has ended, which kopf's own health cannot see (the caches are Tandem's, not kopf's).

Served through kopf's liveness endpoint: a `@kopf.on.probe` handler's result is part of its JSON, and
one that raises `kopf.PermanentError` makes it answer 500 (runner.py registers it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class Cache(Protocol):
    name: str
    last_event: float | None

    @property
    def synced(self) -> bool: ...

    @property
    def alive(self) -> bool: ...


class Queue(Protocol):
    last_success: float | None

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class ControllerHealth:
    """One controller as /healthz sees it."""

    kind: str
    caches: Sequence[Cache]
    queue: Queue | None


class Unhealthy(Exception):
    """A watch task ended: the replica no longer sees changes and must be restarted."""


def _age(moment: float | None, now: float) -> float | None:
    return None if moment is None else round(max(now - moment, 0.0), 1)


def report(controllers: Iterable[ControllerHealth], leading: bool, now: float) -> dict[str, Any]:
    """The health document; raises Unhealthy naming every dead watch."""
    document: dict[str, Any] = {"leader": leading}
    dead = []
    for controller in controllers:
        queue = controller.queue
        document[controller.kind] = {
            "queueDepth": len(queue) if queue is not None else None,
            "lastReconcileAgeSeconds": _age(queue.last_success if queue is not None else None, now),
            "caches": {
                cache.name: {
                    "synced": cache.synced,
                    "alive": cache.alive,
                    "lastEventAgeSeconds": _age(cache.last_event, now),
                }
                for cache in controller.caches
            },
        }
        dead += [f"{controller.kind} {cache.name}" for cache in controller.caches if not cache.alive]
    if dead:
        raise Unhealthy(f"watch tasks ended: {', '.join(dead)} (restart the operator); health: {document}")
    return document
