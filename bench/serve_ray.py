"""Variants (d), (dN), (d0) of bench/serve_load.py: the same model behind Ray Serve with `@serve.batch`.

    with ray_serve(model_dir, runtime="embeddings", device="cpu", max_batch_size=32,
                   max_queue_delay_ms=5, replicas=1) as served:
        ...  # POST {served.url}/v1/embeddings {"input": "..."}: the same body and answer as `tandem serve`
        print(served.batch_sizes())  # the batches Ray formed since the last call

`replicas` replicas each holding the same Tandem model object (`EmbeddingModel`, or with runtime "noop" the
no-op model: the server's own cost), `@serve.batch(max_batch_size, batch_wait_timeout_s)` set to Tandem's
`--max-batch-size` and `--max-queue-delay-ms`, the batch computed in a worker thread (as Tandem does) so the
next one forms meanwhile, requests through Ray Serve's HTTP proxy (its own process, on loopback). On CPU
each replica gets as many threads as a `tandem serve` process (every core: Ray is told of `cores x
replicas` CPUs so that it does not cut a replica's torch threads), as `--workers N` processes do.

Every replica appends the size of each batch it forms to a file of its own, so the benchmark can show what
batches Ray forms at each rate (a baseline nobody had looked at is not a baseline).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def build_app(
    model_dir: Path,
    runtime: str,
    device: str,
    max_batch_size: int,
    max_queue_delay_ms: float,
    replicas: int,
    batch_log_dir: Path,
) -> Any:
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(
        num_replicas=replicas,
        max_ongoing_requests=max(1000, 8 * max_batch_size),
        # On CPU a replica gets every core (Ray sets its torch threads from num_cpus), like `tandem serve`.
        ray_actor_options=(
            {"num_cpus": 1, "num_gpus": 1 / replicas}
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
            self.batch_log = (batch_log_dir / f"replica-{os.getpid()}.txt").open("a", buffering=1)

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=max_queue_delay_ms / 1000)
        async def embed(self, texts: list[str]) -> list[list[float]]:
            self.batch_log.write(f"{len(texts)}\n")
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


@dataclass
class RayServed:
    url: str
    batch_log_dir: Path
    _read: dict[Path, int] = field(default_factory=dict)

    def batch_sizes(self) -> Counter[int]:
        """Sizes of the batches the replicas formed since the last call (size -> batches)."""
        sizes: Counter[int] = Counter()
        for path in sorted(self.batch_log_dir.glob("replica-*.txt")):
            lines = path.read_text().splitlines()
            sizes.update(int(line) for line in lines[self._read.get(path, 0) :] if line.strip())
            self._read[path] = len(lines)
        return sizes


@contextlib.contextmanager
def ray_serve(
    model_dir: Path,
    *,
    runtime: str,
    device: str,
    max_batch_size: int,
    max_queue_delay_ms: float,
    replicas: int = 1,
) -> Iterator[RayServed]:
    """Start Ray (local), Serve on a free loopback port, and the deployment; yield its URL and batch log."""
    import ray
    from ray import serve

    port = free_port()
    cpus = len(os.sched_getaffinity(0)) * replicas
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="ray-batches-") as folder:
            serve.start(
                http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"}
            )
            app = build_app(
                model_dir, runtime, device, max_batch_size, max_queue_delay_ms, replicas, Path(folder)
            )
            serve.run(
                app, name="bench", route_prefix="/v1/embeddings", logging_config={"log_level": "WARNING"}
            )
            yield RayServed(f"http://127.0.0.1:{port}", Path(folder))
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
