"""The operator's keyed work queue in pure asyncio: one run per key at a time, no run lost, resyncs.

Reconciles are coroutines run by the queue's worker tasks; tests wait on events the reconcile sets,
never on sleeps.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from tandem.operator.workqueue import Backoff, TryAgain, WorkQueue

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.005)  # polling a condition, with the test's 10 s bound around it


def coroutine(reconcile: Callable[[str], float | None]) -> Callable[[str], Awaitable[float | None]]:
    """A plain function as a reconcile coroutine."""

    async def run(key: str) -> float | None:
        return reconcile(key)

    return run


async def with_queue(
    reconcile: Callable[[str], Awaitable[float | None]],
    body: Callable[[WorkQueue[str]], Awaitable[None]],
    workers: int = 4,
    backoff: Backoff[str] | None = None,
) -> None:
    queue: WorkQueue[str] = WorkQueue(reconcile, workers=workers, backoff=backoff)
    queue.start()
    try:
        await body(queue)
    finally:
        await queue.stop()


def test_a_key_added_many_times_while_queued_runs_once() -> None:
    runs: list[str] = []
    started: list[str] = []
    gate = asyncio.Event()

    async def reconcile(key: str) -> None:
        started.append(key)
        await gate.wait()
        runs.append(key)

    async def body(queue: WorkQueue[str]) -> None:
        queue.add("blocker-1")
        queue.add("blocker-2")
        await until(lambda: len(started) == 2)  # both workers busy until the gate opens
        for _ in range(5):
            queue.add("job")
        assert len(queue) == 1
        gate.set()
        await until(lambda: len(runs) == 3)

    run(with_queue(reconcile, body, workers=2))
    assert sorted(runs) == ["blocker-1", "blocker-2", "job"]


def test_a_key_added_while_running_runs_again_after_and_never_twice_at_once() -> None:
    active, most, runs = 0, 0, 0
    first_started, release = asyncio.Event(), asyncio.Event()

    async def reconcile(key: str) -> None:
        nonlocal active, most, runs
        active += 1
        most = max(most, active)
        first_started.set()
        await release.wait()
        active -= 1
        runs += 1

    async def body(queue: WorkQueue[str]) -> None:
        queue.add("job")
        await first_started.wait()
        queue.add("job")  # a change arrives while the first run is in progress
        queue.add("job")
        release.set()
        await until(lambda: runs == 2)

    run(with_queue(reconcile, body))
    assert most == 1  # never two reconciles of one key at the same time
    assert runs == 2  # the change is not lost, and the two adds during the run fold into one


def test_reconcile_asks_for_its_own_resync() -> None:
    runs: list[str] = []

    def reconcile(key: str) -> float | None:
        runs.append(key)
        return 0.05 if len(runs) < 3 else None  # two resyncs, then only on a change

    async def body(queue: WorkQueue[str]) -> None:
        queue.add("job")
        await until(lambda: len(runs) == 3)
        assert len(queue) == 0  # no fourth run pending: None ends the resyncs

    run(with_queue(coroutine(reconcile), body))


def test_a_sooner_add_overrides_a_later_delay_and_forget_cancels_it() -> None:
    runs: list[str] = []

    async def body(queue: WorkQueue[str]) -> None:
        queue.add("late", after=60)
        queue.add("late", after=0.01)  # due sooner: wins
        queue.add("gone", after=0.01)
        queue.forget("gone")  # the object was deleted before its resync
        await until(lambda: runs == ["late"])
        queue.add("late", after=0.01)
        queue.add("late", after=60)  # a later time never postpones an earlier one
        await until(lambda: runs == ["late", "late"])

    run(with_queue(coroutine(runs.append), body))
    assert "gone" not in runs


def test_a_failing_reconcile_is_retried_not_dropped() -> None:
    calls = 0

    def reconcile(key: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("API server unreachable")

    async def body(queue: WorkQueue[str]) -> None:
        queue.add("job")
        await until(lambda: calls == 2)

    run(with_queue(coroutine(reconcile), body, backoff=Backoff(base=0.01)))
    assert calls == 2


def test_failures_of_a_key_back_off_exponentially_with_jitter_up_to_the_cap() -> None:
    backoff: Backoff[str] = Backoff(base=1.0, cap=8.0, rng=random.Random(7))
    delays = [backoff.failed("job") for _ in range(6)]
    ceilings = [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True)), delays
    assert len({round(d, 6) for d in delays[3:]}) == 3  # jittered: keys failing together spread out
    assert backoff.failed("other") <= 1.0  # per key: another key starts from the base
    backoff.succeeded("job")
    assert backoff.failed("job") <= 1.0  # a success forgets the failures


def test_retry_after_is_a_floor_for_the_backoff() -> None:
    backoff: Backoff[str] = Backoff(base=0.5, cap=60.0, rng=random.Random(1))
    assert backoff.failed("job", retry_after=7.0) == 7.0
    assert 0.5 <= backoff.failed("job", retry_after=None) <= 1.0  # the exponent kept counting (0.5 x 2)


def test_a_try_again_waits_at_least_its_retry_after_then_runs_the_key_again() -> None:
    runs: list[float] = []

    def reconcile(key: str) -> None:
        runs.append(time.monotonic())
        if len(runs) == 1:
            raise TryAgain("429 Too Many Requests", retry_after=0.3)

    async def body(queue: WorkQueue[str]) -> None:
        queue.add("job")
        await until(lambda: len(runs) == 2)
        assert queue.backoff.failures("job") == 0  # the second run succeeded

    run(with_queue(coroutine(reconcile), body, backoff=Backoff(base=0.001)))
    assert runs[1] - runs[0] >= 0.3


def test_an_error_carrying_retry_after_is_honoured_like_try_again() -> None:
    runs: list[float] = []

    class ServerTimeout(Exception):
        retry_after = 0.2

    def reconcile(key: str) -> None:
        runs.append(time.monotonic())
        if len(runs) == 1:
            raise ServerTimeout("504")

    async def body(queue: WorkQueue[str]) -> None:
        queue.add("job")
        await until(lambda: len(runs) == 2)

    run(with_queue(coroutine(reconcile), body, backoff=Backoff(base=0.001)))
    assert runs[1] - runs[0] >= 0.2


def test_a_burst_of_adds_runs_once_and_a_sooner_one_still_wins() -> None:
    """A gang's pods change many times in a moment: one run, after the delay; an immediate ask is not
    held back by the delayed one already queued."""
    runs: list[str] = []

    async def body(queue: WorkQueue[str]) -> None:
        queue.add("job", after=0.2)  # due soon: the burst below must not postpone or repeat it
        for _ in range(50):
            queue.add("job", 0.5)
        queue.add("marker", after=0.7)  # due after every delay the burst asked for
        await until(lambda: "marker" in runs)
        assert runs == ["job", "marker"]  # one run of the job, none repeated by the burst
        queue.add("job", after=60)
        queue.add("job")
        await until(lambda: runs == ["job", "marker", "job"])  # not held until the 60 s one

    run(with_queue(coroutine(runs.append), body))
