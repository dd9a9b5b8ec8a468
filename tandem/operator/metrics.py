"""The operator's own Prometheus metrics (the workloads export theirs separately)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prometheus_client import REGISTRY, Counter, Histogram
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
