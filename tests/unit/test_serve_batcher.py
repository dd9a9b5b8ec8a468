"""The dynamic batcher in pure asyncio: no HTTP, no model, no sleeps standing in for conditions.

A `GatedModel` blocks each batch in its worker thread until the test opens the gate, and tells the event loop
when a batch has started, so the tests can arrange exactly what is queued while the model computes.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import pytest

from tandem.workloads.serve.batcher import Batcher, BatchingConfig
from tandem.workloads.serve.errors import (
    Draining,
    InvalidInput,
    ModelError,
    QueueFull,
    RequestTimeout,
)

T = TypeVar("T")
LONG_DELAY_MS = 60_000.0  # a batch that waited for this delay would time the test out


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


class GatedModel:
    """Doubles its inputs. Each batch waits for `release()` unless the gate is open."""

    def __init__(self, *, gated: bool = True) -> None:
        self.batches: list[list[int]] = []
        self._gate = threading.Semaphore(0)
        self._gated = gated
        self._loop = asyncio.get_running_loop()
        self._started = asyncio.Queue[list[int]]()

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self._loop.call_soon_threadsafe(self._started.put_nowait, list(items))
        if self._gated:
            self._gate.acquire()
        return [2 * x for x in items]

    async def started(self) -> list[int]:
        """The items of the next batch that reached the model."""
        return await self._started.get()

    def release(self, batches: int = 1) -> None:
        for _ in range(batches):
            self._gate.release()


class RecordingObserver:
    def __init__(self) -> None:
        self.depths: list[int] = []
        self.sizes: list[int] = []
        self.waits: list[float] = []
        self.finished: list[tuple[int, BaseException | None]] = []
        self.drops: list[str] = []

    def queue_depth(self, depth: int) -> None:
        self.depths.append(depth)

    def batch_started(self, size: int, queue_waits_s: Sequence[float]) -> None:
        self.sizes.append(size)
        self.waits.extend(queue_waits_s)

    def batch_finished(self, size: int, seconds: float, error: BaseException | None) -> None:
        self.finished.append((size, error))

    def dropped(self, reason: str) -> None:
        self.drops.append(reason)


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the event loop until `condition` holds (pure scheduling, no wall-clock waits)."""
    while not condition():
        await asyncio.sleep(0)


def batcher(
    predict: Callable[[list[int]], Sequence[int]], observer: RecordingObserver | None = None, **knobs: Any
) -> Batcher[int, int]:
    # A gated batch lasts as long as its test holds it: no admission by expected wait unless asked for.
    b = Batcher[int, int](predict, BatchingConfig(**{"max_queue_wait_s": None, **knobs}), observer=observer)
    b.start()
    return b


async def closing(b: Batcher[int, int], body: Callable[[], Awaitable[None]]) -> None:
    try:
        await body()
    finally:
        await b.close(drain=False)


def test_a_full_batch_leaves_without_waiting_for_the_delay() -> None:
    async def main() -> None:
        model = GatedModel(gated=False)
        obs = RecordingObserver()
        b = batcher(model, obs, max_batch_size=4, max_queue_delay_ms=LONG_DELAY_MS)
        results = await asyncio.gather(*(b.submit(i) for i in range(4)))
        assert results == [0, 2, 4, 6]
        assert model.batches == [[0, 1, 2, 3]]
        assert obs.sizes == [4]
        await b.close()

    run(main())


def test_a_lone_request_leaves_when_the_delay_expires() -> None:
    async def main() -> None:
        model = GatedModel(gated=False)
        b = batcher(model, max_batch_size=8, max_queue_delay_ms=5)
        assert await b.submit(21) == 42
        assert model.batches == [[21]]
        await b.close()

    run(main())


def test_zero_delay_runs_whatever_is_queued() -> None:
    async def main() -> None:
        model = GatedModel(gated=False)
        b = batcher(model, max_batch_size=8, max_queue_delay_ms=0)
        assert await b.submit(1) == 2
        await b.close()

    run(main())


