"""/healthz: freshness of every cache, depth of every queue, the last good reconcile, leadership; a
dead watch task fails it (the replica no longer sees changes), which kopf's own health cannot see."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from tandem.operator.health import ControllerHealth, Unhealthy, report


@dataclass
class FakeCache:
    name: str
    last_event: float | None
    synced: bool = True
    alive: bool = True


@dataclass
class FakeQueue:
    depth: int
    last_success: float | None

    def __len__(self) -> int:
        return self.depth


def test_the_report_says_how_fresh_and_how_busy_each_controller_is() -> None:
    jobs = ControllerHealth(
        "TrainingJob",
        [FakeCache("pods", 990.0), FakeCache("trainingjobs", None, synced=False)],
        FakeQueue(7, 995.5),
    )
    document = report([jobs], leading=True, now=1000.0)
    assert document == {
        "leader": True,
        "TrainingJob": {
            "queueDepth": 7,
            "lastReconcileAgeSeconds": 4.5,
            "caches": {
                "pods": {"synced": True, "alive": True, "lastEventAgeSeconds": 10.0},
                "trainingjobs": {"synced": False, "alive": True, "lastEventAgeSeconds": None},
            },
        },
    }


def test_an_idle_queue_still_reports_its_last_reconcile() -> None:
    jobs = ControllerHealth("TrainingJob", [FakeCache("pods", 999.0)], FakeQueue(0, 990.0))
    assert report([jobs], leading=True, now=1000.0)["TrainingJob"]["lastReconcileAgeSeconds"] == 10.0


def test_a_standby_reports_no_reconcile_yet_and_is_still_healthy() -> None:
    services = ControllerHealth("InferenceService", [FakeCache("deployments", 999.0)], FakeQueue(3, None))
    document = report([services], leading=False, now=1000.0)
    assert document["leader"] is False
    assert document["InferenceService"]["lastReconcileAgeSeconds"] is None


def test_a_dead_watch_thread_is_unhealthy_and_named() -> None:
    jobs = ControllerHealth("TrainingJob", [FakeCache("pods", 999.0, alive=False)], FakeQueue(0, 999.0))
    with pytest.raises(Unhealthy, match="TrainingJob pods"):
        report([jobs], leading=True, now=1000.0)


def test_a_watch_task_that_ended_fails_the_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caches' watches are asyncio tasks that retry every error: one that ended anyway (a bug, a
    BaseException) leaves the cache alive no more, and /healthz answers 500."""
    from tandem.operator import kube
    from tandem.operator.watchcache import WatchCache, by_name, custom_objects

    async def never_answers(*args: object, **kwargs: object) -> bytes:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    monkeypatch.setattr(kube, "request", never_answers)

    async def scenario() -> None:
        cache: WatchCache[object] = WatchCache(
            "trainingjobs", custom_objects("tandem.dev", "v1alpha1", "trainingjobs"), by_name, dict
        )
        cache.start()
        await asyncio.sleep(0)
        queue = FakeQueue(0, None)
        assert report([ControllerHealth("TrainingJob", [cache], queue)], True, 1000.0)
        cache._tasks[0].cancel()  # ends as a bug would end it, without stop()
        await asyncio.gather(*cache._tasks, return_exceptions=True)
        with pytest.raises(Unhealthy, match="TrainingJob trainingjobs"):
            report([ControllerHealth("TrainingJob", [cache], queue)], True, 1000.0)
        await cache.stop()

    asyncio.run(asyncio.wait_for(scenario(), 10))
