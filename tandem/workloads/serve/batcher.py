"""Dynamic batching in pure asyncio: no HTTP, no torch.

Callers `submit` items; each waits on a future. One loop forms batches: it waits for the first item, then
until the batch is full (or reaches the largest preferred size) or the oldest item has waited
`max_queue_delay_ms`. A batch runs `predict(items) -> results` in a thread so the event loop keeps
accepting requests, and the next batch forms while the model computes. At most `max_concurrent_batches`
batches run at once: the loop takes a slot *before* it forms a batch, so requests that arrive while the model
is busy join the next batch instead of waiting behind a half-empty one.

Guarantees: every submitted future is resolved (result, its own error, a timeout or a shutdown error); a
batch that fails is run again in halves until the failing items are found, so one bad item fails alone;
cancelled or timed-out items are dropped before compute; `predict` must return one result per item (checked);
the queue is bounded (`QueueFull` carries a Retry-After estimate). Start, drain, shutdown and admission are
shared with the generation scheduler (`queueloop.QueueLoop`).
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Final, Generic, Protocol, TypeVar

from tandem.api.serving import Batching
from tandem.workloads.serve.errors import Draining, ModelError, RequestTimeout, ServeError
from tandem.workloads.serve.queueloop import QueueLoop

In = TypeVar("In")
Out = TypeVar("Out")


_DEFAULTS: Final = Batching()
"""The shared model's defaults, the one place they are written."""
#: The request-timeout timer counts a deadline this close as reached (timers fire to the millisecond).
EXPIRY_SLACK_S: Final = 0.002


@dataclass(frozen=True)
class BatchingConfig:
    """Knobs of the dynamic batcher: the InferenceService's `spec.batching` (`tandem.api.serving.Batching`),
    whose defaults these are."""

    max_batch_size: int = _DEFAULTS.max_batch_size
    """Most items in one `predict` call."""
    max_queue_delay_ms: float = _DEFAULTS.max_queue_delay_ms
    """Longest the oldest queued item waits for its batch to fill; 0 runs whatever is queued."""
    max_queue_size: int = _DEFAULTS.max_queue_size
    """Most items waiting; beyond it `submit` raises `QueueFull`."""
    preferred_batch_sizes: tuple[int, ...] = tuple(_DEFAULTS.preferred_batch_sizes or ())
    """Sizes the model runs best at (compiled shapes): dispatch as soon as the largest is reached; when the
    delay expires, send the largest preferred size that is queued (the rest goes next)."""
    max_concurrent_batches: int = _DEFAULTS.max_concurrent_batches
    """Batches computing at once (more overlaps pre/post-processing with compute on a GPU)."""
    timeout_s: float | None = _DEFAULTS.request_timeout_s or None
    """Per-request limit from submit to result (queueing included); None waits forever."""
    max_queue_wait_s: float | None = _DEFAULTS.max_queue_wait_ms / 1000.0 or None
    """Refuse (`QueueFull`) a submission expected to wait longer than this before its batch starts; None:
    no limit but the timeout."""

    @classmethod
    def from_spec(cls, batching: Batching) -> BatchingConfig:
        """The batcher's knobs from the shared batching model (0 s of timeout means none)."""
        return cls(
            max_batch_size=batching.max_batch_size,
            max_queue_delay_ms=batching.max_queue_delay_ms,
            max_queue_size=batching.max_queue_size,
            preferred_batch_sizes=tuple(batching.preferred_batch_sizes or ()),
            max_concurrent_batches=batching.max_concurrent_batches,
            timeout_s=batching.request_timeout_s or None,
            max_queue_wait_s=batching.max_queue_wait_ms / 1000.0 or None,
        )

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.max_queue_delay_ms < 0:
            raise ValueError("max_queue_delay_ms must be >= 0")
        if self.max_queue_size < self.max_batch_size:
            raise ValueError(
                "max_queue_size must be >= max_batch_size (a full batch has to fit in the queue)"
            )
        if self.max_concurrent_batches < 1:
            raise ValueError("max_concurrent_batches must be >= 1")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError("timeout_s must be > 0 (or None for no limit)")
        for size in self.preferred_batch_sizes:
            if not 1 <= size <= self.max_batch_size:
                raise ValueError(f"preferred batch size {size} must be between 1 and max_batch_size")

    @property
    def dispatch_size(self) -> int:
        """Queue length at which a batch leaves at once, without waiting for the delay."""
        return max(self.preferred_batch_sizes, default=self.max_batch_size)


class BatchObserver(Protocol):
    """Metrics hooks (called on the event loop; must be cheap and never raise)."""

    def queue_depth(self, depth: int) -> None: ...

    def batch_started(self, size: int, queue_waits_s: Sequence[float]) -> None: ...

    def batch_finished(self, size: int, seconds: float, error: BaseException | None) -> None: ...

    def dropped(self, reason: str) -> None:
        """An item left the queue without being computed: `cancelled` or `timeout`."""


