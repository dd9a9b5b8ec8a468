"""The HTTP layer in-process with a tiny pure-Python model: the error table, readiness, draining, and
disconnected clients dropped before compute. (The real model over real sockets is in tests/serve/.)"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Coroutine, MutableMapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest

from tandem.api.serving import Runtime
from tandem.workloads.serve import errors
from tandem.workloads.serve.batcher import BatchingConfig
from tandem.workloads.serve.dataplane import DataPlane, State
from tandem.workloads.serve.http import HTTP_STATUS, HttpLimits, build_app, status_for
from tandem.workloads.serve.metrics import ServeMetrics
from tandem.workloads.serve.model import ModelOptions
from tandem.workloads.serve.runtimes.embeddings import Embedding

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


class LengthModel:
    """Embeds a text as its length; `gate` (if set) blocks each batch until released."""

    runtime = Runtime.EMBEDDINGS

    def __init__(self, gated: bool = False) -> None:
        self.name = "lengths"
        self.options = ModelOptions("lengths", Path("."))
        self.batches: list[list[str]] = []
        self.gate = threading.Semaphore(0) if gated else None
        self.started = threading.Event()
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    def load(self) -> None:
        pass

    def warm_up(self, max_batch_size: int) -> None:
        self._ready = True

    def predict(self, batch: list[str]) -> Sequence[Embedding]:
        self.batches.append(batch)
        self.started.set()
        if self.gate is not None:
            self.gate.acquire()
        return [Embedding(np.array([len(t)], np.float32), tokens=len(t)) for t in batch]

    def metadata(self) -> dict[str, Any]:
        return {"platform": "test", "dimensions": 1}


def make_plane(model: LengthModel, **batching: Any) -> DataPlane:
    # A gated batch lasts as long as its test holds it: no admission by expected wait.
    config = BatchingConfig(
        **{"max_batch_size": 4, "max_queue_delay_ms": 0, "max_queue_wait_s": None, **batching}
    )
    return DataPlane(model, config, ServeMetrics(model.name, config.max_batch_size, process_metrics=False))


def client_for(plane: DataPlane, **limits: Any) -> httpx.AsyncClient:
    app = build_app(plane, HttpLimits(**limits), on_load_failed=lambda: None)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_every_domain_error_has_a_status() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.ServeError)]
    for cls in classes:
        if cls is errors.ServeError:
            continue
        error = cls.__new__(cls)
        assert status_for(error) != 500 or cls is errors.ModelError, cls
    assert status_for(errors.Draining("x")) == 503
    assert status_for(errors.QueueFull("x", 3)) == 429
    assert set(HTTP_STATUS.values()) >= {400, 404, 413, 429, 500, 503, 504}


def test_not_ready_until_loaded_then_ready() -> None:
    async def main() -> None:
        plane = make_plane(LengthModel())
        async with client_for(plane) as client:
            response = await client.get("/v2/health/ready")
            assert response.status_code == 503
            assert response.json() == {"ready": False, "state": "loading"}
            loading = await client.post("/v1/embeddings", json={"input": "hi"})
            assert loading.status_code == 503
            assert loading.headers["retry-after"] == "1"
            await plane.load()
            assert (await client.get("/v2/health/ready")).status_code == 200
            answer = await client.post("/v1/embeddings", json={"input": ["hi", "there"]})
            assert [d["embedding"] for d in answer.json()["data"]] == [[2.0], [5.0]]
            assert answer.json()["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
            await plane.drain(5)

    run(main())


def test_draining_refuses_new_requests_with_503_and_connection_close() -> None:
    async def main() -> None:
        plane = make_plane(LengthModel())
        await plane.load()
        async with client_for(plane) as client:
            assert await plane.drain(5)
            assert plane.state is State.STOPPED
            response = await client.post("/v1/embeddings", json={"input": "late"})
            assert response.status_code == 503
            assert response.headers["connection"] == "close"
            assert "shutting down" in response.json()["error"]["message"]
            assert (await client.get("/v2/health/ready")).status_code == 503
            assert (await client.get("/v2/health/live")).status_code == 200

    run(main())


def test_drain_waits_for_requests_in_flight() -> None:
    async def main() -> None:
        model = LengthModel(gated=True)
        plane = make_plane(model)
        await plane.load()
        async with client_for(plane) as client:
            accepted = asyncio.ensure_future(client.post("/v1/embeddings", json={"input": "abc"}))
            await asyncio.to_thread(model.started.wait)
            drain = asyncio.ensure_future(plane.drain(5))
            while plane.state is not State.DRAINING:
                await asyncio.sleep(0)
            refused = await client.post("/v1/embeddings", json={"input": "late"})
            assert refused.status_code == 503
            assert not drain.done()
            assert model.gate is not None
            model.gate.release()
            answer = await accepted
            assert answer.status_code == 200
            # finished during the drain: the client must not send another request on this connection
            assert answer.headers["connection"] == "close"
            assert await drain is True

    run(main())


def test_body_limit_is_413() -> None:
    async def main() -> None:
        plane = make_plane(LengthModel())
        await plane.load()
        async with client_for(plane, max_request_bytes=100) as client:
            response = await client.post("/v1/embeddings", content=json.dumps({"input": "x" * 200}))
            assert response.status_code == 413
            assert response.json()["error"]["type"] == "PayloadTooLarge"
        await plane.drain(5)

    run(main())


def test_a_disconnected_client_is_dropped_before_compute() -> None:
    """Call the ASGI app directly so the test controls when the client goes away."""

    async def main() -> None:
        model = LengthModel(gated=True)
        plane = make_plane(model, max_batch_size=1)
        await plane.load()
        app = build_app(plane, HttpLimits(), on_load_failed=lambda: None)

        async def call(text: str, gone: asyncio.Event) -> list[MutableMapping[str, Any]]:
            body = json.dumps({"input": text}).encode()
            messages = [{"type": "http.request", "body": body, "more_body": False}]
            sent: list[MutableMapping[str, Any]] = []

            async def receive() -> dict[str, Any]:
                if messages:
                    return messages.pop()
                await gone.wait()
                return {"type": "http.disconnect"}

            async def send(message: MutableMapping[str, Any]) -> None:
                sent.append(message)

            scope = {
                "type": "http", "method": "POST", "path": "/v1/embeddings", "raw_path": b"/v1/embeddings",
                "query_string": b"", "headers": [(b"content-length", str(len(body)).encode())],
                "http_version": "1.1", "scheme": "http", "server": ("test", 80), "client": ("test", 1),
                "root_path": "",
            }  # fmt: skip
            await app(scope, receive, send)
            return sent

        stays, leaves = asyncio.Event(), asyncio.Event()
        first = asyncio.ensure_future(call("first", stays))
        await asyncio.to_thread(model.started.wait)  # "first" is computing (gated)
        second = asyncio.ensure_future(call("second", leaves))
        assert plane.batcher is not None
        while plane.batcher.queue_depth != 1:
            await asyncio.sleep(0)
        leaves.set()  # the second client disconnects while queued
        while plane.batcher.queue_depth != 0:
            await asyncio.sleep(0)
        assert model.gate is not None
        model.gate.release()
        answer = await first
        assert answer[0]["status"] == 200
        await second
        assert model.batches == [["first"]]
        text = plane.metrics.render().decode()
        assert 'tandem_serve_dropped_requests_total{model="lengths",reason="cancelled"} 1.0' in text
        assert 'code="499"' in text
        await plane.drain(5)

    run(main())


def request_count(plane: DataPlane, route: str, code: str) -> float:
    value = plane.metrics.registry.get_sample_value(
        "tandem_serve_request_duration_seconds_count", {"model": "lengths", "route": route, "code": code}
    )
    return value or 0.0


def test_unknown_routes_and_wrong_methods_are_json_errors_in_the_metrics() -> None:
    async def main() -> None:
        plane = make_plane(LengthModel())
        async with client_for(plane) as client:
            openai_404 = await client.post("/v1/chat/completions", json={})  # not for an embeddings model
            assert openai_404.status_code == 404
            error = openai_404.json()["error"]
            assert error["code"] == 404
            assert "/v1/embeddings" in error["message"]  # says what this runtime serves
            oip_404 = await client.get("/v2/nothing")
            assert oip_404.status_code == 404
            assert oip_404.json()["error"].startswith("GET /v2/nothing")
            get_post = await client.get("/v1/embeddings")
            assert get_post.status_code == 405
            assert get_post.headers["allow"] == "POST"
            assert get_post.json()["error"]["code"] == 405
            post_get = await client.post("/v2/health/ready")
            assert post_get.status_code == 405
            assert "GET" in post_get.headers["allow"]
            assert isinstance(post_get.json()["error"], str)
            assert (await client.get("/v1/models/lengths")).json()["id"] == "lengths"
            assert (await client.get("/v1/models/other")).status_code == 404
        assert request_count(plane, "(unmatched)", "404") == 2
        assert request_count(plane, "(unmatched)", "405") == 2
        assert request_count(plane, "/v1/models/{model:path}", "404") == 1

    run(main())


def test_a_large_embeddings_request_is_served_in_chunks_whatever_the_queue_bound() -> None:
    async def main() -> None:
        model = LengthModel()
        plane = make_plane(model, max_queue_size=8)  # batches of 4
        await plane.load()
        async with client_for(plane) as client:
            texts = ["x" * (i % 7 + 1) for i in range(2048)]
            answer = await client.post("/v1/embeddings", json={"input": texts})
            assert answer.status_code == 200, answer.text
            assert [d["embedding"][0] for d in answer.json()["data"]] == [len(t) for t in texts]
            assert max(len(b) for b in model.batches) == 4
            too_many = await client.post("/v1/embeddings", json={"input": ["x"] * 2049})
            assert too_many.status_code == 400
            assert too_many.json()["error"]["param"] == "input"
        await plane.drain(5)

    run(main())


def test_chat_templates_declared_by_the_model_or_the_default(tmp_path: Path) -> None:
    from tandem.workloads.serve.protocols.chat import DEFAULT_STOPS, Message, find_template, render

    messages = [Message(role="developer", content="Be brief."), Message(role="user", content="Hi")]
    default = find_template(tmp_path)
    assert render(default, messages) == "System: Be brief.\n\nUser: Hi\n\nAssistant:"
    assert default.stops == DEFAULT_STOPS
    step = tmp_path / "step-00000003"
    step.mkdir()
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        "{% if messages[-1].role != 'user' %}"
        "{{ raise_exception('the last message must be the user') }}{% endif %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    declared = find_template(step)  # the checkpoint root's template serves its step directories
    assert render(declared, messages) == "<system>Be brief.<user>Hi<assistant>"
    assert declared.stops == ()
    with pytest.raises(errors.InvalidInput) as refused:
        render(declared, [Message(role="assistant", content="Hello")])
    assert refused.value.field == "messages"
    assert "the last message must be the user" in refused.value.message


class ThreadRecordingModel(LengthModel):
    """Records the thread each batch ran in (the embeddings runtime tokenizes its batch there)."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[str] = set()

    def predict(self, batch: list[str]) -> Sequence[Embedding]:
        self.threads.add(threading.current_thread().name)
        return super().predict(batch)


