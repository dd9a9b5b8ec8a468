"""Connection guards uvicorn lacks: a header-read timeout, a bound on open connections, and a drain that
closes idle kept-alive connections without losing a request.

uvicorn (0.54) arms no timer until a connection's first response is sent, so a client that opens a
connection and sends nothing, or half of its headers, holds it (and a file descriptor) forever; its
`limit_concurrency` counts connections but answers 503 only once a request's headers arrive, and also to
existing connections' requests; and its shutdown closes idle kept-alive connections at once, so a client
that sent its next request in that instant loses it (often to a reset, the kernel's answer to data arriving
at a closed socket). `GuardedHttpProtocol` is uvicorn's own httptools protocol with those three things
changed, and a fourth thing: it cancels the task answering a request whose client left
(`CANCEL_ON_DISCONNECT`), which ASGI otherwise tells only to a `receive` awaited for the purpose. uvicorn is
pinned to a minor version (pyproject.toml), and tests/serve checks each by behaviour.
Why not another server: hypercorn and granian have header timeouts but not the raw-ASGI speed or the drain
we rely on; the change here is small and local.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

log = logging.getLogger("tandem.serve")

#: During a drain, an idle kept-alive connection is closed once it has been idle this long: a client that
#: uses it in a loop sends its next request first (and gets 503 with `Connection: close`, a clean end), so
#: only connections idle in a client's pool are closed from the server's side.
DRAIN_IDLE_S: Final = 0.5
#: After the server's FIN, how long a closing connection is read (and what arrives discarded) waiting for
#: the client's own close; then it is closed. Reading until the client closes is what avoids a reset.
CLOSE_LINGER_S: Final = 1.0
#: A header timer that fires this close to its deadline counts it as reached (timers fire to the millisecond).
HEADER_TIMER_SLACK_S: Final = 0.002
#: The scope key (`True`) by which this protocol tells the app that a request's whole body has arrived.
BODY_COMPLETE: Final = "tandem.body_complete"
#: Scope key this protocol sets (to None) on every request: the app may put the task answering the request
#: there while a client that leaves should stop it; when the connection is lost before the response is
#: complete the protocol sets `DISCONNECTED` in the scope and cancels that task. This replaces a task per
#: request awaiting ASGI `receive` for the disconnect (the only way ASGI tells it): no task, no wake-up.
CANCEL_ON_DISCONNECT: Final = "tandem.cancel_on_disconnect"
#: Scope key (`True`) set by this protocol when it cancelled the request's task because its client left.
DISCONNECTED: Final = "tandem.disconnected"
#: Upper bound of the connection-closing phase of a drain (idle wait + linger + uvicorn's own poll).
CLOSE_BUDGET_S: Final = DRAIN_IDLE_S + CLOSE_LINGER_S + 0.5


def _plain_response(status: bytes, message: str, *extra: bytes) -> bytes:
    body = ('{"error": "' + message + '"}').encode()
    head = [
        b"HTTP/1.1 " + status,
        b"content-type: application/json",
        b"content-length: " + str(len(body)).encode(),
        b"connection: close",
        *extra,
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


HEADER_TIMEOUT_RESPONSE: Final = _plain_response(
    b"408 Request Timeout",
    "the request headers did not arrive in time (--header-timeout-s); send them promptly",
)
TOO_MANY_CONNECTIONS_RESPONSE: Final = _plain_response(
    b"503 Service Unavailable",
    "too many open connections to this server process (--max-connections); reuse a connection or retry",
    b"retry-after: 1",
)


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float
    """Longest time from a connection's opening, or a request's first byte, to the end of its headers."""
    max_connections: int
    """Most open connections of this process; more are answered 503 and closed at once."""


class _HeldHead:
    """Stands in for the transport while uvicorn writes a response's head: keeps the bytes."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data: bytes | None = None

    def write(self, data: bytes) -> None:
        self.data = data


class _HeadFirst:
    """Stands in for the transport while uvicorn writes the body after a held head: one write of both."""

    __slots__ = ("head", "transport")

    def __init__(self, transport: asyncio.Transport, head: bytes) -> None:
        self.transport = transport
        self.head = head

    def write(self, data: bytes) -> None:
        self.transport.write(self.head + data)

    def close(self) -> None:
        self.transport.close()


