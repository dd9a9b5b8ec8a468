"""Where the builtin autoscaler reads load: the Prometheus HTTP API, or the replicas' own /metrics.

Both give one `Load` snapshot per service and tick: concurrency (in-flight requests) and queue depth
summed over replicas, requests per second, and latency p50/p99 of inference requests. The metric names
are the model server's (`tandem.workloads.serve.metrics`, documented in docs/serving.md); this module
only speaks HTTP and the Prometheus text format, so the operator needs neither torch nor the server.
Both go through the operator's one HTTP client (`kubehttp`, aiohttp on its loop), concurrently.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from tandem.operator.kubehttp import get_text

INFLIGHT = "tandem_serve_inflight_requests"
QUEUE_DEPTH = "tandem_serve_queue_depth"
REQUEST_DURATION = "tandem_serve_request_duration_seconds"
TOKENS = "tandem_serve_generated_tokens_total"
#: Route templates of inference requests (health checks and /metrics are not load).
INFERENCE_ROUTES = r".*/infer|/v1/embeddings|/v1/completions|/v1/chat/completions"
_INFERENCE_RE = re.compile(INFERENCE_ROUTES)
SCRAPE_TIMEOUT_SECONDS = 1.0
QUERY_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True)
class Load:
    """Load on one service now (None: unknown)."""

    concurrency: float | None = None
    queue_depth: float | None = None
    rps: float | None = None
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    tokens_per_second: float | None = None
    #: Replicas the numbers came from.
    replicas: int = 0

    def value(self, metric: str) -> float | None:
        """The autoscaler's metric: `concurrency`, `queueDepth`, `rps` or `latencyP99`."""
        return {
            "concurrency": self.concurrency,
            "queueDepth": self.queue_depth,
            "rps": self.rps,
            "latencyP99": self.latency_p99_ms,
        }[metric]


def histogram_quantile(quantile: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative bucket counts {upper bound: count}."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = quantile * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):  # in the +Inf bucket: the highest finite bound, as Prometheus does
                return lower_bound
            width = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / width if width else 1.0)
        lower_bound, lower_count = bound, count
    return lower_bound


# ------------------------------------------------------------------------------------------------
# Scraping the replicas directly
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaMetrics:
    """What one replica's /metrics says, reduced to what the autoscaler uses."""

    inflight: float = 0.0
    queue_depth: float = 0.0
    #: Inference requests answered so far, and their latency buckets {le: cumulative count}.
    requests: float = 0.0
    buckets: Mapping[float, float] = field(default_factory=dict)
    tokens: float = 0.0


