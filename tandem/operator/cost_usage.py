"""Measured usage per container, read from Prometheus: what the cost model charges above the requests.

The series are the ones OpenCost reads, scraped by the same Prometheus the autoscaler queries
(`prometheusUrl`; docs/dashboards.md, "Usage", shows the scrape jobs):

- the kubelet's `/metrics/cadvisor` (or `/metrics/resource`): `container_cpu_usage_seconds_total` and
  `container_memory_working_set_bytes`, labelled `namespace`, `pod`, `container`. Usage is their average
  over the window: the rate of the CPU seconds (vCPUs) and the mean working set (bytes). Both endpoints
  may be scraped at once; `max by (namespace, pod, container)` keeps one value per container.
- NVIDIA's DCGM exporter, where one runs: `DCGM_FI_DEV_GPU_UTIL` (percent) labelled with the
  `namespace`, `pod`, `container` holding the GPU. It says how busy the requested GPUs were; GPUs are
  charged by the request whatever it says (tandem.operator.cost).

A `UsageSource` refreshes in the background (one query round at most every `refresh_seconds`, an
asyncio task on the operator's loop, through its one HTTP client) and hands the reconcilers the last
snapshot without waiting: a slow or absent Prometheus never holds a reconcile up, and never fails
one. A snapshot without data carries the reason, and the cost model falls back to the requests.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tandem.operator.cost import PodUsage, Usage

CPU_SECONDS = "container_cpu_usage_seconds_total"
WORKING_SET = "container_memory_working_set_bytes"
GPU_UTIL = "DCGM_FI_DEV_GPU_UTIL"
#: The averaging window: five minutes, so that even a 1-minute scrape interval gives rate() its points.
DEFAULT_WINDOW = "5m"
DEFAULT_REFRESH_SECONDS = 30.0
#: cAdvisor also reports the pod's cgroup (container="") and its sandbox (container="POD").
_CONTAINERS = 'container!="",container!="POD",pod!=""'
NO_PROMETHEUS = "no prometheusUrl is set: requests only"
NO_SERIES = (
    f"no {CPU_SECONDS} or {WORKING_SET} series in Prometheus "
    "(kwok nodes have no kubelet, or the kubelet's /metrics/cadvisor is not scraped): requests only"
)

log = logging.getLogger("tandem.operator.cost")
Query = Callable[[str, str], Awaitable[list[dict[str, Any]]]]


def queries(window: str = DEFAULT_WINDOW, namespaces: Sequence[str] = ()) -> dict[str, str]:
    """The PromQL behind a snapshot, one per measured quantity, each by namespace, pod, container;
    only `namespaces` when given (the operator's watched namespaces: DNS labels, nothing to escape)."""
    by = "by (namespace, pod, container)"
    only = f',namespace=~"{"|".join(namespaces)}"' if namespaces else ""
    containers = _CONTAINERS + only
    return {
        "cpu": f"max {by} (rate({CPU_SECONDS}{{{containers}}}[{window}]))",
        "memory_bytes": f"max {by} (avg_over_time({WORKING_SET}{{{containers}}}[{window}]))",
        "gpu_busy": f'avg {by} (avg_over_time({GPU_UTIL}{{pod!=""{only}}}[{window}])) / 100',
    }


@dataclass(frozen=True)
class UsageSnapshot:
    """Usage of every measured container at one time, or why there is none."""

    pods: Mapping[tuple[str, str], PodUsage] = field(default_factory=dict)
    #: Why the cost model charges requests only (None: usage was read).
    problem: str | None = None
    #: Unix time of the queries (None: never queried).
    taken: float | None = None

    def for_pod(self, namespace: str, pod: str) -> PodUsage | None:
        """The pod's containers' usage, by container name; None when the pod was not measured."""
        return self.pods.get((namespace, pod))


def parse(results: Mapping[str, list[dict[str, Any]]]) -> dict[tuple[str, str], dict[str, Usage]]:
    """Instant-query vectors by quantity (`queries`' keys) -> usage by (namespace, pod), container.
    NaN and negative values (a counter reset inside the window) are left out."""
    found: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    for quantity, vector in results.items():
        for sample in vector:
            labels = sample.get("metric") or {}
            namespace, pod, container = (labels.get(k) for k in ("namespace", "pod", "container"))
            if not (namespace and pod and container):
                continue
            value = float(sample["value"][1])
            if math.isnan(value) or math.isinf(value) or value < 0:
                continue
            found.setdefault((namespace, pod), {}).setdefault(container, {})[quantity] = value
    return {
        key: {name: Usage(**values) for name, values in containers.items()}
        for key, containers in found.items()
    }


async def read(
    query: Query, window: str = DEFAULT_WINDOW, now: float | None = None, namespaces: Sequence[str] = ()
) -> UsageSnapshot:
    """One snapshot through `query(expression, what)` (an instant query returning the result vector,
    raising ConnectionError when Prometheus fails), the queries made concurrently. Never raises: a
    failure is the snapshot's problem."""
    taken = time.time() if now is None else now
    try:
        expressions = queries(window, namespaces)
        vectors = await asyncio.gather(*(query(expression, name) for name, expression in expressions.items()))
        results = dict(zip(expressions, vectors, strict=True))
    except ConnectionError as error:
        return UsageSnapshot(problem=f"{error}: requests only", taken=taken)
    pods = parse(results)
    if not any(u.measured for containers in pods.values() for u in containers.values()):
        return UsageSnapshot(pods, problem=NO_SERIES, taken=taken)
    return UsageSnapshot(pods, taken=taken)


def prometheus_query(base_url: str) -> Query:
    """Instant queries against `base_url`, through the same HTTP client as `tandem cost` (its timeout,
    10 s, holds up only the background refresh)."""
    from tandem.operator.cost_sources import instant_query

    async def query(expression: str, _what: str) -> list[dict[str, Any]]:
        return await instant_query(base_url, expression)

    return query


class UsageSource:
    """The latest snapshot, refreshed in the background when it is older than `refresh_seconds`.

    `snapshot()` never waits on Prometheus: called on the loop, the first call starts a query round
    (a task) and returns an empty snapshot (requests only) until it lands."""

    def __init__(
        self,
        prometheus_url: str,
        window: str = DEFAULT_WINDOW,
        refresh_seconds: float = DEFAULT_REFRESH_SECONDS,
        query: Query | None = None,
        clock: Callable[[], float] = time.monotonic,
        namespaces: Sequence[str] = (),
    ) -> None:
        self.window = window
        self.namespaces = tuple(namespaces)
        self.refresh_seconds = refresh_seconds
        self._query = query or (prometheus_query(prometheus_url) if prometheus_url else None)
        self._clock = clock
        self._latest = UsageSnapshot(problem=None if self._query else NO_PROMETHEUS)
        self._read_at: float | None = None
        self._pending: asyncio.Task[None] | None = None

    def snapshot(self) -> UsageSnapshot:
        """The latest snapshot; starts a refresh when it is due and none is running (on the loop)."""
        if self._query is None:
            return self._latest
        due = self._read_at is None or self._clock() - self._read_at >= self.refresh_seconds
        if due and self._pending is None:
            self._read_at = self._clock()
            self._pending = asyncio.get_running_loop().create_task(self._refresh(self._query))
        return self._latest

    async def _refresh(self, query: Query) -> None:
        """One query round; its snapshot becomes the latest (a bug in parsing: requests, logged)."""
        before = self._latest
        try:
            latest = await read(query, self.window, None, self.namespaces)
        except Exception as error:
            latest = UsageSnapshot(problem=f"reading usage failed ({error}): requests only")
            log.exception("reading container usage from Prometheus failed")
        finally:
            self._pending = None
        self._latest = latest
        if latest.problem and latest.problem != before.problem:
            log.info("cost allocation: %s", latest.problem)
        elif not latest.problem and before.problem:
            log.info("cost allocation: usage measured for %d pods", len(latest.pods))

    async def wait(self, timeout: float) -> UsageSnapshot:
        """Start a refresh if due and wait up to `timeout` seconds for it to land (for tests)."""
        self.snapshot()
        pending = self._pending
        if pending is not None:
            await asyncio.wait([pending], timeout=timeout)
        return self._latest

    async def close(self) -> None:
        """Stop a refresh in flight (the operator's cleanup)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
