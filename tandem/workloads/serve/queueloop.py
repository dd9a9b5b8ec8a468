"""What the dynamic batcher and the generation scheduler share: a bounded queue served by one asyncio loop
that computes in worker threads, with one lifecycle.

- `start` runs the subclass's `_loop` as a task; if the loop dies of a bug, everything waiting fails with
  `ModelError` (callers never wait forever).
- `_admit_check` refuses a submission the same way in both: `Draining` once closing, `NotReady` without a
  loop, `InvalidInput` for more items than the queue holds, `QueueFull` (with Retry-After) when they do not
  fit now or, where the subclass can estimate it (`expected_wait_s`) and a full batch is queued ahead of
  them already, when they would wait longer than `max_queue_wait_s` or the request timeout: shedding at the
  door in microseconds, not a late answer.
- `_wait_for_work` / `_wait_for_company`: wait for a first item, then until `size` are queued, the oldest
  has waited `max_queue_delay_ms`, or the server is draining (`hurry`).
- `close(drain=True)` refuses new work, lets the loop finish what it has, then stops it; whatever is left
  fails with `Draining`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from tandem.workloads.serve.errors import Draining, InvalidInput, ModelError, NotReady, QueueFull, ServeError

if TYPE_CHECKING:
    from tandem.workloads.serve.batcher import BatchingConfig


class Enqueued(Protocol):
    enqueued: float
    """Event-loop time at which the item was queued."""


Item = TypeVar("Item", bound=Enqueued)

DRAINING_MESSAGE = "the server is shutting down; retry on another replica"


class QueueLoop(Generic[Item]):
    """A queue of `Item`s and the loop that serves it. Use inside one running event loop."""

    def __init__(
        self, config: BatchingConfig, *, name: str, threads: int, executor: Executor | None = None
    ) -> None:
        self.config = config
        self._name = name
        self._queue: deque[Item] = deque()
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._arrived = asyncio.Event()
        self._progress = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False
        self._hurry = False

    # -- what a subclass provides -------------------------------------------------------------------

    async def _loop(self) -> None:
        """Serve the queue until cancelled; set `_progress` whenever work finishes or leaves."""
        raise NotImplementedError

    def _busy(self) -> bool:
        """Work still queued or computing (what a draining close waits for)."""
        return bool(self._queue)

    async def _stop_work(self) -> None:
        """After the loop stopped: stop whatever it started that still runs."""

    def _fail_everything(self, error: ServeError) -> None:
        """Answer everything unanswered with `error`."""
        raise NotImplementedError

    def retry_after_s(self) -> int:
        """Whole seconds until one more request's worth fits (at least 1)."""
        raise NotImplementedError

    def expected_wait_s(self) -> float:
        """How long an item queued now would likely wait before its computing starts (0: no estimate)."""
        return 0.0

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the loop on the running event loop."""
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._guarded(), name=self._name)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def hurry(self) -> None:
        """From now on serve whatever is queued without waiting for the delay (used while draining:
        requests are still accepted, but nothing waits for company that will not come)."""
        self._hurry = True
        self._arrived.set()

    async def close(self, *, drain: bool = True) -> None:
        """Refuse new work; with `drain`, finish everything first (no delay wait), then stop.

        Without `drain` (or for whatever is left when the loop is gone) unanswered work fails with `Draining`.
        """
        self._closing = True
        self.hurry()
        if drain and self._loop_alive():
            while self._busy():
                self._progress.clear()
                await self._progress.wait()
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        await self._stop_work()
        self._fail_everything(Draining(DRAINING_MESSAGE))
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _loop_alive(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    async def _guarded(self) -> None:
        try:
            await self._loop()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            self._closing = True
            self._fail_everything(ModelError(f"the {self._name} stopped: {exc!r}"))
            raise

    # -- shared steps -------------------------------------------------------------------------------

    def _admit_check(self, count: int, field: str, unit: str) -> None:
        """Raise what a submission of `count` items gets when it cannot be queued now."""
        if self._closing:
            raise Draining(DRAINING_MESSAGE)
        if not self._loop_alive():
            raise NotReady(f"the {self._name} is not running")
        limit = self.config.max_queue_size
        if count > limit:
            raise InvalidInput(field, f"at most {limit} {unit} per request")
        if len(self._queue) + count > limit:
            raise QueueFull(
                f"the queue is full ({len(self._queue)} of {limit} waiting); "
                "retry later or on another replica",
                retry_after_s=self.retry_after_s(),
            )
        # The next batch always takes whoever comes (a refusal there would only shrink batches, and with
        # them throughput); beyond it, the expected wait decides.
        bounds = [b for b in (self.config.max_queue_wait_s, self.config.timeout_s) if b]
        beyond = len(self._queue) >= self.config.max_batch_size
        if bounds and beyond and (wait := self.expected_wait_s()) > min(bounds):
            raise QueueFull(
                f"the expected wait in the queue ({wait:.2f} s, {len(self._queue)} waiting) is past the "
                f"{min(bounds):g} s this server admits (--max-queue-wait-ms, --request-timeout-s); "
                "retry later or on another replica",
                retry_after_s=self.retry_after_s(),
            )

    def check_room(self) -> None:
        """Raise what one more item would get now (`QueueFull`, `Draining`, `NotReady`): the transport asks
        before parsing a request, so a refusal costs no parsing, validation or tokenizing."""
        self._admit_check(1, "input", "items")

    async def _wait_for_work(self) -> None:
        """Until something is queued."""
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()

    async def _wait_for_company(self, size: int) -> None:
        """Until `size` items are queued, the oldest has waited `max_queue_delay_ms`, the queue is empty
        again (all cancelled), or the server hurries."""
        loop = asyncio.get_running_loop()
        delay = self.config.max_queue_delay_ms / 1000.0
        while self._queue and len(self._queue) < size and not self._hurry:
            remaining = self._queue[0].enqueued + delay - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()
            except TimeoutError:
                return
