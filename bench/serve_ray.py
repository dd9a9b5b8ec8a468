"""Variant (d) of bench/serve_load.py: the same model behind Ray Serve with `@serve.batch`.

    with ray_serve(model_dir, runtime="embeddings", device="cpu", max_batch_size=32,
                   max_queue_delay_ms=5) as url:
        ...  # POST {url}/v1/embeddings {"input": "..."}: the same body and answer as `tandem serve`

One replica holding the same Tandem model object (`EmbeddingModel`, or the no-op model for the server's own
cost), `@serve.batch(max_batch_size, batch_wait_timeout_s)` set to Tandem's `--max-batch-size` and
`--max-queue-delay-ms`, the batch computed in a worker thread (as Tandem does) so the next one forms
meanwhile, requests through Ray Serve's HTTP proxy (its own process, on loopback).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def build_app(
    model_dir: Path, runtime: str, device: str, max_batch_size: int, max_queue_delay_ms: float
) -> Any:
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(
        max_ongoing_requests=max(1000, 8 * max_batch_size),
        # On CPU the replica gets every core (Ray sets its torch threads from num_cpus), like `tandem serve`.
        ray_actor_options=(
            {"num_cpus": 1, "num_gpus": 1}
            if device.startswith("cuda")
            else {"num_cpus": len(os.sched_getaffinity(0))}
        ),
    )
    class Embedder:
        def __init__(self) -> None:
            from tandem.api.serving import Runtime
            from tandem.workloads.serve.model import ModelOptions, create_model

            self.model = create_model(Runtime(runtime), ModelOptions("minilm", model_dir, device))
            self.model.load()
            self.model.warm_up(max_batch_size)

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=max_queue_delay_ms / 1000)
        async def embed(self, texts: list[str]) -> list[list[float]]:
            results = await asyncio.get_running_loop().run_in_executor(None, self.model.predict, texts)
            return [r.vector.tolist() for r in results]

        async def __call__(self, request: Request) -> dict[str, Any]:
            body = await request.json()
            vector = await self.embed(body["input"])
            return {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": vector}],
                "model": "minilm",
            }

    return Embedder.bind()  # type: ignore[attr-defined]


@contextlib.contextmanager
def ray_serve(
    model_dir: Path, *, runtime: str, device: str, max_batch_size: int, max_queue_delay_ms: float
) -> Iterator[str]:
    """Start Ray (local), Serve on a free loopback port, and the deployment; yield the base URL."""
    import ray
    from ray import serve

    port = free_port()
    ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
        app = build_app(model_dir, runtime, device, max_batch_size, max_queue_delay_ms)
        serve.run(app, name="bench", route_prefix="/v1/embeddings", logging_config={"log_level": "WARNING"})
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
