"""Slow, idle and surplus connections, and a drain under keep-alive load, against real `tandem serve`
processes (the `noop` runtime: the server's own transport, no model time) over real sockets."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field

import httpx
from serverprocess import ServerProcess

NOOP = ["--runtime", "noop", "--model-uri", ".", "--model-name", "noop"]
BODY = b'{"input": "a whole request"}'


def address(server: ServerProcess) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def request_head(content_length: int = len(BODY)) -> bytes:
    return (
        "POST /v1/embeddings HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
        f"content-length: {content_length}\r\n\r\n"
    ).encode()


async def read_response(reader: asyncio.StreamReader) -> bytes:
    """One whole response (head and Content-Length body) from a kept-alive connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await reader.readexactly(length)


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (a reset raises)."""
    return await reader.read()


def test_200_connections_with_half_or_no_headers_are_closed_and_others_unaffected() -> None:
    header_timeout_s = 3.0

    async def scenario(server: ServerProcess) -> tuple[list[bytes], list[bytes], list[float], float]:
        host, port = address(server)
        silent = [await asyncio.open_connection(host, port) for _ in range(100)]
        half = [await asyncio.open_connection(host, port) for _ in range(100)]
        opened = time.monotonic()
        for _, writer in half:
            writer.write(b"POST /v1/embeddings HTTP/1.1\r\nhost: test\r\ncontent-")  # and never the rest
            await writer.drain()
        others = []
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            for i in range(20):
                started = time.monotonic()
                response = await client.post("/v1/embeddings", json={"input": f"whole request {i}"})
                assert response.status_code == 200, response.text
                others.append(time.monotonic() - started)
        async with asyncio.timeout(120):  # generous: the server closes them after 3 s
            silent_ends = [await read_until_closed(reader) for reader, _ in silent]
            half_ends = [await read_until_closed(reader) for reader, _ in half]
        closed_after = time.monotonic() - opened
        for _, writer in silent + half:
            writer.close()
        return silent_ends, half_ends, others, closed_after

    with ServerProcess([*NOOP, "--header-timeout-s", str(header_timeout_s)]) as server:
        silent_ends, half_ends, others, closed_after = asyncio.run(scenario(server))
        assert server.is_ready()
    assert silent_ends == [b""] * 100  # nothing sent: closed without an answer
    assert all(end.startswith(b"HTTP/1.1 408 ") for end in half_ends), {e[:40] for e in half_ends}
    assert b"--header-timeout-s" in half_ends[0]
    # Not before the timeout (the 100 silent ones opened before the clock started).
    assert closed_after >= header_timeout_s * 0.9
    assert max(others) < 5.0  # generous: whole requests never waited for the held connections


def test_a_later_requests_half_headers_get_their_own_full_header_timeout() -> None:
    """On a kept-alive connection the header deadline counts from each request's first byte: the timer
    armed for an earlier request (which the server keeps armed rather than cancelling per request) neither
    cuts the later one short nor lets it hang."""
    header_timeout_s = 2.0

    async def scenario(server: ServerProcess) -> tuple[bytes, bytes, float]:
        host, port = address(server)
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(request_head() + BODY)
        await writer.drain()
        first = await read_response(reader)
        await asyncio.sleep(header_timeout_s * 0.75)  # the scenario: the first deadline passes meanwhile
        writer.write(b"POST /v1/embeddings HTTP/1.1\r\nhost: test\r\ncontent-")  # and never the rest
        await writer.drain()
        began = time.monotonic()
        async with asyncio.timeout(60):  # generous: the server closes it after 2 s
            end = await read_until_closed(reader)
        waited = time.monotonic() - began
        writer.close()
        return first, end, waited

    with ServerProcess([*NOOP, "--header-timeout-s", str(header_timeout_s)]) as server:
        first, end, waited = asyncio.run(scenario(server))
    assert first.startswith(b"HTTP/1.1 200 ")
    assert end.startswith(b"HTTP/1.1 408 "), end[:60]
    assert waited >= header_timeout_s * 0.9


def test_connections_beyond_the_bound_get_503_at_once_and_the_open_ones_carry_on() -> None:
    bound = 20

    async def scenario(server: ServerProcess) -> tuple[list[bytes], list[bytes]]:
        host, port = address(server)
        # `bound` connections in the middle of a request: headers sent, half of the body.
        held = [await asyncio.open_connection(host, port) for _ in range(bound)]
        for _, writer in held:
            writer.write(request_head() + BODY[:10])
            await writer.drain()
        surplus = [await asyncio.open_connection(host, port) for _ in range(10)]
        async with asyncio.timeout(30):  # answered at once, not after some timeout
            refused = [await read_until_closed(reader) for reader, _ in surplus]
        for _, writer in held:
            writer.write(BODY[10:])
            await writer.drain()
        async with asyncio.timeout(60):
            answers = [await read_response(reader) for reader, _ in held]  # their responses, kept alive
        for _, writer in held + surplus:
            writer.close()
        return refused, answers

    args = [*NOOP, "--max-connections", str(bound), "--body-timeout-s", "120"]
    with ServerProcess(args) as server:
        refused, answers = asyncio.run(scenario(server))
        assert server.is_ready()  # the held connections are gone: new ones are welcome again
    assert all(r.startswith(b"HTTP/1.1 503 ") for r in refused), {r[:40] for r in refused}
    assert all(b"retry-after: 1" in r and b"--max-connections" in r for r in refused)
    assert all(a.startswith(b"HTTP/1.1 200 ") for a in answers), {a[:40] for a in answers}


@dataclass
class Outcomes:
    ok: int = 0
    draining: int = 0
    """503 during the drain, each with `Connection: close`."""
    refused: int = 0
    """Connection refused once the listener closed: nothing was sent."""
    failures: list[str] = field(default_factory=list)
    """Anything else: a reset, or a request sent and never answered."""


async def keep_alive_client(url: str, index: int, think_s: float, outcomes: Outcomes) -> None:
    """One kept-alive connection, used in a loop with a pause, through 503s (each closes the connection;
    the client honours Retry-After, then opens another), until the listener closes (refused: nothing was
    sent). Without Retry-After, a client reconnecting in the very instant the listener closes can be reset
    by the kernel (its connection was queued, never accepted): no server can answer that one."""
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=1)) as ac:
        while True:
            try:
                response = await ac.post("/v1/embeddings", json={"input": f"client {index}"})
            except httpx.ConnectError:
                outcomes.refused += 1
                return
            except httpx.HTTPError as exc:
                outcomes.failures.append(f"{type(exc).__name__}: {exc}")
                return
            if response.status_code == 200:
                assert len(response.json()["data"][0]["embedding"]) > 0
                outcomes.ok += 1
            elif response.status_code == 503 and response.headers.get("connection") == "close":
                outcomes.draining += 1
                await asyncio.sleep(float(response.headers["retry-after"]))
            else:
                outcomes.failures.append(f"{response.status_code} {response.headers} {response.text}")
                return
            await asyncio.sleep(think_s)


async def idle_holder(host: str, port: int) -> bytes:
    """A connection kept alive after one request and left idle: the drain must close it cleanly."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request_head() + BODY)
    await writer.drain()
    first = await read_response(reader)
    assert first.startswith(b"HTTP/1.1 200 ")
    try:
        return await reader.read()  # EOF when the server closes; a reset raises
    finally:
        writer.close()


