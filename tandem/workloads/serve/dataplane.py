"""The data plane: one model, its batcher and metrics, and the server's life (loading -> ready -> draining).

Protocol handlers call `infer`; the transport wraps each inference request in `admit` (503 unless ready,
counts in-flight requests so a drain knows when they have all finished).

In a worker of a multi-process server (`--workers N`) the plane also publishes its state to `peers` (the
supervisor's worker board), and the server counts as ready (`server_ready`, the readiness probe) only while
every worker is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import StrEnum
from typing import Any, Protocol

from tandem.api.serving import Runtime
from tandem.workloads.serve.batcher import Batcher, BatchingConfig
from tandem.workloads.serve.errors import Draining, NotReady, QueueFull
from tandem.workloads.serve.generation import GenerationScheduler
from tandem.workloads.serve.metrics import ServeMetrics
from tandem.workloads.serve.model import Model

log = logging.getLogger("tandem.serve")

#: Back-off of a large request's later chunk while the queue is full (`DataPlane.infer_many`).
CHUNK_RETRY_MIN_S = 0.005
CHUNK_RETRY_MAX_S = 0.2


class State(StrEnum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"
    STOPPED = "stopped"


class Peers(Protocol):
    """The other workers of a multi-process server, as far as readiness goes."""

    workers: int

    def publish(self, state: State) -> None:
        """Tell the others this worker's state."""

    def ready_count(self) -> int:
        """How many workers (this one included) are ready."""