def test_the_next_batch_forms_while_the_model_runs() -> None:
    async def main() -> None:
        model = GatedModel()
        obs = RecordingObserver()
        b = batcher(model, obs, max_batch_size=8, max_queue_delay_ms=0)
        first = asyncio.ensure_future(b.submit(0))
        assert await model.started() == [0]
        # While batch [0] computes, five more arrive; with one concurrent batch they queue and go together.
        rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 6)]
        await until(lambda: b.queue_depth == 5)
        model.release()
        assert await first == 0
        assert await model.started() == [1, 2, 3, 4, 5]
        model.release()
        assert await asyncio.gather(*rest) == [2, 4, 6, 8, 10]
        assert obs.sizes == [1, 5]
        assert obs.depths[-1] == 0
        await b.close()

    run(main())


def test_concurrent_batches_are_bounded() -> None:
    async def main() -> None:
        model = GatedModel()
        b = batcher(model, max_batch_size=1, max_queue_delay_ms=0, max_concurrent_batches=2)
        futs = [asyncio.ensure_future(b.submit(i)) for i in range(3)]
        assert {tuple(await model.started()), tuple(await model.started())} == {(0,), (1,)}
        await until(lambda: b.queue_depth == 1)
        assert b.running_batches == 2  # the third waits for a slot
        model.release(3)
        assert await asyncio.gather(*futs) == [0, 2, 4]
        await b.close()

    run(main())


def test_preferred_sizes_dispatch_early_and_split_the_rest() -> None:
    async def main() -> None:
        model = GatedModel()
        b = batcher(model, max_batch_size=16, max_queue_delay_ms=0, preferred_batch_sizes=(2, 4))
        blocker = asyncio.ensure_future(b.submit(100))
        await model.started()
        futs = [asyncio.ensure_future(b.submit(i)) for i in range(7)]
        await until(lambda: b.queue_depth == 7)
        model.release()
        # 7 queued, delay expired: the largest preferred size (4) goes, then 2, then the last 1.
        assert await model.started() == [0, 1, 2, 3]
        model.release()
        assert await model.started() == [4, 5]
        model.release()
        assert await model.started() == [6]
        model.release()
        assert await asyncio.gather(blocker, *futs) == [200, *(2 * i for i in range(7))]
        await b.close()

    run(main())


def test_an_exception_reaches_every_request_of_the_batch() -> None:
    async def main() -> None:
        def broken(items: list[int]) -> list[int]:
            raise RuntimeError("CUDA out of memory")

        obs = RecordingObserver()
        b = batcher(broken, obs, max_batch_size=3, max_queue_delay_ms=LONG_DELAY_MS)
        results = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
        assert all(isinstance(r, ModelError) for r in results)
        assert "CUDA out of memory" in str(results[0])
        assert isinstance(results[0], ModelError)
        assert isinstance(results[0].__cause__, RuntimeError)
        assert obs.finished[0][0] == 3
        assert isinstance(obs.finished[0][1], ModelError)
        # the batcher keeps serving after a failed batch
        b._predict = GatedModel(gated=False)
        assert await asyncio.gather(*(b.submit(i) for i in range(3))) == [0, 2, 4]
        await b.close()

    run(main())


def test_a_wrong_number_of_results_fails_the_batch() -> None:
    async def main() -> None:
        b = batcher(lambda items: items[:-1], max_batch_size=2, max_queue_delay_ms=LONG_DELAY_MS)
        results = await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)
        # each item, run again alone, still gets no result: each fails with the count it got
        assert all(isinstance(r, ModelError) and "0 results for a batch of 1" in str(r) for r in results)
        await b.close()

    run(main())


def test_a_failing_item_fails_alone_and_its_batch_carries_on() -> None:
    calls: list[list[int]] = []

    def predict(items: list[int]) -> list[int]:
        calls.append(list(items))
        if 13 in items:
            raise ValueError("unlucky row")
        return [2 * i for i in items]

    async def main() -> None:
        b = batcher(predict, max_batch_size=4, max_queue_delay_ms=LONG_DELAY_MS)
        results = await asyncio.gather(*(b.submit(i) for i in (1, 13, 3, 4)), return_exceptions=True)
        assert results[0] == 2
        assert results[2:] == [6, 8]
        assert isinstance(results[1], ModelError)
        assert "unlucky row" in str(results[1])
        assert calls[0] == [1, 13, 3, 4], "the four did not share one batch to begin with"
        await b.close()

    run(main())