def parse_metrics(text: str) -> ReplicaMetrics:
    """Reduce a model server's Prometheus text exposition to a ReplicaMetrics."""
    from prometheus_client.parser import text_string_to_metric_families

    inflight = queue = requests = tokens = 0.0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, float(sample.value)
            if name == INFLIGHT:
                inflight += value
            elif name == QUEUE_DEPTH:
                queue += value
            elif name == TOKENS:
                tokens += value
            elif name.startswith(REQUEST_DURATION) and _INFERENCE_RE.fullmatch(labels.get("route", "")):
                if name == f"{REQUEST_DURATION}_count":
                    requests += value
                elif name == f"{REQUEST_DURATION}_bucket":
                    bound = float(labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + value
    return ReplicaMetrics(inflight, queue, requests, buckets, tokens)


class Scraper:
    """Scrapes the ready replicas of one service; rates come from the change since the last scrape."""

    def __init__(self, port: int = 8080, timeout: float = SCRAPE_TIMEOUT_SECONDS) -> None:
        self.port = port
        self.timeout = timeout
        self.previous: dict[str, tuple[float, ReplicaMetrics]] = {}

    async def scrape(self, replicas: Sequence[tuple[str, str]], now: float) -> Load:
        """`replicas`: (pod name, IP) of the ready replicas, scraped concurrently. Unreachable ones
        are left out."""
        texts = await asyncio.gather(
            *(get_text(f"http://{_host(ip)}:{self.port}/metrics", self.timeout) for _, ip in replicas)
        )
        current: dict[str, tuple[float, ReplicaMetrics]] = {}
        for (name, _), text in zip(replicas, texts, strict=True):
            if text is not None:
                try:
                    current[name] = (now, parse_metrics(text))
                except ValueError:
                    continue
        load = self.combine(current)
        self.previous = current
        return load

    def combine(self, current: Mapping[str, tuple[float, ReplicaMetrics]]) -> Load:
        if not current:
            return Load()
        rps = tokens = 0.0
        rate_known = False
        window: dict[float, float] = {}
        for name, (at, metrics) in current.items():
            before = self.previous.get(name)
            if before is None or at <= before[0] or metrics.requests < before[1].requests:
                continue  # first sight, or a restarted server (counters reset)
            seconds = at - before[0]
            rate_known = True
            rps += (metrics.requests - before[1].requests) / seconds
            tokens += max(metrics.tokens - before[1].tokens, 0.0) / seconds
            for bound, count in metrics.buckets.items():
                window[bound] = window.get(bound, 0.0) + count - before[1].buckets.get(bound, 0.0)
        p50 = histogram_quantile(0.5, window) if window else None
        p99 = histogram_quantile(0.99, window) if window else None
        return Load(
            concurrency=sum(m.inflight for _, m in current.values()),
            queue_depth=sum(m.queue_depth for _, m in current.values()),
            rps=rps if rate_known else None,
            latency_p50_ms=None if p50 is None else p50 * 1000,
            latency_p99_ms=None if p99 is None else p99 * 1000,
            tokens_per_second=tokens if rate_known else None,
            replicas=len(current),
        )


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


# ------------------------------------------------------------------------------------------------
# The Prometheus HTTP API
# ------------------------------------------------------------------------------------------------


def promql(namespace: str, model: str, rate_window: str = "1m") -> dict[str, str]:
    """The queries behind a Load, for one service (its replicas label every series `model=NAME`)."""
    selector = f'namespace="{namespace}",model="{model}"'
    requests = f'{selector},route=~"{INFERENCE_ROUTES}"'

    def quantile(q: float) -> str:
        return (
            f"1000 * histogram_quantile({q}, sum by (le) "
            f"(rate({REQUEST_DURATION}_bucket{{{requests}}}[{rate_window}])))"
        )

    return {
        "concurrency": f"sum({INFLIGHT}{{{selector}}})",
        "queue_depth": f"sum({QUEUE_DEPTH}{{{selector}}})",
        # irate: the last two scrapes, so a burst shows within one scrape interval.
        "rps": f"sum(irate({REQUEST_DURATION}_count{{{requests}}}[{rate_window}]))",
        "latency_p50_ms": quantile(0.5),
        "latency_p99_ms": quantile(0.99),
        "tokens_per_second": f"sum(irate({TOKENS}{{{selector}}}[{rate_window}]))",
        "replicas": f"count({INFLIGHT}{{{selector}}})",
    }


def instant_value(reply: Mapping[str, object]) -> float | None:
    """The single value of an instant-query reply (None when empty or NaN)."""
    data = reply.get("data")
    if reply.get("status") != "success" or not isinstance(data, dict):
        return None
    result = data.get("result") or []
    if not isinstance(result, list) or not result:
        return None
    value = float(result[0]["value"][1])
    return None if math.isnan(value) or math.isinf(value) else value


async def query_prometheus(
    base_url: str, queries: Mapping[str, str], timeout: float = QUERY_TIMEOUT_SECONDS
) -> Load:
    """Run the queries (concurrently) against Prometheus' /api/v1/query; a failed one is unknown."""

    async def run(query: str) -> float | None:
        url = f"{base_url.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": query})
        text = await get_text(url, timeout)
        if text is None:
            return None
        try:
            return instant_value(json.loads(text))
        except (ValueError, KeyError, IndexError, TypeError):
            return None

    names = list(queries)
    values = dict(zip(names, await asyncio.gather(*(run(queries[n]) for n in names)), strict=True))
    return Load(
        concurrency=values.get("concurrency"),
        queue_depth=values.get("queue_depth"),
        rps=values.get("rps"),
        latency_p50_ms=values.get("latency_p50_ms"),
        latency_p99_ms=values.get("latency_p99_ms"),
        tokens_per_second=values.get("tokens_per_second"),
        replicas=int(values.get("replicas") or 0),
    )


def rounded(load: Load) -> dict[str, float]:
    """The snapshot as `status.metrics` fields (camelCase), rounded for display; unknown ones left out."""
    fields: Iterable[tuple[str, float | None, int]] = (
        ("rps", load.rps, 2),
        ("latencyP50Ms", load.latency_p50_ms, 1),
        ("latencyP99Ms", load.latency_p99_ms, 1),
        ("queueDepth", load.queue_depth, 1),
        ("concurrency", load.concurrency, 1),
        ("tokensPerSecond", load.tokens_per_second, 1),
    )
    return {name: round(max(value, 0.0), digits) for name, value, digits in fields if value is not None}