def test_texts_reach_the_model_in_batches_off_the_event_loop() -> None:
    """Tokenizing is the model's work on its batch, in the batch's thread: the event loop hands the texts
    over with the batch and never tokenizes (nor hands each request to a tokenizer thread)."""

    async def main() -> None:
        model = ThreadRecordingModel()
        plane = make_plane(model)
        await plane.load()
        loop_thread = threading.current_thread().name
        async with client_for(plane) as client:
            answers = await asyncio.gather(
                *(client.post("/v1/embeddings", json={"input": ["abc", "de"]}) for _ in range(3))
            )
            assert all(a.status_code == 200 for a in answers)
            assert [[d["embedding"] for d in a.json()["data"]] for a in answers] == [[[3.0], [2.0]]] * 3
        await plane.drain(5)
        assert sorted(text for batch in model.batches for text in batch) == ["abc"] * 3 + ["de"] * 3
        assert model.threads
        assert loop_thread not in model.threads

    run(main())


def test_a_half_sent_body_gets_408_and_its_connection_closes() -> None:
    async def main() -> None:
        plane = make_plane(LengthModel())
        await plane.load()
        app = build_app(plane, HttpLimits(body_timeout_s=0.2), on_load_failed=lambda: None)
        sent: list[MutableMapping[str, Any]] = []
        parts = [{"type": "http.request", "body": b'{"input": "hal', "more_body": True}]

        async def receive() -> MutableMapping[str, Any]:
            if parts:
                return parts.pop(0)
            await asyncio.Event().wait()  # the client never sends the rest
            raise AssertionError("unreachable")

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/embeddings",
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"40")],
        }
        await app(scope, receive, send)
        start = sent[0]
        assert start["status"] == 408
        assert (b"connection", b"close") in start["headers"]
        assert b"no part of the request body arrived" in sent[1]["body"]
        assert plane.metrics.registry.get_sample_value(
            "tandem_serve_request_duration_seconds_count",
            {"model": "lengths", "route": "/v1/embeddings", "code": "408"},
        )
        await plane.drain(5)

    run(main())
