"""`tandem serve --workers N`: N server processes on one port, watched by one supervisor process.

Why: in one process the model thread (tokenization, the forward pass's Python-side kernel launches) and the
asyncio HTTP loop take turns on one interpreter lock, so a small model on a fast GPU leaves the GPU idle
while requests wait. Each worker is a whole server (`server.run_server`): its own event loop, batcher and
copy of the model (on the same GPU with `--device cuda`), so N workers cost N model copies of memory.

- **Port**: the supervisor binds host:port with SO_REUSEPORT without listening. That reserves the port,
  resolves `--port 0` and reports a bad address before any worker starts. Each worker binds and listens on
  its own socket of that port (SO_REUSEPORT), and the kernel spreads new connections over the workers by a
  hash of their addresses. One socket shared by every worker was measured here too: whichever worker wakes
  first accepts, and 4 workers got 1, 2, 3 and 58 of 64 connections opened at once. A keep-alive connection
  stays with the worker that accepted it, so that imbalance would last.
- **Metrics**: prometheus_client's multiprocess mode. The supervisor makes a fresh directory at each start
  (`PROMETHEUS_MULTIPROC_DIR`, inherited by the workers, deleted at exit). `/metrics` of any worker merges
  every worker's samples (see `tandem.workloads.serve.metrics`).
- **Readiness**: the worker board is a file of one byte per worker, mapped into every worker. A worker
  writes its own state there (loading, ready, draining, stopped, failed). Each worker's `/v2/health/ready`
  is 200 only while every byte says ready: never before the last worker has loaded and warmed up, and no
  longer once any worker drains.
- **Drain**: SIGTERM (or Ctrl+C) to the supervisor is forwarded as SIGTERM to every worker, and each drains
  like a single server. The workers ignore SIGINT themselves: Ctrl+C reaches the whole process group and
  the supervisor forwards it. The supervisor exits 0 once every worker has exited 0. A second signal is
  forwarded too (the workers stop at once), and workers still running `drain timeout + 15 s` after the
  first signal are killed.
- **Failure**: a worker that exits untold (a crash, an out-of-memory kill, a failed load) makes the
  supervisor drain the others and exit 1, so Kubernetes restarts the whole pod rather than let it serve
  at part capacity. A worker whose supervisor is gone (killed) drains and exits too: it watches the
  supervisor's end of a pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Final

from tandem.workloads.serve.dataplane import State
from tandem.workloads.serve.server import ServerConfig, bind, run_server

log = logging.getLogger("tandem.serve")

#: How long after the first signal the supervisor waits beyond `--drain-timeout-s` before killing workers.
KILL_GRACE_S: Final = 15.0

_CODES: Final = {
    State.LOADING: 0,
    State.READY: 1,
    State.DRAINING: 2,
    State.STOPPED: 3,
    State.FAILED: 4,
}
_STATES: Final = {code: state for state, code in _CODES.items()}


class WorkerBoard:
    """Every worker's state, one byte each in a small file mapped into every worker process.

    A worker writes only its own byte (single-byte writes to a shared mapping are atomic); any worker reads
    them all when it answers a readiness probe or a scrape."""

    def __init__(self, path: Path, index: int, workers: int) -> None:
        if not 0 <= index < workers:
            raise ValueError(f"worker index {index} is outside 0..{workers - 1}")
        self.index = index
        self.workers = workers
        with open(path, "r+b") as file:
            self._map = mmap.mmap(file.fileno(), workers)

    @staticmethod
    def create(path: Path, workers: int) -> None:
        """The board file of `workers` workers, every one loading."""
        path.write_bytes(bytes([_CODES[State.LOADING]]) * workers)

    def publish(self, state: State) -> None:
        self._map[self.index] = _CODES[state]

    def states(self) -> list[State]:
        return [_STATES.get(code, State.FAILED) for code in self._map[: self.workers]]

    def ready_count(self) -> int:
        return self._map[: self.workers].count(_CODES[State.READY])

    def all_ready(self) -> bool:
        return self.ready_count() == self.workers

    def close(self) -> None:
        self._map.close()


@dataclass(frozen=True)
class WorkerContext:
    """What a worker process needs to know about its server (sent to it when it starts)."""

    index: int
    workers: int
    run_dir: Path
    host: str
    port: int

    @property
    def metrics_dir(self) -> Path:
        return self.run_dir / "metrics"

    @property
    def board_path(self) -> Path:
        return self.run_dir / "workers"

    def board(self) -> WorkerBoard:
        return WorkerBoard(self.board_path, self.index, self.workers)

    def watch_supervisor(self, loop: asyncio.AbstractEventLoop, gone: Callable[[], None]) -> None:
        """Call `gone` on `loop` when the supervisor process ends (its end of the spawn pipe closes)."""
        parent = multiprocessing.parent_process()
        sentinel = None if parent is None else parent.sentinel
        if sentinel is None:
            return

        def closed() -> None:
            loop.remove_reader(sentinel)
            gone()

        loop.add_reader(sentinel, closed)


def _worker_main(config: ServerConfig, context: WorkerContext) -> None:
    """A worker process: one whole server on its own socket of the shared port."""
    logging.basicConfig(
        level=config.log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s[worker {context.index + 1}]: %(message)s",
    )
    sock = bind(context.host, context.port, reuse_port=True)
    try:
        code = run_server(config, sock, worker=context)
    finally:
        sock.close()
        _clean_up_if_orphaned(context)
    sys.exit(code)


def _clean_up_if_orphaned(context: WorkerContext) -> None:
    """Without a supervisor (it was killed), the last worker to finish deletes the run directory."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.is_alive():
        return
    board = context.board()
    try:
        finished = all(state in (State.STOPPED, State.FAILED) for state in board.states())
    finally:
        board.close()
    if finished:
        shutil.rmtree(context.run_dir, ignore_errors=True)