class NullObserver:
    def queue_depth(self, depth: int) -> None:
        pass

    def batch_started(self, size: int, queue_waits_s: Sequence[float]) -> None:
        pass

    def batch_finished(self, size: int, seconds: float, error: BaseException | None) -> None:
        pass

    def dropped(self, reason: str) -> None:
        pass


@dataclass(eq=False)
class _Pending(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out]
    enqueued: float
    queued: bool = True
    answered: bool = False
    drop_reason: str | None = field(default=None)


@dataclass(frozen=True, slots=True)
class _Outcome(Generic[Out]):
    result: Out | None
    error: ServeError | None = None


class Batcher(QueueLoop[_Pending[In, Out]], Generic[In, Out]):
    """Groups concurrent `submit` calls into `predict` calls. Use inside one running event loop."""

    def __init__(
        self,
        predict: Callable[[list[In]], Sequence[Out]],
        config: BatchingConfig,
        *,
        observer: BatchObserver | None = None,
        executor: Executor | None = None,
        batch_seconds: float = 0.0,
    ) -> None:
        """`batch_seconds`: a first estimate of one batch's compute time (e.g. the warm-up's), until batches
        have been timed; 0 = none (no admission by expected wait before the first batch finishes)."""
        super().__init__(config, name="batcher", threads=config.max_concurrent_batches, executor=executor)
        self._predict = predict
        self._observer: BatchObserver = observer or NullObserver()
        self._slots = asyncio.Semaphore(config.max_concurrent_batches)
        self._running: set[asyncio.Task[None]] = set()
        # moving average of a batch's compute time (Retry-After, admission by expected wait)
        self._batch_seconds = batch_seconds
        self._last_start = 0.0  # event-loop time at which the newest batch started computing
        # The request timeout: submissions in flight with their deadlines, oldest first (one timeout for
        # all, so deadlines come in order), and one timer for the oldest. An `asyncio.timeout` per request
        # (a timer armed and cancelled each time) was ~8% of the event loop's time at saturation.
        self._deadlines: OrderedDict[int, tuple[float, list[_Pending[In, Out]]]] = OrderedDict()
        self._submitted = 0
        self._expiry: asyncio.TimerHandle | None = None

    @property
    def running_batches(self) -> int:
        return len(self._running)

    def _busy(self) -> bool:
        return bool(self._queue or self._running)

    async def _stop_work(self) -> None:
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)

    # -- submitting ---------------------------------------------------------------------------------

    async def submit(self, item: In) -> Out:
        """Queue one item and wait for its result."""
        return (await self.submit_many([item]))[0]

    async def submit_many(self, items: Sequence[In]) -> list[Out]:
        """Queue several items at once (all or none) and wait for all their results.

        Raises `QueueFull` if they do not all fit, `RequestTimeout` after `timeout_s`, `Draining` once
        `close` was called, or whatever the batch's `predict` raised (wrapped in `ModelError` unless it is a
        `ServeError` already).
        """
        self._admit_check(len(items), "input", "items")
        loop = asyncio.get_running_loop()
        now = loop.time()
        pending: list[_Pending[In, Out]] = [_Pending(item, loop.create_future(), now) for item in items]
        self._queue.extend(pending)
        self._observer.queue_depth(len(self._queue))
        self._arrived.set()
        key = self._submitted
        self._submitted += 1
        timeout_s = self.config.timeout_s
        if timeout_s is not None:
            self._deadlines[key] = (now + timeout_s, pending)
            if self._expiry is None:
                self._expiry = loop.call_at(now + timeout_s, self._expire_due)
        try:
            if len(pending) == 1:  # the common case: no gathering future
                return [await pending[0].future]
            return list(await asyncio.gather(*(p.future for p in pending)))
        finally:
            self._deadlines.pop(key, None)
            self._drop(pending, "cancelled")

    def _expire_due(self) -> None:
        """The timer: every submission past its deadline fails with `RequestTimeout` (its items leave the
        queue, or their batch's results are dropped); then the timer is set for the next deadline."""
        self._expiry = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._deadlines:
            key, (deadline, pending) = next(iter(self._deadlines.items()))
            if deadline - now > EXPIRY_SLACK_S:
                self._expiry = loop.call_at(deadline, self._expire_due)
                return
            del self._deadlines[key]
            self._expire(pending)

    def _expire(self, pending: Sequence[_Pending[In, Out]]) -> None:
        error = RequestTimeout(
            f"no answer within {self.config.timeout_s:g} s (the server is overloaded or the model slow)"
        )
        removed = False
        for p in pending:
            if p.answered or p.future.done():
                continue
            p.future.set_exception(error)
            if p.drop_reason is None:
                p.drop_reason = "timeout"
                self._observer.dropped("timeout")
            if p.queued:
                p.queued = False
                self._queue.remove(p)
                removed = True
        if removed:
            self._observer.queue_depth(len(self._queue))
            self._progress.set()

    def expected_wait_s(self) -> float:
        """How long an item queued now would wait for its batch to start: what is left of the newest batch
        computing, then the full batches ahead of it in the queue (shared by the concurrent slots), at the
        recent batch compute time; 0 before any batch has been timed."""
        seconds = self._batch_seconds
        if not seconds:
            return 0.0
        left = 0.0
        if self._running:
            left = max(0.0, seconds - (asyncio.get_running_loop().time() - self._last_start))
        full_ahead = len(self._queue) // self.config.max_batch_size
        return left + full_ahead * seconds / self.config.max_concurrent_batches

    def retry_after_s(self) -> int:
        """Whole seconds until the queue has likely drained by one request's worth (at least 1)."""
        batches_ahead = len(self._queue) / self.config.max_batch_size + 1
        return max(1, math.ceil(batches_ahead * self._batch_seconds))

    def _drop(self, pending: Sequence[_Pending[In, Out]], reason: str) -> None:
        """Abandon unanswered items: out of the queue (never computed), futures cancelled, counted once."""
        removed = False
        for p in pending:
            if p.answered:
                continue
            p.future.cancel()
            if p.drop_reason is None:
                p.drop_reason = reason
                self._observer.dropped(reason)
            if p.queued:
                p.queued = False
                self._queue.remove(p)
                removed = True
        if removed:
            self._observer.queue_depth(len(self._queue))
            self._progress.set()

    def _fail_everything(self, error: ServeError) -> None:
        while self._queue:
            p = self._queue.popleft()
            p.queued = False
            if not p.future.done():
                p.answered = True
                p.future.set_exception(error)
        self._observer.queue_depth(0)
        self._progress.set()

    # -- the batching loop --------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.get_running_loop().create_task(self._process(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _next_batch(self) -> list[_Pending[In, Out]]:
        while True:
            await self._wait_for_work()
            await self._wait_for_company(self.config.dispatch_size)
            if not self._queue:
                continue  # everything queued was cancelled while we waited
            size = self._choose_size(len(self._queue))
            batch = [self._queue.popleft() for _ in range(size)]
            for p in batch:
                p.queued = False
            self._observer.queue_depth(len(self._queue))
            return batch

    def _choose_size(self, available: int) -> int:
        cfg = self.config
        if available >= cfg.dispatch_size:
            return min(available, cfg.dispatch_size)
        fitting = [s for s in cfg.preferred_batch_sizes if s <= available]
        return max(fitting) if fitting else available

    async def _outcomes(self, items: list[In]) -> list[_Outcome[Out]]:
        """Each item's result or the error it alone fails with: a failed batch runs again in halves (a
        model computes rows independently, so the others' results do not change), paid only on failure."""
        loop = asyncio.get_running_loop()
        error: ServeError
        try:
            results = await loop.run_in_executor(self._executor, self._predict, items)
            if len(results) != len(items):
                raise ModelError(f"the model returned {len(results)} results for a batch of {len(items)}")
            return [_Outcome(result) for result in results]
        except ServeError as exc:
            error = exc
        except Exception as exc:
            error = ModelError(f"the model failed: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
        if len(items) == 1:
            return [_Outcome(None, error)]
        half = len(items) // 2
        return [*await self._outcomes(items[:half]), *await self._outcomes(items[half:])]

    async def _process(self, batch: list[_Pending[In, Out]]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        live = [p for p in batch if not p.future.done()]
        for p in batch:
            if p.future.done() and p.drop_reason is None:
                p.drop_reason = "cancelled"
                self._observer.dropped("cancelled")
        error: BaseException | None = None
        try:
            if not live:
                return
            self._last_start = started
            self._observer.batch_started(len(live), [started - p.enqueued for p in live])
            outcomes = await self._outcomes([p.item for p in live])
            error = next((o.error for o in outcomes if o.error is not None), None)
            for p, outcome in zip(live, outcomes, strict=True):
                if not p.future.done():
                    p.answered = True
                    if outcome.error is None:
                        p.future.set_result(outcome.result)  # type: ignore[arg-type]
                    else:
                        p.future.set_exception(outcome.error)
        except asyncio.CancelledError:
            error = Draining("the server stopped before the batch finished")
            for p in live:
                if not p.future.done():
                    p.answered = True
                    p.future.set_exception(error)
            raise
        finally:
            seconds = loop.time() - started
            if live:
                average = self._batch_seconds
                self._batch_seconds = seconds if not average else 0.8 * average + 0.2 * seconds
                self._observer.batch_finished(len(live), seconds, error)
            self._slots.release()
            task = asyncio.current_task()
            if task is not None:
                self._running.discard(task)
            self._progress.set()
