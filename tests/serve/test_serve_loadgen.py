"""The benchmark load generator: real processes, real sockets, on loopback."""

from __future__ import annotations

import json

from loadgen import LoadGenerator, _chunked_end, percentile, static_server
from serverprocess import ServerProcess


def test_sustains_thousands_of_requests_per_second_against_a_static_server() -> None:
    with static_server(b'{"ok":true}') as url, LoadGenerator(processes=2) as gen:
        result = gen.run(url, "/v1/embeddings", [b'{"input":"x"}'], rate=2000, seconds=1.5)
    assert result.sent == 3000
    assert result.ok == 3000, result.summary()
    assert result.errors == 0
    assert len(result.latencies_s) == 3000
    assert result.throughput > 1500, result.summary()


def test_counts_error_statuses_from_a_real_server() -> None:
    args = ["--runtime", "noop", "--model-uri", ".", "--max-batch-size", "4", "--max-queue-delay-ms", "0"]
    bodies = [json.dumps({"input": "hello"}).encode(), b'{"input": 5}']
    with ServerProcess(args) as server, LoadGenerator(processes=1) as gen:
        result = gen.run(server.url, "/v1/embeddings", bodies, rate=200, seconds=1)
    assert result.ok == 100
    assert result.statuses == {400: 100}
    assert result.errors == 100


def test_chunked_bodies_and_percentiles() -> None:
    body = bytearray(b"5\r\nhello\r\n6;x=1\r\n world\r\n0\r\n\r\nNEXT")
    assert _chunked_end(body, 0) == len(body) - len(b"NEXT")
    assert _chunked_end(bytearray(b"5\r\nhel"), 0) == -1
    assert percentile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.0
    assert percentile([3.0, 1.0, 2.0, 4.0], 0.99) == 4.0
