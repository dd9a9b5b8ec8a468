"""The worker board of `tandem serve --workers N` and readiness built on it, in one process (the real
multi-process server is tested in tests/serve/test_serve_workers_http.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from tandem.workloads.serve.batcher import BatchingConfig
from tandem.workloads.serve.dataplane import DataPlane, State
from tandem.workloads.serve.http import HttpLimits, build_app
from tandem.workloads.serve.metrics import ServeMetrics
from tandem.workloads.serve.model import ModelOptions
from tandem.workloads.serve.runtimes.noop import NoopModel
from tandem.workloads.serve.workers import WorkerBoard


def boards(tmp_path: Path, workers: int) -> list[WorkerBoard]:
    path = tmp_path / "workers"
    WorkerBoard.create(path, workers)
    return [WorkerBoard(path, index, workers) for index in range(workers)]


def test_every_worker_sees_every_state(tmp_path: Path) -> None:
    first, second = boards(tmp_path, 2)
    assert first.states() == [State.LOADING, State.LOADING]
    first.publish(State.READY)
    assert second.states() == [State.READY, State.LOADING]
    assert (second.ready_count(), second.all_ready()) == (1, False)
    second.publish(State.READY)
    assert first.all_ready()
    second.publish(State.DRAINING)
    assert not first.all_ready()
    assert first.states() == [State.READY, State.DRAINING]


def test_the_server_is_ready_only_when_every_worker_is(tmp_path: Path) -> None:
    first, second = boards(tmp_path, 2)
    model = NoopModel(ModelOptions("nothing", tmp_path))
    config = BatchingConfig(max_batch_size=4, max_queue_delay_ms=0)
    plane = DataPlane(model, config, ServeMetrics(model.name, 4, process_metrics=False), peers=first)
    app = build_app(plane, HttpLimits(), on_load_failed=lambda: None, worker="1234")

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await plane.load()
            assert plane.ready  # this worker serves requests...
            answer = await client.post("/v1/embeddings", json={"input": "hi"})
            assert answer.status_code == 200
            assert answer.headers["x-tandem-worker"] == "1234"
            ready = await client.get("/v2/health/ready")  # ...but the server is not ready yet
            assert ready.status_code == 503
            assert ready.json() == {"ready": False, "state": "ready", "workers": {"ready": 1, "total": 2}}
            assert ready.headers["x-tandem-worker"] == "1234"

            second.publish(State.READY)
            assert (await client.get("/v2/health/ready")).status_code == 200
            assert (await client.get("/v2/models/nothing/ready")).status_code == 200

            second.publish(State.DRAINING)  # one worker drains: the server leaves rotation
            assert (await client.get("/v2/health/ready")).status_code == 503
            assert await plane.drain(5)
            assert first.states() == [State.STOPPED, State.DRAINING]

    asyncio.run(asyncio.wait_for(main(), timeout=10))
