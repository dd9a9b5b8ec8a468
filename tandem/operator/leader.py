"""Leader election through a coordination.k8s.io Lease, as client-go's leaderelection does it.

Several operator replicas run at once; only the one holding the Lease reconciles. The others keep
their watch caches warm and their work queues filled, and start working the moment they take over.

- A replica takes the Lease when nobody holds it, when it is itself the holder (a restarted
  container of the same pod), or when the holder has not renewed it for `leaseDurationSeconds`,
  counted on this replica's own clock from when it last saw the Lease change (never from the
  holder's timestamps: the clocks of two machines need not agree). Writes carry the resourceVersion
  read, so two replicas racing for it cannot both win (the loser gets a 409).
- The leader renews it every `retryPeriodSeconds`; if it could not renew for `renewDeadlineSeconds`
  (shorter than the lease duration, so it stops before anyone may take over) it has lost, and the
  process exits at once, as controller-runtime's managers do: a replica that may no longer lead must
  not finish the reconciles it started. Its restart joins as a standby.
- A clean shutdown gives the Lease up, so a standby takes over within one retry period, not a lease
  duration.

A standby therefore takes over within leaseDurationSeconds + 2 x retryPeriodSeconds of the leader's
last renewal (19 s with the defaults: it sees that renewal up to one retry period late, waits the lease
duration from then, and tries again up to one retry period after it expired).

Why not kopf's peering: it pauses only kopf's own handlers and holds no lock a second replica
respects (issue 19); the Lease is what Kubernetes' own controllers use.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from tandem.operator import kube
from tandem.operator.metrics import LEADER

log = logging.getLogger(__name__)
LEASE_API = "coordination.k8s.io/v1"
#: Where a pod's own namespace is written (the ServiceAccount's projected volume).
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


@dataclass(frozen=True)
class LeaseSettings:
    """Which Lease, who we are, and the three timings (client-go's names and defaults)."""

    namespace: str
    name: str
    identity: str
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError(
                "leader election needs retryPeriodSeconds < renewDeadlineSeconds < leaseDurationSeconds "
                f"(got {self.retry_period}, {self.renew_deadline}, {self.lease_duration})"
            )


def default_identity() -> str:
    """The pod's name (the chart sets POD_NAME from the downward API), else host and process id."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}_{os.getpid()}"


def default_namespace() -> str:
    """The pod's namespace (POD_NAMESPACE, else its ServiceAccount's), else `default`."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE) as file:
            return file.read().strip() or "default"
    except OSError:
        return "default"


def _micro_time(moment: float) -> str:
    """A Lease's MicroTime (RFC 3339 with microseconds)."""
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseClient:
    """The three Lease calls, through the operator's one HTTP client, on its loop."""

    def __init__(self, settings: LeaseSettings) -> None:
        self.settings = settings
        self.path = kube.api_path(LEASE_API, "leases", settings.namespace, settings.name)

    async def get(self) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            lease: dict[str, Any] = orjson.loads(await kube.request("GET", self.path))
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return lease

    async def write(self, lease: dict[str, Any] | None, spec: dict[str, Any]) -> bool:
        """Create the Lease (`lease` None) or replace it as read; False if another replica wrote first."""
        from kubernetes.client.exceptions import ApiException

        settings = self.settings
        metadata: dict[str, Any] = {"name": settings.name, "namespace": settings.namespace}
        if lease is not None:
            metadata["resourceVersion"] = lease["metadata"]["resourceVersion"]
        body = {"apiVersion": LEASE_API, "kind": "Lease", "metadata": metadata, "spec": spec}
        try:
            if lease is None:
                await kube.request("POST", kube.api_path(LEASE_API, "leases", settings.namespace), body)
            else:
                await kube.request("PUT", self.path, body)
        except ApiException as error:
            if error.status == 409:  # created or updated by another replica since we read it
                return False
            raise
        return True


