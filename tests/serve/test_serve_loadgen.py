"""The benchmark load generator: real processes, real sockets, on loopback."""

from __future__ import annotations

import json

import pytest
from loadgen import LoadGenerator, percentile, static_server
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


def test_chunked_replies_keep_their_connections_in_step() -> None:
    body = json.dumps({"data": [{"embedding": [0.5] * 64}]}).encode()  # many small chunks per reply
    with static_server(body, chunked=True) as url, LoadGenerator(processes=1, max_connections=4) as gen:
        result = gen.run(url, "/v1/embeddings", [b'{"input":"x"}'], rate=400, seconds=1)
    assert result.ok == 400, result.summary()
    assert result.connections <= 4  # connections were reused reply after reply


def test_a_broken_reply_fails_its_requests_and_never_hangs_the_run() -> None:
    broken = b"HTTP/1.1 200 OK\r\ncontent-length: nonsense\r\n\r\n{}"
    with static_server(reply=broken) as url, LoadGenerator(processes=2, timeout_s=10) as gen:
        result = gen.run(url, "/v1/embeddings", [b'{"input":"x"}'], rate=100, seconds=1)
        assert result.failed == 100, result.summary()
        assert result.ok == 0
        with static_server() as good:  # the same worker processes go on with the next run
            again = gen.run(good, "/v1/embeddings", [b'{"input":"x"}'], rate=100, seconds=1)
    assert again.ok == 100, again.summary()


def test_percentiles_are_nearest_rank() -> None:
    assert percentile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.0
    assert percentile([3.0, 1.0, 2.0, 4.0], 0.99) == 4.0
    assert percentile([], 0.5) != percentile([], 0.5)  # nan


def test_a_dead_worker_is_an_error_not_a_hang() -> None:
    with static_server() as url, LoadGenerator(processes=2) as gen:
        gen._workers[1].process.kill()
        with pytest.raises(RuntimeError, match="died"):
            gen.run(url, "/v1/embeddings", [b'{"input":"x"}'], rate=100, seconds=0.5)
