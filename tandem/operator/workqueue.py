"""A keyed work queue for level-based reconcilers, in asyncio (controller-runtime's workqueue, small).

Why not kopf timers: a kopf timer puts a finalizer on every object (one more API write per object, and
a deletion that hangs while the operator is down) and only notices a change at its next tick. Here a
watch event or a child's change queues the object's key at once, each key is reconciled by at most one
worker at a time, a key queued while it is being reconciled runs again right after, and a reconcile
asks for its own resync (`requeue after N seconds`) to keep level-based checks such as timeouts going.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
log = logging.getLogger(__name__)
#: Requeue delay after a reconcile raised: the error is logged, the key is tried again.
ERROR_RETRY_SECONDS = 5.0


class WorkQueue(Generic[K]):
    """Run `reconcile(key)` in `executor` for queued keys; it returns seconds until its next run, or None.

    `add` must be called on the loop's thread; `add_threadsafe` from any other thread (a watch thread).
    """

    def __init__(
        self,
        reconcile: Callable[[K], float | None],
        executor: Executor,
        *,
        workers: int,
    ) -> None:
        self._reconcile, self._executor, self._workers = reconcile, executor, workers
        self._ready: asyncio.Queue[K] = asyncio.Queue()
        self._queued: set[K] = set()
        self._running: set[K] = set()
        self._again: set[K] = set()
        self._timers: dict[K, asyncio.TimerHandle] = {}
        #: Loop time at which each key is due, for keys queued with a delay (read by other threads).
        self._due: dict[K, float] = {}
        self._due_lock = threading.Lock()
        self._loop = asyncio.get_running_loop()
        self._tasks: list[asyncio.Task[None]] = []

    def __len__(self) -> int:
        """Keys waiting to run now (not counting delayed ones or those running)."""
        return len(self._queued)

    def add(self, key: K, after: float = 0.0) -> None:
        """Queue `key` now, or in `after` seconds unless it is already due sooner."""
        if after <= 0:
            self._make_ready(key)
            return
        due = self._loop.time() + after
        timer = self._timers.get(key)
        if timer is not None:
            if timer.when() <= due:
                return
            timer.cancel()
        self._timers[key] = self._loop.call_at(due, self._make_ready, key)
        with self._due_lock:
            self._due[key] = due

    def add_threadsafe(self, key: K, after: float = 0.0) -> None:
        """`add` from another thread (a watch thread).

        A key already due no later than asked is left alone without waking the loop: a gang's pods
        change thousands of times a minute, and each wake-up of the loop costs more than the check.
        The due run has not started yet, so it will read what the caller changed before calling.
        """
        with self._due_lock:
            due = self._due.get(key)
        if due is not None and due <= self._loop.time() + after:
            return
        self._loop.call_soon_threadsafe(self.add, key, after)

    def forget(self, key: K) -> None:
        """Drop a pending delayed run (the object is gone); a run in progress finishes."""
        with self._due_lock:
            self._due.pop(key, None)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def start(self) -> None:
        self._tasks = [
            self._loop.create_task(self._work(), name=f"workqueue-{i}") for i in range(self._workers)
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        with self._due_lock:
            self._due.clear()

    def _make_ready(self, key: K) -> None:
        self.forget(key)
        if key in self._running:
            self._again.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._ready.put_nowait(key)

    async def _work(self) -> None:
        while True:
            key = await self._ready.get()
            self._queued.discard(key)
            self._running.add(key)
            try:
                after = await self._run(key)
            finally:
                self._running.discard(key)
            if key in self._again:
                self._again.discard(key)
                self._make_ready(key)
            elif after is not None:
                self.add(key, after)

    async def _run(self, key: K) -> float | None:
        try:
            return await self._loop.run_in_executor(self._executor, self._reconcile, key)
        except Exception:
            log.exception("reconcile of %s failed; retrying in %.0f s", key, ERROR_RETRY_SECONDS)
            return ERROR_RETRY_SECONDS