class LeaderElector:
    """Take and keep the Lease; `leading` is set while this replica leads.

    `on_lost` runs when a leader could not renew in time (the runner exits the process there).
    `clock` is monotonic seconds and `wall` the wall clock for the Lease's timestamps (tests pass
    their own).
    """

    def __init__(
        self,
        settings: LeaseSettings,
        on_lost: Callable[[], None],
        client: LeaseClient | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings, self.on_lost = settings, on_lost
        self.client = client or LeaseClient(settings)
        self.clock, self.wall = clock, wall
        self.leading = asyncio.Event()
        #: The Lease's resourceVersion last seen, and when (our clock) it was first seen.
        self._seen_version: str | None = None
        self._seen_at = 0.0
        self._renewed_at = 0.0
        #: Another replica holds the Lease now (seen in the last attempt).
        self._taken = False

    async def try_acquire_or_renew(self) -> bool:
        """One attempt (a read, maybe a write); True if this replica holds the Lease now."""
        settings, now = self.settings, self.clock()
        lease = await self.client.get()
        spec: dict[str, Any] = dict((lease or {}).get("spec") or {})
        if lease is not None:
            version = str(lease["metadata"].get("resourceVersion"))
            if version != self._seen_version:
                self._seen_version, self._seen_at = version, now
            holder = spec.get("holderIdentity") or ""
            duration = float(spec.get("leaseDurationSeconds") or settings.lease_duration)
            self._taken = bool(holder) and holder != settings.identity
            if self._taken and now < self._seen_at + duration:
                return False  # held, and renewed within its duration as far as we have seen
        mine = spec.get("holderIdentity") == settings.identity
        stamp = _micro_time(self.wall())
        new_spec = {
            "holderIdentity": settings.identity,
            "leaseDurationSeconds": int(settings.lease_duration),
            "acquireTime": spec.get("acquireTime") if mine and spec.get("acquireTime") else stamp,
            "renewTime": stamp,
            "leaseTransitions": int(spec.get("leaseTransitions") or 0) + (0 if mine or lease is None else 1),
        }
        if not await self.client.write(lease, new_spec):
            return False
        self._renewed_at = now
        return True

    async def release(self) -> None:
        """Give the Lease up (a clean shutdown), if we hold it: a standby need not wait for it to expire."""
        if not self.leading.is_set():
            return
        lease = await self.client.get()
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.settings.identity:
            return
        spec = dict(lease["spec"])
        spec.update(holderIdentity="", leaseDurationSeconds=1, renewTime=_micro_time(self.wall()))
        await self.client.write(lease, spec)
        self.leading.clear()
        LEADER.set(0)
        log.info("gave up the leader lease %s/%s", self.settings.namespace, self.settings.name)

    async def run(self) -> None:
        """Try for the Lease every retry period until it is ours, then renew it until it is lost."""
        settings = self.settings
        log.info(
            "waiting for the leader lease %s/%s as %s", settings.namespace, settings.name, settings.identity
        )
        while True:
            try:
                # Bounded: a call that hangs must not keep a leader past its renew deadline.
                held = await asyncio.wait_for(self.try_acquire_or_renew(), settings.renew_deadline)
            except Exception as error:  # an unreachable or busy API server: try again next period
                log.warning("leader election: %s", kube.bounded(str(error), 300))
                held = False
            if held and not self.leading.is_set():
                log.info("became the leader (lease %s/%s)", settings.namespace, settings.name)
                LEADER.set(1)
                self.leading.set()
            expired = self.clock() - self._renewed_at >= settings.renew_deadline
            if self.leading.is_set() and not held and (self._taken or expired):
                LEADER.set(0)
                self.leading.clear()
                log.critical(
                    "lost the leader lease %s/%s (%s)",
                    settings.namespace,
                    settings.name,
                    "another replica holds it"
                    if self._taken
                    else f"not renewed for {settings.renew_deadline:.0f} s",
                )
                self.on_lost()
                return
            await asyncio.sleep(settings.retry_period)


def when_leading(memo: Any, start: Callable[[], None]) -> None:
    """Call `start` (a controller's queue workers) once this replica leads (`memo.leading`, set at
    once without leader election). Its watch caches run all along, so a standby takes over warm."""
    leading: asyncio.Event = memo.leading

    async def wait_then_start() -> None:
        await leading.wait()
        start()

    memo.leader_waiters.append(asyncio.get_running_loop().create_task(wait_then_start()))
