"""Leader election on a Lease: one replica leads, a standby takes over only once the leader has not
renewed for the lease duration (on its own clock), at once after a release, and never both at once.

The Lease store here keeps resourceVersions as the API server does (a write with a stale one is a
409), so racing replicas behave as they do against a real one; tests/e2e/operator/test_leader.py runs
two operator processes against a real control plane.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from tandem.operator.leader import LeaderElector, LeaseClient, LeaseSettings


class Store(LeaseClient):
    """One Lease, held in memory, with optimistic concurrency by resourceVersion. Each call yields to
    the loop first, as a real call does, so replicas racing on one loop interleave."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.version = 0
        self.fail = False

    async def get(self) -> dict[str, Any] | None:
        await asyncio.sleep(0)
        if self.fail:
            raise ConnectionError("API server unreachable")
        return copy.deepcopy(self.lease)

    async def write(self, lease: dict[str, Any] | None, spec: dict[str, Any]) -> bool:
        await asyncio.sleep(0)
        if self.fail:
            raise ConnectionError("API server unreachable")
        # The API server's compare-and-swap is atomic: no await from the read to the write here.
        current = self.lease["metadata"]["resourceVersion"] if self.lease else None
        read = lease["metadata"]["resourceVersion"] if lease else None
        if current != read:
            return False  # 409: written by another since it was read
        self.version += 1
        self.lease = {"metadata": {"resourceVersion": str(self.version)}, "spec": dict(spec)}
        return True


def attempt(elector: LeaderElector) -> bool:
    return asyncio.run(elector.try_acquire_or_renew())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def replica(store: Store, clock: Clock, identity: str, lost: list[str] | None = None) -> LeaderElector:
    settings = LeaseSettings("tandem", "tandem-operator", identity, 15.0, 10.0, 2.0)
    return LeaderElector(settings, lambda: (lost or []).append(identity), store, clock, clock)


def test_the_first_replica_leads_and_the_second_stands_by_while_the_leader_renews() -> None:
    store, clock = Store(), Clock()
    a, b = replica(store, clock, "a"), replica(store, clock, "b")
    assert attempt(a)
    assert not attempt(b)
    for _ in range(20):  # 40 s of renewals every 2 s: the standby never takes over
        clock.now += 2
        assert attempt(a)
        assert not attempt(b)
    assert store.lease is not None
    assert store.lease["spec"]["holderIdentity"] == "a"
    assert store.lease["spec"]["leaseTransitions"] == 0


def test_a_standby_takes_over_once_the_leader_has_not_renewed_for_the_lease_duration() -> None:
    store, clock = Store(), Clock()
    a, b = replica(store, clock, "a"), replica(store, clock, "b")
    assert attempt(a)
    assert not attempt(b)  # b first sees the Lease now
    clock.now += 14.9
    assert not attempt(b)
    clock.now += 0.2  # 15.1 s since b saw the last renewal
    assert attempt(b)
    assert store.lease is not None
    assert store.lease["spec"]["holderIdentity"] == "b"
    assert store.lease["spec"]["leaseTransitions"] == 1
    assert not attempt(a)  # the old leader sees it is taken


def test_the_holders_own_timestamps_are_not_trusted_only_the_standbys_clock() -> None:
    """A leader whose clock runs hours behind still keeps the Lease while it renews."""
    store, clock = Store(), Clock()
    behind = Clock()
    behind.now = clock.now - 7200
    a = LeaderElector(LeaseSettings("tandem", "l", "a"), lambda: None, store, clock, behind)
    b = replica(store, clock, "b")
    assert attempt(a)
    assert not attempt(b)
    clock.now += 2
    assert attempt(a)
    assert not attempt(b)


def test_a_restarted_replica_of_the_same_pod_leads_again_at_once() -> None:
    store, clock = Store(), Clock()
    assert attempt(replica(store, clock, "operator-0"))
    assert attempt(replica(store, clock, "operator-0"))  # same identity, new process
    assert store.lease is not None
    assert store.lease["spec"]["leaseTransitions"] == 0


def test_a_released_lease_is_taken_at_once() -> None:
    store, clock = Store(), Clock()
    a, b = replica(store, clock, "a"), replica(store, clock, "b")
    assert attempt(a)
    a.leading.set()
    assert not attempt(b)
    asyncio.run(a.release())
    assert not a.leading.is_set()
    assert attempt(b)  # no lease duration to wait


def test_two_replicas_racing_for_a_free_lease_never_both_win() -> None:
    store, clock = Store(), Clock()
    replicas = [replica(store, clock, f"r{i}") for i in range(8)]

    async def race() -> list[bool]:  # every replica reads the free Lease before any writes it
        return list(await asyncio.gather(*(r.try_acquire_or_renew() for r in replicas)))

    won = [r.settings.identity for r, held in zip(replicas, asyncio.run(race()), strict=True) if held]
    assert len(won) == 1
    assert store.lease is not None
    assert store.lease["spec"]["holderIdentity"] == won[0]


def test_a_leader_that_cannot_renew_within_the_deadline_gives_up_and_says_so() -> None:
    store = Store()
    lost: list[str] = []
    settings = LeaseSettings("tandem", "l", "a", lease_duration=0.6, renew_deadline=0.3, retry_period=0.02)
    elector = LeaderElector(settings, lambda: lost.append("a"), store)

    async def scenario() -> None:
        task = asyncio.create_task(elector.run())
        await asyncio.wait_for(elector.leading.wait(), 10)
        store.fail = True  # the API server goes away: renewals fail
        await asyncio.wait_for(task, 10)  # run() returns once it has lost

    asyncio.run(scenario())
    assert lost == ["a"]
    assert not elector.leading.is_set()


def test_timings_that_would_let_two_replicas_lead_are_refused() -> None:
    with pytest.raises(ValueError, match="retryPeriodSeconds < renewDeadlineSeconds < leaseDurationSeconds"):
        LeaseSettings("tandem", "l", "a", lease_duration=10, renew_deadline=10, retry_period=2)
