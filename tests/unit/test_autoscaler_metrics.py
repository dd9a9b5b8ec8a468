"""Reading load: the model server's /metrics text, histogram quantiles, Prometheus replies and queries."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tandem.operator import kubehttp
from tandem.operator.autoscaler_metrics import (
    Load,
    Scraper,
    histogram_quantile,
    instant_value,
    parse_metrics,
    promql,
    rounded,
)


def exposition(inflight: float, queue: float, requests: float, fast: float) -> str:
    """A model server's /metrics: `requests` inference requests, `fast` of them under 10 ms."""
    buckets = {"0.01": fast, "0.1": requests, "+Inf": requests}
    lines = [
        "# HELP tandem_serve_inflight_requests in flight",
        "# TYPE tandem_serve_inflight_requests gauge",
        f'tandem_serve_inflight_requests{{model="m"}} {inflight}',
        "# HELP tandem_serve_queue_depth waiting",
        "# TYPE tandem_serve_queue_depth gauge",
        f'tandem_serve_queue_depth{{model="m"}} {queue}',
        "# HELP tandem_serve_request_duration_seconds latency",
        "# TYPE tandem_serve_request_duration_seconds histogram",
    ]
    route = "/v2/models/{name}/infer"
    for le, count in buckets.items():
        lines.append(
            f'tandem_serve_request_duration_seconds_bucket{{code="200",le="{le}",model="m",route="{route}"}} '
            f"{count}"
        )
    lines.append(
        f'tandem_serve_request_duration_seconds_count{{code="200",model="m",route="{route}"}} {requests}'
    )
    lines.append(f'tandem_serve_request_duration_seconds_sum{{code="200",model="m",route="{route}"}} 1.0')
    # Health checks are not load.
    lines.append(
        'tandem_serve_request_duration_seconds_count{code="200",model="m",route="/v2/health/ready"} 999'
    )
    return "\n".join(lines) + "\n"


def test_parse_keeps_inference_routes_only() -> None:
    metrics = parse_metrics(exposition(3, 2, 100, 90))
    assert (metrics.inflight, metrics.queue_depth, metrics.requests) == (3, 2, 100)
    assert metrics.buckets == {0.01: 90, 0.1: 100, math.inf: 100}


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = {0.01: 90.0, 0.1: 100.0, math.inf: 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.01 * 50 / 90)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.01 + 0.09 * 9 / 10)
    assert histogram_quantile(0.99, {0.1: 0.0, math.inf: 0.0}) is None
    assert histogram_quantile(0.99, {0.1: 1.0, math.inf: 100.0}) == 0.1  # in +Inf: the highest bound


class _Replica(BaseHTTPRequestHandler):
    body = ""

    def do_GET(self) -> None:
        data = type(self).body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def replica() -> Iterator[tuple[ThreadingHTTPServer, type[_Replica]]]:
    handler = type("Replica", (_Replica,), {"body": ""})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, handler
    finally:
        server.shutdown()
        server.server_close()


def test_scraper_sums_gauges_and_rates_counters_between_scrapes(
    replica: tuple[ThreadingHTTPServer, type[_Replica]],
) -> None:
    server, handler = replica
    scraper = Scraper(port=server.server_address[1])
    handler.body = exposition(inflight=4, queue=1, requests=100, fast=100)
    first = kubehttp.run(scraper.scrape([("pod-a", "127.0.0.1"), ("pod-gone", "127.0.0.2")], now=10.0))
    assert (first.concurrency, first.queue_depth, first.replicas) == (4, 1, 1)
    assert first.rps is None  # a rate needs two scrapes
    handler.body = exposition(inflight=6, queue=0, requests=300, fast=120)
    second = kubehttp.run(scraper.scrape([("pod-a", "127.0.0.1")], now=12.0))
    assert second.rps == pytest.approx(100.0)
    assert second.concurrency == 6
    # 200 new requests, 20 under 10 ms: p50 and p99 fall in the 10-100 ms bucket.
    assert second.latency_p50_ms is not None
    assert 10 < second.latency_p50_ms < 100
    assert second.latency_p99_ms == pytest.approx(1000 * (0.01 + 0.09 * (198 - 20) / 180))
    assert rounded(second)["rps"] == 100.0


def test_promql_selects_the_services_series() -> None:
    queries = promql("ml", "embed")
    assert queries["concurrency"] == 'sum(tandem_serve_inflight_requests{namespace="ml",model="embed"})'
    assert "irate(tandem_serve_request_duration_seconds_count" in queries["rps"]
    assert 'route=~".*/infer|/v1/embeddings' in queries["rps"]
    assert queries["latency_p99_ms"].startswith("1000 * histogram_quantile(0.99, sum by (le)")


def test_instant_value_reads_a_prometheus_reply() -> None:
    reply = {"status": "success", "data": {"resultType": "vector", "result": [{"value": [1.0, "2.5"]}]}}
    assert instant_value(reply) == 2.5
    assert instant_value({"status": "success", "data": {"result": []}}) is None
    assert instant_value({"status": "success", "data": {"result": [{"value": [1, "NaN"]}]}}) is None
    assert instant_value({"status": "error"}) is None


def test_load_value_maps_the_autoscaler_metrics() -> None:
    load = Load(concurrency=1, queue_depth=2, rps=3, latency_p99_ms=4)
    assert [load.value(m) for m in ("concurrency", "queueDepth", "rps", "latencyP99")] == [1, 2, 3, 4]