class OneWriteCycle(RequestResponseCycle):
    """uvicorn's request cycle, but a response whose length is known (a `content-length` header) leaves in
    one transport write with its first body part: uvicorn writes the head when the app sends
    `http.response.start` and the body at `http.response.body`, two send(2) calls per answer where one does
    (the two writes were ~10% of the event loop's time for small embeddings answers). Headers, checks and
    bytes on the wire are uvicorn's own: its `send` runs unchanged, writing into a stand-in transport. A
    streamed answer (no content-length) is written as uvicorn writes it, head first.

    `GuardedHttpProtocol` gives each request's cycle this class (uvicorn makes the cycle by the name in its
    module, with no factory to pass, so the protocol re-classes it before the request's task first runs)."""

    _head: bytes | None = None

    async def send(self, message: ASGISendEvent) -> None:
        if message["type"] == "http.response.start" and self._holds_head(message):
            transport, held = self.transport, _HeldHead()
            self.transport = held  # type: ignore[assignment]
            try:
                await super().send(message)
            finally:
                self.transport = transport
            self._head = held.data
            return
        head = self._head
        if head is not None and message["type"] == "http.response.body":
            self._head = None
            transport = self.transport
            self.transport = _HeadFirst(transport, head)  # type: ignore[assignment]
            try:
                await super().send(message)
            finally:
                self.transport = transport
            return
        await super().send(message)

    def _holds_head(self, start: ASGISendEvent) -> bool:
        """The head of this answer waits for its body: its length is known and a body write follows (for
        HEAD uvicorn writes no body, so the head goes at once)."""
        if self.response_started or self.scope["method"] == "HEAD":
            return False
        headers: Iterable[tuple[bytes, bytes]] = start.get("headers", ())  # type: ignore[assignment]
        return any(name.lower() == b"content-length" for name, _ in headers)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header timeout, a connection bound and a clean idle close.

    Made per server by `protocol_for`, which sets `limits`."""

    limits: ClassVar[ConnectionLimits]
    refused: ClassVar[int] = 0
    """Connections refused over the bound (this process, since start)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_deadline: float | None = None
        """When the headers being read must be complete (loop time); None while none are due."""
        self._idle_close: asyncio.TimerHandle | None = None
        self._over_limit = False
        self._reading_headers = False
        self._draining = False
        self._closing = False
        self._idle_since = time.monotonic()

    # -- the bound on open connections --------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            # Refused before it counts or parses anything; the connections already open are unaffected.
            self._over_limit = True
            type(self).refused += 1
            if type(self).refused in (1, 10, 100) or type(self).refused % 1000 == 0:
                log.warning(
                    "%d connection(s) refused so far: over --max-connections %d",
                    type(self).refused,
                    self.limits.max_connections,
                )
            transport.write(TOO_MANY_CONNECTIONS_RESPONSE)
            transport.close()
            return
        super().connection_made(transport)
        self._idle_since = time.monotonic()
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._over_limit:
            return
        self._cancel_timers()
        super().connection_lost(exc)
        cycle = self.cycle
        if cycle is not None and cycle.disconnected:  # gone before its response was complete
            scope: dict[str, Any] = cycle.scope  # type: ignore[assignment]
            task = scope.get(CANCEL_ON_DISCONNECT)
            if task is not None:
                scope[CANCEL_ON_DISCONNECT] = None
                scope[DISCONNECTED] = True
                task.cancel()

    # -- the header timeout ---------------------------------------------------------------------------

    # The timer is lazy: a request's headers set a deadline and their end clears it, while the one timer of
    # the connection stays armed and, when it fires, re-arms itself for a later deadline or does nothing.
    # Arming and cancelling a timer per request was ~2% of the event loop's time at saturation.

    def _arm_header_timer(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.time() + self.limits.header_timeout_s
        if self._header_timer is None:
            self._header_timer = self.loop.call_at(self._header_deadline, self._header_check)

    def _disarm_header_timer(self) -> None:
        self._header_deadline = None  # the timer, if armed, finds no deadline when it fires

    def _header_check(self) -> None:
        self._header_timer = None
        deadline = self._header_deadline
        if deadline is None:
            return
        if deadline - self.loop.time() > HEADER_TIMER_SLACK_S:  # a later request's deadline
            self._header_timer = self.loop.call_at(deadline, self._header_check)
            return
        self._header_deadline = None
        self._header_timeout()

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._idle_close):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._idle_close = None
        self._header_deadline = None

    def _header_timeout(self) -> None:
        if self.transport.is_closing() or self._closing:
            return
        if self._reading_headers:  # half a request: say why, then close
            self.transport.write(HEADER_TIMEOUT_RESPONSE)
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            log.info("discarded %d byte(s) that arrived after this connection was closed", len(data))
            return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_headers = True
        self._arm_header_timer()  # from the request's first byte (or still from the connection's opening)
        if self._idle_close is not None:  # a request came after all: answered, then the connection closes
            self._idle_close.cancel()
            self._idle_close = None

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        self._disarm_header_timer()
        self.scope[CANCEL_ON_DISCONNECT] = None  # type: ignore[typeddict-unknown-key]  # offered to the app
        super().on_headers_complete()
        if self.cycle is not None and type(self.cycle) is RequestResponseCycle:
            self.cycle.__class__ = OneWriteCycle  # before its task first runs (see OneWriteCycle)
        if self._draining and self.cycle is not None:
            self.cycle.keep_alive = False

    def on_message_complete(self) -> None:
        super().on_message_complete()
        cycle = self.cycle
        if cycle is not None and not cycle.more_body:
            # The whole body is here: the app's first `receive` returns it at once (http.read_body then
            # arms no body timeout).
            cycle.scope[BODY_COMPLETE] = True  # type: ignore[typeddict-unknown-key]

    def on_response_complete(self) -> None:
        self._idle_since = time.monotonic()
        super().on_response_complete()
        if self._draining and not self.transport.is_closing():
            self._schedule_idle_close()

    # -- the drain ------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """uvicorn's drain: a request in progress closes its connection after its response; an idle
        connection is closed (cleanly: FIN, then read until the client closes) once idle `DRAIN_IDLE_S`."""
        self._draining = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
        elif not self._reading_headers:
            self._schedule_idle_close()
        # else: half-received headers finish (the header timeout bounds them) and are answered with close

    def _schedule_idle_close(self) -> None:
        if self._idle_close is None:
            delay = max(0.0, self._idle_since + DRAIN_IDLE_S - time.monotonic())
            self._idle_close = self.loop.call_later(delay, self._close_idle)

    def _close_idle(self) -> None:
        self._idle_close = None
        busy = self._reading_headers or (self.cycle is not None and not self.cycle.response_complete)
        if busy or self.transport.is_closing():
            return
        self._closing = True
        self._cancel_timers()
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._idle_close = self.loop.call_later(CLOSE_LINGER_S, self.transport.close)
        else:
            self.transport.close()


def protocol_for(limits: ConnectionLimits) -> type[GuardedHttpProtocol]:
    """The protocol class to give uvicorn (`Config(http=...)`) for these limits."""
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {"limits": limits, "refused": 0})
