"""Runs the app under uvicorn on a socket bound up front, and drains on SIGTERM.

First SIGTERM (or Ctrl+C): the server leaves rotation (`/v2/health/ready` 503, new inference requests 503
with `Connection: close`), requests already accepted finish (their answers close their connections), the
batcher stops; then the listener closes, idle kept-alive connections are closed cleanly once idle for a
moment (`serve/connections.py`: no request that a client sent on one is reset) and the process exits 0,
within --drain-timeout-s plus about 2 s. A second signal exits at once.

With `workers` > 1, `serve` hands over to `tandem.workloads.serve.workers`: a supervisor process starts that
many worker processes, each running `run_server` here on its own listening socket of the same port.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from tandem.api.serving import Runtime
from tandem.errors import UserError
from tandem.workloads.serve.batcher import BatchingConfig
from tandem.workloads.serve.connections import CLOSE_BUDGET_S, ConnectionLimits, protocol_for
from tandem.workloads.serve.dataplane import DataPlane
from tandem.workloads.serve.http import HttpLimits, build_app
from tandem.workloads.serve.metrics import ServeMetrics
from tandem.workloads.serve.model import ModelOptions, create_model

if TYPE_CHECKING:
    from tandem.workloads.serve.workers import WorkerContext

log = logging.getLogger("tandem.serve")

#: How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). A server process
#: has two busy threads: the event loop (HTTP, protocols, the scheduler's per-token work) and the model's
#: worker thread, which drops the GIL while the accelerator computes and needs it back to hand over the
#: result and launch the next step. Once the loop is saturated, every such hand-back waits for the loop's
#: interval to end: a GPU step of 2 ms took up to 2 + 5 ms. `bench/gil_handoff.py` measures it: a
#: 2-ms GIL-free wait in a loop beside a busy thread cycles in 9 ms at 5 ms, 3.1-3.3 ms at 0.5-1 ms.
GIL_SWITCH_INTERVAL_S = 0.001


def freeze_heap() -> None:
    """Once the model is loaded: collect, then move every object alive to the garbage collector's permanent
    generation (`gc.freeze`), so that its full collections scan only what requests made since. The loaded
    server holds ~220,000 tracked objects (torch, pydantic, the model's modules), and a full collection,
    which stops the event loop and the model thread alike, took 50-80 ms under generation load; after the
    freeze 15-20 ms (5,000 objects). docs/benchmarks.md has the measurements."""
    gc.collect()
    gc.freeze()


@dataclass(frozen=True)
class ServerConfig:
    """Everything `tandem serve` configures (built by the CLI in `main` from `ServerOptions`, whose
    defaults these are not: every field is given)."""

    runtime: Runtime
    model: ModelOptions
    batching: BatchingConfig
    limits: HttpLimits
    host: str
    port: int
    drain_timeout_s: float
    log_level: str
    access_log: bool
    workers: int
    """Server processes sharing the port, each with its own model copy and batcher (`--workers`)."""


class DrainingServer(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        plane: DataPlane,
        drain_timeout_s: float,
        *,
        worker: WorkerContext | None = None,
    ) -> None:
        super().__init__(config)
        self.plane = plane
        self.drain_timeout_s = drain_timeout_s
        self.worker = worker
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        if self.worker is not None:
            self.worker.watch_supervisor(self._loop, self._supervisor_gone)
        await super().serve(sockets)

    def _supervisor_gone(self) -> None:
        log.warning("the supervisor process is gone: draining")
        self.handle_exit(signal.SIGTERM, None)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGINT and self.worker is not None:
            return  # Ctrl+C reaches the whole process group; the supervisor forwards it as SIGTERM
        if self._loop is None or self._drain_task is not None or self.should_exit:
            self.should_exit = True
            self.force_exit = self._drain_task is not None
            return
        log.info("received %s: draining", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        started = time.monotonic()
        finished = await self.plane.drain(self.drain_timeout_s)
        if not finished:
            self.exit_code = 1
        # uvicorn's shutdown (listener closed, connections closed) gets what is left of the drain timeout,
        # and at least the time idle connections take to close cleanly.
        left = self.drain_timeout_s - (time.monotonic() - started)
        self.config.timeout_graceful_shutdown = math.ceil(max(left, CLOSE_BUDGET_S))
        self.should_exit = True

    def load_failed(self) -> None:
        self.exit_code = 1
        self.should_exit = True


def bind(host: str, port: int, *, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    """A TCP socket bound to host:port (a UserError names the problem). `reuse_port`: several sockets, one
    per worker process, share the port and the kernel spreads new connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port or --host"
        ) from exc
    if listen:
        sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(config: ServerConfig) -> int:
    """Serve until drained; the exit code (0 after a clean drain, 1 if loading or draining failed)."""
    if config.workers > 1:
        from tandem.workloads.serve.workers import supervise

        return supervise(config)
    sock = bind(config.host, config.port)
    host, port = sock.getsockname()[:2]

    def announce(model_name: str) -> None:
        # Printed at every log level: ServerProcess (tests, benchmarks) reads the address from this line.
        print(
            f"tandem serve: serving {model_name} ({config.runtime.value}) on http://{host}:{port}; "
            "loading the model",
            file=sys.stderr,
            flush=True,
        )

    try:
        return run_server(config, sock, announce=announce)
    finally:
        sock.close()


def run_server(
    config: ServerConfig,
    sock: socket.socket,
    *,
    announce: Callable[[str], None] | None = None,
    worker: WorkerContext | None = None,
) -> int:
    """One server process on a listening socket: load the model, serve, drain on SIGTERM; the exit code.

    `worker`: this process is one of several (`--workers`): metrics go to the shared multiprocess directory,
    readiness waits for every worker, answers name this process, and losing the supervisor drains it."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    model = create_model(config.runtime, config.model)
    if worker is None:
        metrics = ServeMetrics(model.name, config.batching.max_batch_size, runtime=config.runtime.value)
        plane = DataPlane(model, config.batching, metrics)
    else:
        board = worker.board()
        metrics = ServeMetrics(
            model.name,
            config.batching.max_batch_size,
            runtime=config.runtime.value,
            multiprocess_dir=worker.metrics_dir,
            server_ready=board.all_ready,
        )
        plane = DataPlane(model, config.batching, metrics, peers=board)
    server: DrainingServer | None = None

    def load_failed() -> None:
        if server is not None:
            server.load_failed()

    app = build_app(
        plane,
        config.limits,
        on_load_failed=load_failed,
        on_loaded=freeze_heap,
        worker=None if worker is None else str(os.getpid()),
    )
    uv_config = uvicorn.Config(
        app,
        log_level=config.log_level,
        access_log=config.access_log,
        lifespan="on",
        timeout_graceful_shutdown=max(1, int(config.drain_timeout_s)),
        # Header timeout, connection bound and a clean close of idle connections in a drain (uvicorn's
        # httptools protocol with those added).
        http=protocol_for(
            ConnectionLimits(
                header_timeout_s=config.limits.header_timeout_s,
                max_connections=config.limits.max_connections,
            )
        ),
        server_header=False,
        proxy_headers=False,  # the Service in front is no proxy whose headers we trust; saves a middleware
    )
    server = DrainingServer(uv_config, plane, config.drain_timeout_s, worker=worker)
    if announce is not None:
        announce(model.name)
    server.run(sockets=[sock])
    gc.unfreeze()  # frozen objects would never be finalized (triton's nanobind then reports leaks at exit)
    return server.exit_code
