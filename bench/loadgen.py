"""An open-loop HTTP load generator spread over several processes (benchmarks and load tests).

    with LoadGenerator(processes=4) as gen:
        result = gen.run("http://127.0.0.1:8080", "/v1/embeddings", bodies, rate=2000, seconds=10)
        print(result.throughput, result.p99_ms)

Open loop: request `i` is due at `start + i / rate` whatever the server does; its latency is counted from that
scheduled time, so a server that falls behind shows its queue in the latency (no coordinated omission).
Request `i` belongs to process `i % processes`; each process runs one event loop (uvloop when installed)
with keep-alive HTTP/1.1 connections written with raw asyncio protocols (one request in flight per
connection, no pipelining), opening a connection when none is idle, up to `max_connections` in all; a due
request that finds every connection busy waits for one (and that wait counts in its latency). The processes
are started once and reused for every `run`, so a rate sweep pays the start-up once.

`static_server` runs a trivial HTTP server that answers every request with a fixed body: the generator's own
ceiling is what it sustains against that (measure it on the machine you benchmark on).

Why not an existing tool: hey (Debian) and wrk are closed loop (each of `-c` workers waits for its reply
before sending again, so a slow server is sent less and its queue never shows: coordinated omission); wrk2 is
not packaged; vegeta is open loop, but it needs a Go toolchain here and counts latency from the actual send,
and the benchmarks want each run's result inside Python (rate sweeps over several variants, one report). So
the generator stays, built on well-kept parts: replies are parsed by httptools (llhttp, uvicorn's own
parser: status, Content-Length and chunked framing, keep-alive), and parent and worker processes talk over a
`multiprocessing` connection (length-framed messages on a dedicated socket pair: nothing a worker prints can
desynchronise them, and the parent waits with a deadline, so a lost worker is an error, never a hang).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import subprocess
import sys
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, Pipe
from types import TracebackType
from typing import cast
from urllib.parse import urlsplit

import httptools

#: Latency percentiles every result reports.
PERCENTILES = (0.5, 0.9, 0.99)


def _use_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def request_bytes(host: str, port: int, method: str, path: str, body: bytes | None) -> bytes:
    """One complete HTTP/1.1 request (keep-alive, JSON body)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (body or b"")


class _Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request outstanding; replies parsed by httptools."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[int] | None = None
        self.open = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        with contextlib.suppress(OSError):
            self.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, data: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"unparsable reply: {exc}"))

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.waiter is None:  # a reply nobody asked for: the connection cannot be trusted any more
            self._fail(ConnectionError("a reply arrived with no request outstanding"))

    def on_message_complete(self) -> None:
        waiter, self.waiter = self.waiter, None
        if not self.parser.should_keep_alive():
            self.open = False
            if self.transport is not None:
                self.transport.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(self.parser.get_status_code())

    def _fail(self, error: Exception) -> None:
        self.open = False
        if self.transport is not None:
            self.transport.close()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"connection lost: {exc}"))


@dataclass
class _Share:
    """What one process sends and measures during one run."""

    host: str
    port: int
    requests: list[bytes]
    rate: float
    total: int
    index: int
    processes: int
    start: float  # time.monotonic() (system-wide on Linux) of request 0's scheduled send
    max_connections: int
    timeout_s: float


@dataclass
class ShareResult:
    latencies: bytes  # array('d') of seconds, ok replies only
    ok: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    failed: int = 0
    late_s: float = 0.0  # how far behind schedule the sender fell at worst (the generator's own limit)
    connections: int = 0
    finished: float = 0.0  # time.monotonic() of the last reply


class _Pool:
    """Keep-alive connections of one process: reuse an idle one, else open one (up to `limit`), else wait."""

    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host, self.port, self.limit = host, port, limit
        self.idle: list[_Connection] = []
        self.opened = 0
        self._returned: asyncio.Queue[None] = asyncio.Queue()  # one token per connection given back

    async def connect(self) -> _Connection:
        _, protocol = await asyncio.get_running_loop().create_connection(_Connection, self.host, self.port)
        return protocol

    async def acquire(self) -> _Connection:
        while True:
            while self.idle:
                conn = self.idle.pop()
                if conn.open:
                    return conn
                self.opened -= 1
            if self.opened < self.limit:
                self.opened += 1
                try:
                    return await self.connect()
                except OSError:
                    self.opened -= 1
                    raise
            await self._returned.get()

    def release(self, conn: _Connection) -> None:
        if conn.open:
            self.idle.append(conn)
        else:
            self.opened -= 1
        self._returned.put_nowait(None)

    async def prepare(self, count: int) -> None:
        for _ in range(min(count, self.limit)):
            with contextlib.suppress(OSError):
                self.idle.append(await self.connect())
                self.opened += 1

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()