class DataPlane:
    def __init__(
        self,
        model: Model[Any, Any],
        batching: BatchingConfig,
        metrics: ServeMetrics,
        *,
        peers: Peers | None = None,
    ) -> None:
        self.model = model
        self.batching = batching
        self.metrics = metrics
        self.peers = peers
        self.state = State.LOADING
        self.load_error: str | None = None
        self.batcher: Batcher[Any, Any] | None = None
        self.generation: GenerationScheduler | None = None
        """causal-lm only: the continuous-batching scheduler (instead of `batcher`)."""
        self._inflight = 0
        self._inflight_gauge = metrics.inflight.labels(metrics.model)
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def ready(self) -> bool:
        """This process serves inference requests."""
        return self.state is State.READY

    @property
    def server_ready(self) -> bool:
        """The whole server is ready: this process and, with several workers, every other one."""
        if self.state is not State.READY:
            return False
        return self.peers is None or self.peers.ready_count() == self.peers.workers

    def _set_state(self, state: State) -> None:
        self.state = state
        self.metrics.set_ready(state is State.READY)
        if self.peers is not None:
            self.peers.publish(state)

    @property
    def inflight(self) -> int:
        return self._inflight

    async def load(self) -> None:
        """Load and warm up the model off the event loop, then start batching. Raises on failure."""
        started = time.perf_counter()
        try:
            await asyncio.to_thread(self.model.load)
            warming = time.perf_counter()
            await asyncio.to_thread(self.model.warm_up, self.batching.max_batch_size)
            warm_up_s = time.perf_counter() - warming
        except BaseException as exc:
            self._set_state(State.FAILED)
            self.load_error = str(exc) or type(exc).__name__
            raise
        seconds = time.perf_counter() - started
        self.metrics.set_model_load(seconds)
        if self.state is not State.LOADING:  # a drain began while loading: stay out of rotation
            return
        if self.model.runtime is Runtime.CAUSAL_LM:
            self.generation = GenerationScheduler(self.model, self.batching, self.metrics)  # type: ignore[arg-type]
            self.generation.start()
        else:
            # The warm-up (a batch of 1, then a full one) is the first estimate of a batch's time, so that
            # admission by expected wait holds from the first burst, before any batch has been timed.
            self.batcher = Batcher(
                self.model.predict, self.batching, observer=self.metrics, batch_seconds=warm_up_s
            )
            self.batcher.start()
        self._set_state(State.READY)
        log.info("model %s ready (loaded and warmed up in %.1f s)", self.model.name, seconds)

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Count one inference request in flight while the block runs (`enter` and `leave`)."""
        self.enter()
        try:
            yield
        finally:
            self.leave()

    def enter(self) -> None:
        """Count one inference request in flight; refuse it unless the model is ready, and with 429 at once
        (before its body is parsed or tokenized) when not even one more item would be admitted now. Every
        `enter` that returns is paired with one `leave` (the HTTP hot path calls them directly: a
        generator-based context manager per request cost ~3% of the event loop)."""
        if self.state is State.DRAINING or self.state is State.STOPPED:
            raise Draining("the server is shutting down; retry on another replica")
        if self.state is not State.READY:
            raise NotReady(
                f"model {self.model.name} is {self.state.value}; retry when /v2/health/ready is 200"
            )
        scheduler = self.batcher or self.generation
        if scheduler is not None:
            scheduler.check_room()
        self._inflight += 1
        self._idle.clear()
        self._inflight_gauge.inc()

    def leave(self) -> None:
        """The request `enter` counted has finished."""
        self._inflight -= 1
        self._inflight_gauge.dec()
        if self._inflight == 0:
            self._idle.set()

    async def infer(self, items: Sequence[Any]) -> list[Any]:
        """Results for `items`, computed in batches with other requests' items."""
        if self.batcher is None:
            raise NotReady(f"model {self.model.name} is {self.state.value}")
        return await self.batcher.submit_many(items)

    async def infer_many(self, items: Sequence[Any]) -> list[Any]:
        """Like `infer`, for requests of any size (OpenAI allows 2,048 embedding inputs): more items than a
        quarter of the queue bound go in chunks, one after another, so a large request never needs a larger
        queue and never fills it for everyone else. A chunk after the first that finds the queue full waits
        for room (backing off up to `CHUNK_RETRY_MAX_S`) within the request timeout; only the first chunk's
        `QueueFull` reaches the client (429 before any work)."""
        chunk = max(self.batching.max_batch_size, self.batching.max_queue_size // 4)
        if len(items) <= chunk:
            return await self.infer(items)
        loop = asyncio.get_running_loop()
        timeout_s = self.batching.timeout_s
        deadline = None if timeout_s is None else loop.time() + timeout_s
        results: list[Any] = []
        for start in range(0, len(items), chunk):
            part = items[start : start + chunk]
            pause = CHUNK_RETRY_MIN_S
            while True:
                try:
                    results.extend(await self.infer(part))
                    break
                except QueueFull:
                    if start == 0 or (deadline is not None and loop.time() + pause > deadline):
                        raise
                    await asyncio.sleep(pause)  # backing off for room in a full queue (no event for it)
                    pause = min(2 * pause, CHUNK_RETRY_MAX_S)
        return results

    async def drain(self, timeout_s: float) -> bool:
        """Stop taking requests, let those in flight finish (up to `timeout_s`), stop the batcher.

        Returns True if every in-flight request finished in time.
        """
        self._set_state(State.DRAINING)
        log.info("draining: %d request(s) in flight", self._inflight)
        for scheduler in (self.batcher, self.generation):
            if scheduler is not None:
                scheduler.hurry()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            finished = True
        except TimeoutError:
            log.warning("drain timeout (%g s): %d request(s) still in flight", timeout_s, self._inflight)
            finished = False
        for scheduler in (self.batcher, self.generation):
            if scheduler is not None:
                await scheduler.close(drain=finished)
        self._set_state(State.STOPPED)
        return finished

    async def close(self) -> None:
        """Stop at once (server shutdown after the drain, or without one): unanswered requests get 503."""
        for scheduler in (self.batcher, self.generation):
            if scheduler is not None:
                await scheduler.close(drain=False)

    def generator(self) -> GenerationScheduler:
        if self.generation is None:
            raise NotReady(f"model {self.model.name} is {self.state.value}")
        return self.generation