def test_cancelled_requests_are_dropped_before_compute() -> None:
    async def main() -> None:
        model = GatedModel()
        obs = RecordingObserver()
        b = batcher(model, obs, max_batch_size=8, max_queue_delay_ms=0)
        blocker = asyncio.ensure_future(b.submit(100))
        await model.started()
        gone = asyncio.ensure_future(b.submit(1))
        kept = asyncio.ensure_future(b.submit(2))
        await until(lambda: b.queue_depth == 2)
        gone.cancel()  # the client disconnected
        await until(lambda: b.queue_depth == 1)
        model.release(2)
        assert await blocker == 200
        assert await kept == 4
        assert model.batches == [[100], [2]]
        assert obs.drops == ["cancelled"]
        await b.close()

    run(main())


def test_a_request_cancelled_after_its_batch_formed_is_not_computed() -> None:
    async def main() -> None:
        observed: list[list[int]] = []
        release = asyncio.Event()

        def identity(items: list[int]) -> list[int]:
            observed.append(items)
            return items

        b = batcher(identity, max_batch_size=2, max_queue_delay_ms=0)
        # Form a batch and cancel one member before the batch task runs: `_process` must skip it.
        original = b._process

        async def slow_process(batch: Any) -> None:
            await release.wait()
            await original(batch)

        b._process = slow_process  # type: ignore[method-assign]
        a = asyncio.ensure_future(b.submit(1))
        c = asyncio.ensure_future(b.submit(2))
        await until(lambda: b.queue_depth == 0)
        a.cancel()
        await asyncio.sleep(0)
        release.set()
        assert await c == 2
        assert observed == [[2]]
        await b.close()

    run(main())


def test_a_request_times_out_and_leaves_the_queue() -> None:
    async def main() -> None:
        model = GatedModel()
        obs = RecordingObserver()
        b = batcher(model, obs, max_batch_size=4, max_queue_delay_ms=0, timeout_s=0.05)
        blocker = asyncio.ensure_future(b.submit(100))
        await model.started()
        with pytest.raises(RequestTimeout):
            await b.submit(1)  # stuck behind the blocked batch
        assert b.queue_depth == 0
        assert "timeout" in obs.drops
        model.release()
        with pytest.raises(RequestTimeout):
            await blocker  # its batch outlived the timeout too
        await b.close()

    run(main())


def test_each_request_times_out_at_its_own_deadline() -> None:
    """One timer serves every request's timeout: a later request is not failed at an earlier one's
    deadline, and every stuck request does fail."""

    async def main() -> None:
        model = GatedModel()
        obs = RecordingObserver()
        timeout_s = 0.3
        b = batcher(model, obs, max_batch_size=1, max_queue_delay_ms=0, timeout_s=timeout_s)
        blocker = asyncio.ensure_future(b.submit(100))
        await model.started()
        loop = asyncio.get_running_loop()

        async def timed(item: int) -> float:
            submitted = loop.time()
            with pytest.raises(RequestTimeout):
                await b.submit(item)
            return loop.time() - submitted

        first = asyncio.ensure_future(timed(1))
        await asyncio.sleep(timeout_s / 2)  # the scenario: the second arrives half a timeout later
        second = asyncio.ensure_future(timed(2))
        waited = await asyncio.gather(first, second)
        assert min(waited) >= timeout_s * 0.95
        assert b.queue_depth == 0
        assert obs.drops.count("timeout") >= 2
        model.release()
        with pytest.raises(RequestTimeout):
            await blocker
        await b.close()

    run(main())


def test_a_full_queue_raises_queue_full_with_retry_after() -> None:
    async def main() -> None:
        model = GatedModel()
        b = batcher(model, max_batch_size=2, max_queue_delay_ms=0, max_queue_size=3)
        blocker = asyncio.ensure_future(b.submit(100))
        await model.started()
        queued = asyncio.ensure_future(b.submit_many([1, 2]))
        await until(lambda: b.queue_depth == 2)
        with pytest.raises(QueueFull) as info:
            await b.submit_many([3, 4])  # all or none: 2 + 2 > 3
        assert info.value.retry_after_s >= 1
        assert b.queue_depth == 2
        with pytest.raises(InvalidInput):
            await b.submit_many(list(range(4)))  # could never fit
        model.release(2)
        assert await blocker == 200
        assert await queued == [2, 4]
        await b.close()

    run(main())


