"""One worker thread for a list -> list function, called from one event loop, with calls joined into batches.

The data plane tokenizes each request's texts off the event loop (`model.prepare`). Handing every request
over on its own cost the event loop a `ThreadPoolExecutor.submit` (a `Future`, a `Condition`, a wake-up) and
the tokenizer its per-call overhead: on one H200 at saturation that hand-off was 12.5% of the event loop's
time. Here the calls made in the same turn of the loop (a busy server reads many requests per turn) go over
as one call, so the server pays one hand-off and one tokenizer call per turn's arrivals.

The calls are joined per turn, not while the thread is busy: joined calls queue in the executor and the
thread runs them back to back, so results keep coming back in small groups as before. (Holding arrivals
until the thread was free made bursts that the batcher's admission by expected wait then judged worse:
tests/serve's overload test saw queue waits of 3 batches instead of 1-2.)

Why not the executor alone: `run_in_executor` is one hand-off per call, which is the cost being removed; the
executor is still what runs each joined call (its thread, shutdown and cancellation are the stdlib's).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")

_Call = tuple[list[In], "asyncio.Future[list[Out]]"]


class Coalescer(Generic[In, Out]):
    """`await coalescer(items)` is `fn(items)` run in the coalescer's thread; calls made in the same turn of
    the event loop share one `fn` call over their items put together (at most `max_items`, a caller never
    split); one result per item, in order, is `fn`'s contract.

    A joined call that raises is run again call by call, so one request's bad input fails that request only,
    with the error it would have had alone. A caller that is cancelled (its client left) before its turn
    ends is left out. Not thread-safe: call it from one event loop."""

    def __init__(
        self, fn: Callable[[list[In]], Sequence[Out]], thread_name: str, *, max_items: int = 32
    ) -> None:
        self._fn = fn
        self._max_items = max_items
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._pending: list[_Call[In, Out]] = []

    async def __call__(self, items: list[In]) -> list[Out]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Out]] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush, loop)  # after this turn's other arrivals, so that they join
        self._pending.append((items, future))
        return await future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        waiting = [call for call in self._pending if not call[1].done()]
        self._pending = []
        group: list[_Call[In, Out]] = []
        items = 0
        for call in waiting:
            group.append(call)
            items += len(call[0])
            if items >= self._max_items:
                self._submit(loop, group)
                group, items = [], 0
        if group:
            self._submit(loop, group)

    def _submit(self, loop: asyncio.AbstractEventLoop, calls: list[_Call[In, Out]]) -> None:
        try:
            running = loop.run_in_executor(self._executor, self._run, calls)
        except RuntimeError as exc:  # shut down: every caller gets what a submit would have raised
            for _, future in calls:
                future.set_exception(exc)
            return
        running.add_done_callback(lambda done: self._finish(calls, done))

    def _run(self, calls: list[_Call[In, Out]]) -> list[list[Out] | Exception]:
        """In the thread: one `fn` call over every caller's items, split back per caller."""
        if len(calls) > 1:
            try:
                results = list(self._fn([item for items, _ in calls for item in items]))
            except Exception:
                pass  # one caller's items failed everyone's call: each alone below
            else:
                split: list[list[Out] | Exception] = []
                start = 0
                for items, _ in calls:
                    split.append(results[start : start + len(items)])
                    start += len(items)
                return split
        answers: list[list[Out] | Exception] = []
        for items, _ in calls:
            try:
                answers.append(list(self._fn(items)))
            except Exception as exc:
                answers.append(exc)
        return answers

    def _finish(self, calls: list[_Call[In, Out]], done: asyncio.Future[list[list[Out] | Exception]]) -> None:
        answers: list[list[Out] | Exception] | None = None
        if not done.cancelled() and done.exception() is None:
            answers = done.result()
        for index, (_, future) in enumerate(calls):
            if future.done():
                continue
            if answers is not None:
                answer = answers[index]
                if isinstance(answer, Exception):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)
            elif done.cancelled():
                future.cancel()
            else:
                error = done.exception()
                assert error is not None
                future.set_exception(error)

    def shutdown(self) -> None:
        """Stop the thread; callers still waiting are cancelled."""
        self._executor.shutdown(wait=False, cancel_futures=True)