async def _run_share(share: _Share) -> ShareResult:
    loop = asyncio.get_running_loop()
    pool = _Pool(share.host, share.port, share.max_connections)
    latencies = array("d")
    result = ShareResult(b"")
    tasks: set[asyncio.Task[None]] = set()

    async def one(data: bytes, scheduled: float) -> None:
        try:
            async with asyncio.timeout(share.timeout_s):
                conn = await pool.acquire()
                try:
                    status = await conn.send(data)
                finally:
                    pool.release(conn)
        except (OSError, TimeoutError, ConnectionError):
            result.failed += 1
            return
        if status == 200:
            latencies.append(time.monotonic() - scheduled)
            result.ok += 1
        else:
            result.statuses[status] = result.statuses.get(status, 0) + 1

    await pool.prepare(8)  # a few connections ready before the clock starts (connecting is not measured)
    await asyncio.sleep(max(0.0, share.start - time.monotonic()))
    interval = 1.0 / share.rate
    for i in range(share.index, share.total, share.processes):
        scheduled = share.start + i * interval
        now = time.monotonic()
        if scheduled > now:
            await asyncio.sleep(scheduled - now)
            now = time.monotonic()
        result.late_s = max(result.late_s, now - scheduled)
        task = loop.create_task(one(share.requests[i % len(share.requests)], scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.gather(*list(tasks))
    result.connections = pool.opened
    result.finished = time.monotonic()
    pool.close()
    result.latencies = latencies.tobytes()
    return result


def _worker(fd: int) -> None:
    """A worker process: runs the shares its parent sends on the connection `fd`, answers on it."""
    _use_uvloop()
    channel = Connection(fd)
    while True:
        try:
            share = channel.recv()
        except EOFError:
            return
        if share is None:
            return
        try:
            channel.send(asyncio.run(_run_share(share)))
        except Exception as exc:  # report, never hang the parent
            channel.send(RuntimeError(f"{type(exc).__name__}: {exc}"))


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]
    channel: Connection


@dataclass
class LoadResult:
    """One run at one rate, merged over the processes."""

    rate: float
    seconds: float
    sent: int
    ok: int
    statuses: dict[int, int]
    failed: int
    latencies_s: list[float]
    max_late_ms: float
    connections: int

    @property
    def errors(self) -> int:
        return self.failed + sum(self.statuses.values())

    @property
    def throughput(self) -> float:
        """Successful replies per second, from the first scheduled send to the last reply."""
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        return 1000 * percentile(self.latencies_s, q)

    @property
    def p50_ms(self) -> float:
        return self.percentile_ms(0.5)

    @property
    def p99_ms(self) -> float:
        return self.percentile_ms(0.99)

    def summary(self) -> str:
        errors = f", errors {self.errors} {dict(sorted(self.statuses.items()))}" if self.errors else ""
        return (
            f"rate {self.rate:>7g}/s: {self.throughput:8.1f}/s ok, p50 {self.p50_ms:7.1f} ms, "
            f"p99 {self.p99_ms:7.1f} ms{errors} (sender late <= {self.max_late_ms:.1f} ms, "
            f"{self.connections} conns)"
        )


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of unsorted values (nan when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class LoadGenerator:
    """`processes` worker processes (started once) that send open-loop load together."""

    def __init__(self, processes: int = 2, *, max_connections: int = 1024, timeout_s: float = 60.0) -> None:
        if processes < 1:
            raise ValueError("processes must be >= 1")
        self.processes = processes
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self._workers: list[_Worker] = []

    def start(self) -> LoadGenerator:
        for _ in range(self.processes):
            ours, theirs = Pipe()
            process = subprocess.Popen(
                [sys.executable, __file__, "worker", str(theirs.fileno())], pass_fds=[theirs.fileno()]
            )
            theirs.close()
            self._workers.append(_Worker(process, ours))
        return self

    def close(self) -> None:
        for worker in self._workers:
            with contextlib.suppress(OSError):
                worker.channel.send(None)
            worker.channel.close()
        for worker in self._workers:
            try:
                worker.process.wait(10)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
        self._workers = []

    def __enter__(self) -> LoadGenerator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def run(
        self,
        url: str,
        path: str,
        bodies: Sequence[bytes | None],
        *,
        rate: float,
        seconds: float,
        method: str = "POST",
    ) -> LoadResult:
        """Send `rate * seconds` requests on schedule (bodies cycled) and wait for every answer."""
        if not self._workers:
            raise RuntimeError("start() first")
        if rate <= 0 or seconds <= 0:
            raise ValueError("rate and seconds must be > 0")
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        requests = [request_bytes(host, port, method, path, body) for body in bodies]
        total = max(1, round(rate * seconds))
        per_process = max(1, self.max_connections // self.processes)
        start = time.monotonic() + 0.3  # every process connects and is waiting by then
        for index, worker in enumerate(self._workers):
            share = _Share(
                host, port, requests, rate, total, index, self.processes, start, per_process, self.timeout_s
            )
            try:
                worker.channel.send(share)
            except OSError:
                raise RuntimeError(f"load generator process {worker.process.pid} died") from None
        shares: list[ShareResult] = []
        # Every request is answered or failed within timeout_s of its schedule: a worker silent past that
        # (and a margin for a loaded machine) is lost, and says so instead of hanging the run.
        deadline = start + seconds + self.timeout_s + 60
        for worker in self._workers:
            pid = worker.process.pid
            try:
                if not worker.channel.poll(max(0.0, deadline - time.monotonic())):
                    raise RuntimeError(f"load generator process {pid} did not answer in time")
                answer = worker.channel.recv()
            except (EOFError, OSError):
                raise RuntimeError(f"load generator process {pid} died") from None
            if isinstance(answer, BaseException):
                raise RuntimeError(f"load generator process failed: {answer}") from answer
            shares.append(answer)
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        for share_result in shares:
            values = array("d")
            values.frombytes(share_result.latencies)
            latencies.extend(values)
            for status, count in share_result.statuses.items():
                statuses[status] = statuses.get(status, 0) + count
        return LoadResult(
            rate=rate,
            seconds=max(total / rate, max(s.finished for s in shares) - start),
            sent=total,
            ok=sum(s.ok for s in shares),
            statuses=statuses,
            failed=sum(s.failed for s in shares),
            latencies_s=latencies,
            max_late_ms=1000 * max(s.late_s for s in shares),
            connections=sum(s.connections for s in shares),
        )


# -- a trivial server: the load generator's own ceiling ----------------------------------------------


class _StaticReply(asyncio.Protocol):
    """Answers every complete request (parsed by httptools) with the same fixed reply."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_complete(self) -> None:
        assert self.transport is not None
        self.transport.write(self.reply)


def static_reply(body: bytes, *, chunked: bool = False) -> bytes:
    """A whole 200 reply with `body`, framed by Content-Length or (`chunked`) as chunks of up to 7 bytes."""
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    if not chunked:
        return head + f"content-length: {len(body)}\r\n\r\n".encode("ascii") + body
    chunks = [body[i : i + 7] for i in range(0, len(body), 7)]
    framed = b"".join(f"{len(c):x}\r\n".encode("ascii") + c + b"\r\n" for c in chunks)
    return head + b"transfer-encoding: chunked\r\n\r\n" + framed + b"0\r\n\r\n"


def _static_server_main(port: int, reply: bytes) -> None:
    _use_uvloop()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _StaticReply(reply), "127.0.0.1", port, reuse_port=True, backlog=4096
        )
        print(server.sockets[0].getsockname()[1], flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


@contextlib.contextmanager
def static_server(
    body: bytes = b'{"ok":true}', *, processes: int = 1, chunked: bool = False, reply: bytes | None = None
) -> Iterator[str]:
    """Run a trivial static-reply HTTP server (`processes` children sharing one loopback port with
    SO_REUSEPORT); yields its URL. Every request gets `static_reply(body, chunked=chunked)`, or the raw
    bytes `reply` if given (e.g. a broken one)."""
    raw = reply if reply is not None else static_reply(body, chunked=chunked)
    children: list[subprocess.Popen[str]] = []
    port = 0
    try:
        for _ in range(processes):
            child = subprocess.Popen(
                [sys.executable, __file__, "static", str(port), raw.hex()],
                stdout=subprocess.PIPE,
                text=True,
            )
            children.append(child)
            assert child.stdout is not None
            line = child.stdout.readline()
            if not line.strip().isdigit():
                raise RuntimeError(f"the static server did not start (exit {child.poll()})")
            port = int(line)
        yield f"http://127.0.0.1:{port}"
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.wait(10)
            if child.stdout is not None:
                child.stdout.close()


if __name__ == "__main__":
    # Run the functions of the imported module (not of `__main__`), so pickled results name classes the
    # parent can load.
    import loadgen  # this file, under its module name (bench/ is sys.path[0])

    if sys.argv[1:2] == ["worker"]:
        loadgen._worker(int(sys.argv[2]))
    elif sys.argv[1:2] == ["static"]:
        loadgen._static_server_main(int(sys.argv[2]), bytes.fromhex(sys.argv[3]))
    else:
        sys.exit("usage: python bench/loadgen.py worker FD | static PORT REPLY_HEX")
