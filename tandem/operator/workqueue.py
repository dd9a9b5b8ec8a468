"""A keyed work queue for level-based reconcilers, in asyncio (controller-runtime's workqueue, small).

Why not kopf timers: a kopf timer puts a finalizer on every object (one more API write per object, and
a deletion that hangs while the operator is down) and only notices a change at its next tick. Here a
watch event or a child's change queues the object's key at once, each key is reconciled by at most one
worker at a time, a key queued while it is being reconciled runs again right after, and a reconcile
asks for its own resync (`requeue after N seconds`) to keep level-based checks such as timeouts going.

A reconcile that fails (raises) is tried again after a per-key exponential backoff with jitter, never
sooner than the Retry-After the API server sent (`TryAgain.retry_after`, or a `retry_after`
attribute on the error); a success forgets the key's failures. Why not tenacity: it retries a call
in place, holding the worker through every wait and missing the changes queued meanwhile; a work
queue must give the worker back and requeue the key, as controller-runtime's rate limiter does, so
the delay is computed here (`Backoff`) and the queue's timers do the waiting.

Reconciles are coroutines run by `workers` worker tasks on the operator's loop: all of it (the watch
caches that queue keys, the timers, the reconciles and their API calls) is one asyncio stack.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
log = logging.getLogger(__name__)
#: First retry delay after a reconcile of a key failed; doubled for each failure in a row.
BACKOFF_BASE_SECONDS = 1.0
#: The longest delay between two tries of a key that keeps failing (a Retry-After may ask for more).
BACKOFF_MAX_SECONDS = 300.0


class TryAgain(Exception):
    """A temporary failure (a busy API server, a conflict): the key is tried again with backoff, no
    sooner than `retry_after` seconds when set. Logged in one line, without a traceback."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Backoff(Generic[K]):
    """Per-key exponential backoff with jitter: failure n of a key in a row waits a random time
    between half and all of base x 2^(n-1), capped at `cap` (jitter spreads out the keys that failed
    together, e.g. on one API server hiccup), and no less than the server's Retry-After."""

    def __init__(
        self,
        base: float = BACKOFF_BASE_SECONDS,
        cap: float = BACKOFF_MAX_SECONDS,
        rng: random.Random | None = None,
    ) -> None:
        self.base, self.cap = base, cap
        self._failures: dict[K, int] = {}
        self._random = rng or random.Random()

    def failed(self, key: K, retry_after: float | None = None) -> float:
        """Count one more failure of `key`; seconds to wait before trying it again."""
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        ceiling = min(self.base * 2 ** min(failures - 1, 62), self.cap)
        delay = self._random.uniform(ceiling / 2, ceiling)
        return max(delay, retry_after or 0.0)

    def succeeded(self, key: K) -> None:
        """The key's reconcile went through: its next failure starts from `base` again."""
        self._failures.pop(key, None)

    def failures(self, key: K) -> int:
        return self._failures.get(key, 0)


class WorkQueue(Generic[K]):
    """Await `reconcile(key)` for queued keys, at most `workers` at once; it returns seconds until the
    key's next run, or None. Made, filled and run on one event loop."""

    def __init__(
        self,
        reconcile: Callable[[K], Awaitable[float | None]],
        *,
        workers: int,
        backoff: Backoff[K] | None = None,
    ) -> None:
        self._reconcile, self._workers = reconcile, workers
        self.backoff: Backoff[K] = backoff or Backoff()
        self._ready: asyncio.Queue[K] = asyncio.Queue()
        self._queued: set[K] = set()
        self._running: set[K] = set()
        self._again: set[K] = set()
        self._timers: dict[K, asyncio.TimerHandle] = {}
        self._loop = asyncio.get_running_loop()
        self._tasks: list[asyncio.Task[None]] = []
        #: Wall-clock time of the last reconcile that went through (None: none yet), for /healthz.
        self.last_success: float | None = None

    def __len__(self) -> int:
        """Keys waiting to run now (not counting delayed ones or those running)."""
        return len(self._queued)

    def add(self, key: K, after: float = 0.0) -> None:
        """Queue `key` now, or in `after` seconds unless it is already due sooner.

        A key already due no later than asked is left alone: a gang's pods change thousands of times a
        minute, and the due run has not started yet, so it will read what the caller changed."""
        if after <= 0:
            self._make_ready(key)
            return
        if key in self._queued:
            return  # queued to run now, and not started: it will read what changed
        due = self._loop.time() + after
        timer = self._timers.get(key)
        if timer is not None:
            if timer.when() <= due:
                return
            timer.cancel()
        self._timers[key] = self._loop.call_at(due, self._make_ready, key)

    def forget(self, key: K) -> None:
        """Drop a pending delayed run (the object is gone); a run in progress finishes."""
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    @property
    def started(self) -> bool:
        return bool(self._tasks)

    def start(self) -> None:
        """Start the workers (keys queued before are kept and run now: a standby replica queues
        what its caches see and starts working the moment it leads)."""
        if self._tasks:
            return
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
            after = await self._reconcile(key)
        except TryAgain as error:
            delay = self.backoff.failed(key, error.retry_after)
            log.warning("reconcile of %s must wait: %s; retrying in %.1f s", key, error, delay)
            return delay
        except Exception as error:
            retry_after = getattr(error, "retry_after", None)
            delay = self.backoff.failed(key, retry_after if isinstance(retry_after, int | float) else None)
            log.exception("reconcile of %s failed; retrying in %.1f s", key, delay)
            return delay
        self.backoff.succeeded(key)
        self.last_success = time.time()
        return after
