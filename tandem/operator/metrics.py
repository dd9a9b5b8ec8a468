"""The operator's own Prometheus metrics (the workloads export theirs separately)."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

RECONCILE_TOTAL = Counter(
    "tandem_operator_reconcile_total",
    "Reconciliations run, by resource kind and result.",
    ["kind", "result"],
)
RECONCILE_SECONDS = Histogram(
    "tandem_operator_reconcile_duration_seconds",
    "Wall time of one reconciliation, by resource kind.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
API_SECONDS = Histogram(
    "tandem_operator_api_request_duration_seconds",
    "Wall time of one Kubernetes API call of the operator (watches excluded), by verb.",
    ["verb"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
LEADER = Gauge(
    "tandem_operator_leader",
    "1 while this replica holds the leader Lease and reconciles (or runs without leader election), else 0.",
)

# Every kind and result exists from the start, so the Operator dashboard's error rate reads 0, not no data.
for _kind in ("TrainingJob", "InferenceService"):
    RECONCILE_SECONDS.labels(kind=_kind)
    for _result in ("ok", "error"):
        RECONCILE_TOTAL.labels(kind=_kind, result=_result)


class _QueueDepth:
    """`tandem_operator_workqueue_depth`: keys waiting in each controller's work queue, read when scraped."""

    def __init__(self) -> None:
        self.queues: dict[str, Callable[[], int]] = {}

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "tandem_operator_workqueue_depth",
            "Keys queued for a reconcile, by resource kind.",
            labels=["kind"],
        )
        for kind, depth in sorted(self.queues.items()):
            family.add_metric([kind], depth())
        yield family


QUEUE_DEPTH = _QueueDepth()
REGISTRY.register(QUEUE_DEPTH)


def watch_queue(kind: str, depth: Callable[[], int] | None) -> None:
    """Export the depth of `kind`'s work queue (None: stop, the controller is gone)."""
    if depth is None:
        QUEUE_DEPTH.queues.pop(kind, None)
    else:
        QUEUE_DEPTH.queues[kind] = depth


class Watched(Protocol):
    """A watch cache, as the freshness gauge sees it."""

    name: str
    #: Unix time of the last list, event or bookmark it received (None: none yet).
    last_event: float | None


class _WatchFreshness:
    """`tandem_operator_watch_last_event_timestamp_seconds`: when each watch last heard from the API
    server (the stalest cache of a resource); bookmarks come every minute or so, so `time() -` this
    growing past a few minutes means a watch that is stuck."""

    def __init__(self) -> None:
        self.caches: weakref.WeakSet[Watched] = weakref.WeakSet()

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "tandem_operator_watch_last_event_timestamp_seconds",
            "When a watch cache last received a list, event or bookmark (Unix time), by resource.",
            labels=["resource"],
        )
        stalest: dict[str, float] = {}
        for cache in list(self.caches):
            if cache.last_event is not None:
                stalest[cache.name] = min(stalest.get(cache.name, cache.last_event), cache.last_event)
        for name, when in sorted(stalest.items()):
            family.add_metric([name], when)
        yield family


WATCH_FRESHNESS = _WatchFreshness()
REGISTRY.register(WATCH_FRESHNESS)


@contextmanager
def timed_reconcile(kind: str) -> Iterator[None]:
    """Count and time one reconciliation; an exception counts as result="error"."""
    started = time.perf_counter()
    try:
        yield
    except Exception:
        RECONCILE_TOTAL.labels(kind=kind, result="error").inc()
        raise
    else:
        RECONCILE_TOTAL.labels(kind=kind, result="ok").inc()
    finally:
        RECONCILE_SECONDS.labels(kind=kind).observe(time.perf_counter() - started)
