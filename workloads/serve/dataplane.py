"""The data plane: one model, its batcher and metrics, and the server's life (loading -> ready -> draining).

Protocol handlers call `infer`; the transport wraps each inference request in `admit` (503 unless ready,
counts in-flight requests so a drain knows when they have all finished).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import StrEnum
from typing import Any

from tandem.workloads.serve.batcher import Batcher, BatchingConfig
from tandem.workloads.serve.errors import Draining, NotReady
from tandem.workloads.serve.metrics import ServeMetrics
from tandem.workloads.serve.model import Model

log = logging.getLogger("tandem.serve")


class State(StrEnum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"
    STOPPED = "stopped"


class DataPlane:
    def __init__(self, model: Model[Any, Any], batching: BatchingConfig, metrics: ServeMetrics) -> None:
        self.model = model
        self.batching = batching
        self.metrics = metrics
        self.state = State.LOADING
        self.load_error: str | None = None
        self.batcher: Batcher[Any, Any] | None = None
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def ready(self) -> bool:
        return self.state is State.READY

    @property
    def inflight(self) -> int:
        return self._inflight

    async def load(self) -> None:
        """Load and warm up the model off the event loop, then start batching. Raises on failure."""
        started = time.perf_counter()
        try:
            await asyncio.to_thread(self.model.load)
            await asyncio.to_thread(self.model.warm_up, self.batching.max_batch_size)
        except BaseException as exc:
            self.state = State.FAILED
            self.load_error = str(exc) or type(exc).__name__
            raise
        seconds = time.perf_counter() - started
        self.metrics.model_load.labels(self.metrics.model).set(seconds)
        if self.state is not State.LOADING:  # a drain began while loading: stay out of rotation
            return
        self.batcher = Batcher(self.model.predict, self.batching, observer=self.metrics)
        self.batcher.start()
        self.state = State.READY
        self.metrics.ready.labels(self.metrics.model).set(1)
        log.info("model %s ready (loaded and warmed up in %.1f s)", self.model.name, seconds)

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Count one inference request in flight; refuse it unless the model is ready."""
        if self.state is State.DRAINING or self.state is State.STOPPED:
            raise Draining("the server is shutting down; retry on another replica")
        if self.state is not State.READY:
            raise NotReady(
                f"model {self.model.name} is {self.state.value}; retry when /v2/health/ready is 200"
            )
        self._inflight += 1
        self._idle.clear()
        gauge = self.metrics.inflight.labels(self.metrics.model)
        gauge.inc()
        try:
            yield
        finally:
            self._inflight -= 1
            gauge.dec()
            if self._inflight == 0:
                self._idle.set()

    async def infer(self, items: Sequence[Any]) -> list[Any]:
        """Results for `items`, computed in batches with other requests' items."""
        if self.batcher is None:
            raise NotReady(f"model {self.model.name} is {self.state.value}")
        return await self.batcher.submit_many(items)

    async def drain(self, timeout_s: float) -> bool:
        """Stop taking requests, let those in flight finish (up to `timeout_s`), stop the batcher.

        Returns True if every in-flight request finished in time.
        """
        self.state = State.DRAINING
        self.metrics.ready.labels(self.metrics.model).set(0)
        log.info("draining: %d request(s) in flight", self._inflight)
        if self.batcher is not None:
            self.batcher.hurry()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            finished = True
        except TimeoutError:
            log.warning("drain timeout (%g s): %d request(s) still in flight", timeout_s, self._inflight)
            finished = False
        if self.batcher is not None:
            await self.batcher.close(drain=finished)
        self.state = State.STOPPED
        return finished