def supervise(config: ServerConfig) -> int:
    """Run `config.workers` worker processes on one port until they are drained; the exit code."""
    reserved = bind(config.host, config.port, reuse_port=True, listen=False)
    host, port = reserved.getsockname()[:2]
    run_dir = Path(tempfile.mkdtemp(prefix="tandem-serve-"))
    try:
        return _Supervisor(config, host, port, run_dir).run()
    finally:
        reserved.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def _noop_handler(sig: int, frame: FrameType | None) -> None:
    """Signals are read from the wake-up pipe; a Python handler keeps the default action (exit) away."""


class _Supervisor:
    def __init__(self, config: ServerConfig, host: str, port: int, run_dir: Path) -> None:
        self.config = config
        self.host = host
        self.port = port
        self.run_dir = run_dir
        self.workers = config.workers
        self.processes: list[BaseProcess] = []
        self.stopping = False
        self.failed = False
        self.deadline: float | None = None

    def _context(self, index: int) -> WorkerContext:
        return WorkerContext(index, self.workers, self.run_dir, self.host, self.port)

    def run(self) -> int:
        metrics_dir = self._context(0).metrics_dir
        metrics_dir.mkdir()
        WorkerBoard.create(self._context(0).board_path, self.workers)
        # Read by prometheus_client when a worker imports it: every metric value goes to a file there.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        handled = (signal.SIGTERM, signal.SIGINT)
        previous = {sig: signal.signal(sig, _noop_handler) for sig in handled}
        previous_fd = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        try:
            # Printed at every log level: ServerProcess (tests, benchmarks) reads the address from this line.
            print(
                f"tandem serve: serving {self.config.model.name} ({self.config.runtime.value}) on "
                f"http://{self.host}:{self.port}; starting {self.workers} workers",
                file=sys.stderr,
                flush=True,
            )
            spawn = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited threads or CUDA
            for index in range(self.workers):
                process: BaseProcess = spawn.Process(
                    target=_worker_main,
                    args=(self.config, self._context(index)),
                    name=f"tandem-serve-worker-{index + 1}",
                )
                process.start()
                self.processes.append(process)
                print(
                    f"tandem serve: worker {index + 1}/{self.workers} started (pid {process.pid})",
                    file=sys.stderr,
                    flush=True,
                )
            self._wait(wake_r, metrics_dir)
        finally:
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(wake_r)
            os.close(wake_w)
            for process in self.processes:
                if process.is_alive():
                    process.kill()
                process.join()
        if self.failed:
            log.error("stopped: a worker failed (see above); exiting 1 so that the server restarts whole")
            return 1
        return 0

    def _stop(self, alive: Iterable[BaseProcess]) -> None:
        """Tell every live worker to drain (or, the second time, to stop at once)."""
        if not self.stopping:
            self.stopping = True
            self.deadline = time.monotonic() + self.config.drain_timeout_s + KILL_GRACE_S
        for process in alive:
            if process.pid is not None and process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)

    def _wait(self, wake_r: int, metrics_dir: Path) -> None:
        from prometheus_client import multiprocess

        alive: dict[int, BaseProcess] = {p.sentinel: p for p in self.processes}
        signals_seen = 0
        while alive:
            timeout = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
            ready = multiprocessing.connection.wait([wake_r, *alive], timeout)
            if not ready and self.deadline is not None and time.monotonic() >= self.deadline:
                log.error("%d worker(s) still running after the drain timeout: killing them", len(alive))
                self.failed = True
                for process in alive.values():
                    process.kill()
                self.deadline = None  # their sentinels close next
                continue
            for item in ready:
                if item == wake_r:
                    for sig in _read_signals(wake_r):
                        signals_seen += 1
                        name = signal.Signals(sig).name
                        if signals_seen == 1:
                            log.info("received %s: draining %d worker(s)", name, len(alive))
                        else:
                            log.warning("received %s again: stopping the workers at once", name)
                        self._stop(list(alive.values()))
                    continue
                assert isinstance(item, int)
                process = alive.pop(item)
                process.join()
                if process.pid is not None:
                    multiprocess.mark_process_dead(process.pid, str(metrics_dir))  # type: ignore[no-untyped-call]
                self._exited(process, list(alive.values()))

    def _exited(self, process: BaseProcess, alive: list[BaseProcess]) -> None:
        code = process.exitcode
        told = self.stopping
        clean = told and code in (0, -signal.SIGTERM)  # -SIGTERM: told before its server had started
        if clean:
            log.info("%s (pid %s) exited", process.name, process.pid)
            return
        self.failed = True
        how = f"was killed by {signal.Signals(-code).name}" if code and code < 0 else f"exited with {code}"
        if told:
            log.error("%s (pid %s) %s while draining", process.name, process.pid, how)
            return
        log.error(
            "%s (pid %s) %s; draining the other %d worker(s) and exiting 1 (the server restarts whole)",
            process.name,
            process.pid,
            how,
            len(alive),
        )
        self._stop(alive)


def _read_signals(fd: int) -> bytes:
    try:
        return os.read(fd, 512)
    except BlockingIOError:
        return b""