def test_close_drains_queued_requests_without_waiting_for_the_delay() -> None:
    async def main() -> None:
        model = GatedModel(gated=False)
        b = batcher(model, max_batch_size=8, max_queue_delay_ms=LONG_DELAY_MS)
        futs = [asyncio.ensure_future(b.submit(i)) for i in range(3)]
        await until(lambda: b.queue_depth == 3)
        await b.close(drain=True)
        assert [f.result() for f in futs] == [0, 2, 4]
        with pytest.raises(Draining):
            await b.submit(1)

    run(main())


def test_hurry_dispatches_without_the_delay_and_still_accepts() -> None:
    async def main() -> None:
        model = GatedModel(gated=False)
        b = batcher(model, max_batch_size=8, max_queue_delay_ms=LONG_DELAY_MS)
        first = asyncio.ensure_future(b.submit(1))
        await until(lambda: b.queue_depth == 1)
        b.hurry()
        assert await first == 2
        assert await b.submit(2) == 4  # still accepted, and not held for the delay
        await b.close()

    run(main())


def test_close_without_drain_fails_what_is_left() -> None:
    async def main() -> None:
        model = GatedModel()
        b = batcher(model, max_batch_size=1, max_queue_delay_ms=0)
        running = asyncio.ensure_future(b.submit(1))
        await model.started()
        queued = asyncio.ensure_future(b.submit(2))
        await until(lambda: b.queue_depth == 1)
        await b.close(drain=False)
        model.release()
        for fut in (running, queued):
            with pytest.raises(Draining):
                await fut

    run(main())


def test_a_dead_loop_fails_waiters_instead_of_hanging() -> None:
    async def main() -> None:
        b = batcher(lambda items: items, max_batch_size=4, max_queue_delay_ms=LONG_DELAY_MS)
        fut = asyncio.ensure_future(b.submit(1))
        await until(lambda: b.queue_depth == 1)

        def boom(available: int) -> int:
            raise AssertionError("bug")

        b._choose_size = boom  # type: ignore[method-assign]
        await b.close(drain=True)  # the loop dies forming the batch; the waiter must still get an answer
        with pytest.raises((ModelError, Draining)):
            await fut

    run(main())


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_queue_delay_ms": -1}, "max_queue_delay_ms"),
        ({"max_batch_size": 8, "max_queue_size": 4}, "max_queue_size"),
        ({"preferred_batch_sizes": (64,)}, "preferred batch size"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"max_concurrent_batches": 0}, "max_concurrent_batches"),
    ],
)
def test_config_rejects_nonsense(knobs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchingConfig(**knobs)


def test_a_submission_expected_to_wait_too_long_is_refused_at_once() -> None:
    async def main() -> None:
        model = GatedModel()
        b = batcher(model, max_batch_size=2, max_queue_delay_ms=0, max_queue_wait_s=5.0)
        assert b.expected_wait_s() == 0.0  # nothing timed yet: no estimate, nothing refused
        first = asyncio.ensure_future(b.submit(1))
        await model.started()  # one batch computing
        b._batch_seconds = 10.0  # as if measured: each batch takes 10 s
        assert 9.0 < b.expected_wait_s() <= 10.0  # what is left of the batch computing
        # the next batch takes whoever comes, even past the limit: refusing there would only shrink it
        queued = [asyncio.ensure_future(b.submit(i)) for i in (2, 3)]
        while b.queue_depth < 2:
            await asyncio.sleep(0)
        assert 19.0 < b.expected_wait_s() <= 20.0  # and one full batch ahead
        with pytest.raises(QueueFull) as refused:
            await b.submit(4)
        assert "expected wait" in refused.value.message
        assert refused.value.retry_after_s >= 1
        model.release(2)
        assert [await first, *(await asyncio.gather(*queued))] == [2, 4, 6]
        await b.close()

    run(main())


def test_the_request_timeout_bounds_the_expected_wait_too() -> None:
    async def main() -> None:
        model = GatedModel()
        b = batcher(model, max_batch_size=1, max_queue_delay_ms=0, timeout_s=5.0)
        first = asyncio.ensure_future(b.submit(1))
        await model.started()
        b._batch_seconds = 6.0  # one batch already outlasts the request timeout
        second = asyncio.ensure_future(b.submit(2))  # the next batch: admitted
        while b.queue_depth < 1:
            await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await b.submit(3)
        model.release(2)
        assert [await first, await second] == [2, 4]
        await b.close()

    run(main())
