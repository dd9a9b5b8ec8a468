"""The operator's keyed work queue in pure asyncio: one run per key at a time, no run lost, resyncs.

Reconciles run in a real thread pool; tests wait on events the reconcile sets, never on sleeps.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from tandem.operator.workqueue import WorkQueue

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.005)  # polling a condition, with the test's 10 s bound around it


async def with_queue(
    reconcile: Callable[[str], float | None],
    body: Callable[[WorkQueue[str]], Awaitable[None]],
    workers: int = 4,
) -> None:
    with ThreadPoolExecutor(workers) as executor:
        queue: WorkQueue[str] = WorkQueue(reconcile, executor, workers=workers)
        queue.start()
        try:
            await body(queue)
        finally:
            await queue.stop()


def test_a_key_added_many_times_while_queued_runs_once() -> None:
    runs: list[str] = []
    started: list[str] = []
    gate = threading.Event()

    def reconcile(key: str) -> None:
        started.append(key)
        gate.wait(5)
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
    lock = threading.Lock()
    first_started, release = threading.Event(), threading.Event()

    def reconcile(key: str) -> None:
        nonlocal active, most, runs
        with lock:
            active += 1
            most = max(most, active)
        first_started.set()
        release.wait(5)
        with lock:
            active -= 1
            runs += 1

    async def body(queue: WorkQueue[str]) -> None:
        queue.add("job")
        await until(first_started.is_set)
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

    run(with_queue(runs.append, body))
    assert "gone" not in runs


def test_a_failing_reconcile_is_retried_not_dropped(monkeypatch: Any) -> None:
    monkeypatch.setattr("tandem.operator.workqueue.ERROR_RETRY_SECONDS", 0.01)
    calls = 0

    def reconcile(key: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("API server unreachable")

    async def body(queue: WorkQueue[str]) -> None:
        queue.add("job")
        await until(lambda: calls == 2)

    run(with_queue(reconcile, body))
    assert calls == 2


def test_add_threadsafe_wakes_a_key_from_a_watch_thread() -> None:
    runs: list[str] = []

    async def body(queue: WorkQueue[str]) -> None:
        thread = threading.Thread(target=queue.add_threadsafe, args=("job",))
        thread.start()
        thread.join()
        await until(lambda: runs == ["job"])

    run(with_queue(runs.append, body))


def test_a_burst_of_threadsafe_adds_runs_once_and_a_sooner_one_still_wins() -> None:
    """A gang's pods change many times in a moment: one run, after the delay; an immediate ask from
    another thread is not held back by the delayed one already queued."""
    runs: list[str] = []

    def burst(after: float) -> None:
        for _ in range(50):
            queue_ref[0].add_threadsafe("job", after)

    queue_ref: list[WorkQueue[str]] = []

    async def body(queue: WorkQueue[str]) -> None:
        queue_ref.append(queue)
        queue.add("job", after=0.2)  # due soon: the burst below must not postpone or repeat it
        thread = threading.Thread(target=burst, args=(0.5,))
        thread.start()
        thread.join()
        queue.add("marker", after=0.7)  # due after every delay the burst asked for
        await until(lambda: "marker" in runs)
        assert runs == ["job", "marker"]  # one run of the job, none repeated by the burst
        queue.add("job", after=60)
        thread = threading.Thread(target=queue.add_threadsafe, args=("job", 0.0))
        thread.start()
        thread.join()
        await until(lambda: runs == ["job", "marker", "job"])  # not held until the 60 s one

    run(with_queue(runs.append, body))