def test_a_drain_under_keep_alive_load_resets_nothing_and_exits_in_time() -> None:
    drain_timeout_s = 5.0
    outcomes = Outcomes()

    async def scenario(server: ServerProcess) -> tuple[list[bytes], float]:
        host, port = address(server)
        idle = [asyncio.create_task(idle_holder(host, port)) for _ in range(16)]
        clients = [
            asyncio.create_task(keep_alive_client(server.url, i, (i % 16) * 0.005, outcomes))
            for i in range(64)
        ]
        deadline = time.monotonic() + 60
        while outcomes.ok < 200:  # the load is on
            assert time.monotonic() < deadline, "the load never got going"
            await asyncio.sleep(0.05)
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        exited = asyncio.get_running_loop().run_in_executor(None, server.wait, 120.0)
        code = await exited
        took = time.monotonic() - signalled
        assert code == 0, server.log()
        async with asyncio.timeout(60):
            await asyncio.gather(*clients)
            ends = await asyncio.gather(*idle)
        return ends, took

    args = [*NOOP, "--max-queue-delay-ms", "20", "--max-batch-size", "8"]
    args += ["--drain-timeout-s", str(drain_timeout_s)]
    server = ServerProcess(args).start()
    try:
        ends, took = asyncio.run(scenario(server))
    finally:
        server.stop(signal.SIGKILL)
    assert outcomes.failures == [], outcomes.failures
    assert ends == [b""] * 16  # the idle connections were closed with a clean EOF
    assert outcomes.refused == 64  # every client went on until the listener closed
    # Within the drain timeout plus the idle-close budget (about 2 s), with room for a loaded machine.
    assert took < drain_timeout_s + 2.0 + 5.0, took
    assert "timeout graceful shutdown exceeded" not in server.log()
