"""Runs the app under uvicorn on a socket bound up front, and drains on SIGTERM.

First SIGTERM (or Ctrl+C): the server leaves rotation (`/v2/health/ready` 503, new inference requests 503
with `Connection: close`), requests already accepted finish, the batcher stops, then uvicorn exits 0.
A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from dataclasses import dataclass, field
from types import FrameType

import uvicorn

from tandem.errors import UserError
from tandem.workloads.serve.batcher import BatchingConfig
from tandem.workloads.serve.dataplane import DataPlane
from tandem.workloads.serve.http import HttpLimits, build_app
from tandem.workloads.serve.metrics import ServeMetrics
from tandem.workloads.serve.model import ModelOptions, Runtime, create_model

log = logging.getLogger("tandem.serve")


@dataclass(frozen=True)
class ServerConfig:
    """Everything `tandem serve` configures (built by the CLI in `main`, never at import time)."""

    runtime: Runtime
    model: ModelOptions
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    limits: HttpLimits = field(default_factory=HttpLimits)
    host: str = "127.0.0.1"
    port: int = 8080
    drain_timeout_s: float = 30.0
    log_level: str = "info"
    access_log: bool = False


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, plane: DataPlane, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.plane = plane
        self.drain_timeout_s = drain_timeout_s
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None or self._drain_task is not None or self.should_exit:
            self.should_exit = True
            self.force_exit = self._drain_task is not None
            return
        log.info("received %s: draining", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        finished = await self.plane.drain(self.drain_timeout_s)
        if not finished:
            self.exit_code = 1
        self.should_exit = True

    def load_failed(self) -> None:
        self.exit_code = 1
        self.should_exit = True


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port or --host"
        ) from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(config: ServerConfig) -> int:
    """Serve until drained; the exit code (0 after a clean drain, 1 if loading or draining failed)."""
    model = create_model(config.runtime, config.model)
    metrics = ServeMetrics(model.name, config.batching.max_batch_size)
    plane = DataPlane(model, config.batching, metrics)
    sock = bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    server: DrainingServer | None = None

    def load_failed() -> None:
        if server is not None:
            server.load_failed()

    app = build_app(plane, config.limits, on_load_failed=load_failed)
    uv_config = uvicorn.Config(
        app,
        log_level=config.log_level,
        access_log=config.access_log,
        lifespan="on",
        timeout_graceful_shutdown=max(1, int(config.drain_timeout_s)),
        server_header=False,
        proxy_headers=False,  # the Service in front is no proxy whose headers we trust; saves a middleware
    )
    server = DrainingServer(uv_config, plane, config.drain_timeout_s)
    # Printed at every log level: ServerProcess (tests, benchmarks) reads the address from this line.
    print(
        f"tandem serve: serving {model.name} ({config.runtime.value}) on http://{host}:{port}; "
        "loading the model",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return server.exit_code
