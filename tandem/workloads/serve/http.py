"""HTTP transport: the Starlette app, the error table, body limits, disconnects and request metrics.

Inference (POST) routes are served on raw ASGI by `_Endpoints._infer` (the hot path); the other routes through
Starlette by `_Endpoints._respond`. Both turn domain errors into status codes with one table (`HTTP_STATUS`)
and record the request-duration histogram; inference also counts the request in flight and cancels it when
the client disconnects, so its items are dropped before compute (or its generation stops): under
`GuardedHttpProtocol` (`tandem serve`) the protocol cancels the request's task when its connection is lost
(no task per request); under any other ASGI server a small task per request awaits the disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

import orjson
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tandem.api.serving import HttpSettings, Runtime
from tandem.workloads.serve.connections import BODY_COMPLETE, CANCEL_ON_DISCONNECT, DISCONNECTED
from tandem.workloads.serve.dataplane import DataPlane, State
from tandem.workloads.serve.errors import (
    BodyTimeout,
    ClientDisconnected,
    Draining,
    InvalidInput,
    MethodNotAllowed,
    ModelError,
    ModelNotFound,
    PayloadTooLarge,
    QueueFull,
    RequestTimeout,
    RouteNotFound,
    ServeError,
    Unavailable,
)
from tandem.workloads.serve.metrics import CONTENT_TYPE
from tandem.workloads.serve.protocols import chat, oip, openai
from tandem.workloads.serve.protocols.common import BinaryAnswer

log = logging.getLogger("tandem.serve")

#: The one table from domain errors to HTTP status codes (most specific class wins).
HTTP_STATUS: Final[Mapping[type[ServeError], int]] = {
    InvalidInput: 400,
    ModelNotFound: 404,
    RouteNotFound: 404,
    MethodNotAllowed: 405,
    BodyTimeout: 408,
    PayloadTooLarge: 413,
    QueueFull: 429,
    ClientDisconnected: 499,  # nginx's code for "client closed request"; never reaches the client
    ModelError: 500,
    Unavailable: 503,
    RequestTimeout: 504,
}

Family = Literal["openai", "oip", "plain"]
Handler = Callable[[Request], Awaitable[Response | dict[str, Any]]]
#: An inference route's handler: (path parameters, body, the ASGI scope) -> the answer. The scope, not a
#: `Headers` object: only the OIP route reads a header, and building one per request cost ~1% of the loop.
InferenceHandler = Callable[
    [dict[str, str], bytes, Scope], Awaitable["dict[str, Any] | EventStream | BinaryAnswer"]
]
#: The `route` label of requests that matched no endpoint (404) or not with their method (405): one label,
#: so probing clients cannot grow the metrics without bound.
UNMATCHED_ROUTE: Final = "(unmatched)"
T = TypeVar("T")


def status_for(error: ServeError) -> int:
    for cls in type(error).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500


def error_parts(error: ServeError, family: Family) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Status code, extra headers and JSON body of an error answer (the one place for both transports)."""
    status = status_for(error)
    headers: dict[str, str] = {}
    if isinstance(error, QueueFull):
        headers["Retry-After"] = str(error.retry_after_s)
    elif isinstance(error, MethodNotAllowed):
        headers["Allow"] = ", ".join(error.allowed)
    elif isinstance(error, BodyTimeout):
        headers["Connection"] = "close"  # the rest of a half-sent body must not be read as a request
    elif isinstance(error, Unavailable):
        headers["Retry-After"] = str(error.retry_after_s)
        if isinstance(error, Draining):
            headers["Connection"] = "close"  # let the client reconnect, through the Service, elsewhere
    body: dict[str, Any]
    if family == "openai":
        body = {
            "error": {
                "message": error.message,
                "type": type(error).__name__,
                "param": error.field if isinstance(error, InvalidInput) else None,
                "code": status,
            }
        }
    else:
        body = {"error": error.message}
    return status, headers, body


def error_response(error: ServeError, family: Family) -> JSONResponse:
    status, headers, body = error_parts(error, family)
    return JSONResponse(body, status_code=status, headers=headers)


def dump_json(content: Any) -> bytes:
    """Compact UTF-8 JSON, as Starlette's JSONResponse writes it, with orjson: about 20x faster than the
    stdlib for a 384-float embedding (7 us vs 170 us, on the event loop of every request). numpy arrays are
    written directly (float32 as the shortest text that reads back to the same float32). orjson writes NaN
    as null, so the runtimes refuse non-finite outputs before they get here."""
    return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


#: Longest wait for the next part of a request body (like nginx's client_body_timeout): a client that sends
#: half a request gets 408 and its connection closes instead of holding it, and a request slot, forever.
BODY_TIMEOUT_S: Final = HttpSettings().body_timeout_s


@dataclass(frozen=True)
class HttpLimits:
    max_request_bytes: int = HttpSettings().max_request_bytes
    """Largest request body accepted (413 beyond)."""
    body_timeout_s: float = BODY_TIMEOUT_S
    """Longest wait for the next part of a request body (408 after)."""
    header_timeout_s: float = HttpSettings().header_timeout_s
    """Longest wait for a request's headers (the connection closes after; see serve/connections.py)."""
    max_connections: int = HttpSettings().max_connections
    """Most open connections of the process (503 and closed beyond)."""


async def read_body(scope: Scope, receive: Receive, limit: int, timeout_s: float = BODY_TIMEOUT_S) -> bytes:
    """The request body (413 beyond `limit` bytes, by Content-Length or as it arrives; 408 when no part of
    it arrives for `timeout_s`)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > limit:
                raise PayloadTooLarge(
                    f"the body has {value.decode()} bytes; the limit is {limit} (--max-request-bytes)"
                )
            break
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            if scope.get(BODY_COMPLETE):  # nothing left to wait for: no timer (one less per request)
                message = await receive()
            else:
                async with asyncio.timeout(timeout_s):
                    message = await receive()
        except TimeoutError:
            raise BodyTimeout(
                f"no part of the request body arrived for {timeout_s:g} s ({size} bytes read); send the "
                "whole body promptly"
            ) from None
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("the client disconnected while sending the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over the {limit}-byte limit (--max-request-bytes)")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class DisconnectWatch:
    """While active, cancels the current task when the client disconnects (ASGI tells that only through
    `receive`, once the body has been read). One small task per request; the work itself runs inline, so a
    disconnect cancels it where it waits (e.g. in the batch queue, whose items are then dropped)."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task = asyncio.current_task()
        self._active = True
        self.disconnected = False
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.disconnected = True
        if self._active and self._task is not None:
            self._task.cancel()

    def stop(self) -> None:
        self._active = False
        self._watcher.cancel()

    def __enter__(self) -> DisconnectWatch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.stop()


async def until_disconnect(scope: Scope, receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise `ClientDisconnected`.

    Under `GuardedHttpProtocol` the protocol cancels the task itself when the connection is lost (the scope
    offers `CANCEL_ON_DISCONNECT`): no watcher task, so a request costs the event loop no extra task and
    wake-up. Elsewhere a `DisconnectWatch` task awaits the disconnect on `receive`."""
    if CANCEL_ON_DISCONNECT in scope:
        task = asyncio.current_task()
        slots: dict[str, Any] = scope  # type: ignore[assignment]
        slots[CANCEL_ON_DISCONNECT] = task
        try:
            return await work
        except asyncio.CancelledError:
            if slots.get(DISCONNECTED) and task is not None:
                task.uncancel()
                raise ClientDisconnected("the client disconnected") from None
            raise
        finally:
            slots[CANCEL_ON_DISCONNECT] = None
    watch = DisconnectWatch(receive)
    try:
        return await work
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if watch.disconnected and task is not None:
            task.uncancel()
            raise ClientDisconnected("the client disconnected") from None
        raise
    finally:
        watch.stop()


@dataclass(frozen=True)
class EventStream:
    """A streamed answer: server-sent events (each chunk is one or more complete `data: ...` events)."""

    chunks: AsyncIterator[bytes]
    close: Callable[[], None] = lambda: None
    """Called when the stream ends, however it ends (e.g. stop generating for a client that left)."""


JSON_TYPE: Final = (b"content-type", b"application/json")
#: Response header naming the worker process (its pid) that answered, with `--workers` > 1.
WORKER_HEADER: Final = "x-tandem-worker"
SSE_HEADERS: Final = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # proxies must not buffer the stream
]


@dataclass(frozen=True)
class _Post:
    """An inference route handled on raw ASGI (the hot path, no framework in between)."""

    template: str
    pattern: re.Pattern[str] | None
    family: Family
    handler: InferenceHandler


class _Endpoints:
    """The handlers. `_respond` (GET, through Starlette) and `_infer` (POST inference, raw ASGI) are the two
    places that apply the error table and record the request metrics."""

    def __init__(self, plane: DataPlane, limits: HttpLimits, worker: str | None = None) -> None:
        self.plane = plane
        self.limits = limits
        self.metrics = plane.metrics
        self.worker = worker
        # With --workers N every answer names the process that made it (x-tandem-worker: its pid).
        self.extra_headers: list[tuple[bytes, bytes]] = (
            [] if worker is None else [(WORKER_HEADER.encode(), worker.encode())]
        )
        self.ok_headers = [JSON_TYPE, *self.extra_headers]

    async def _respond(self, request: Request, route: str, family: Family, handler: Handler) -> Response:
        started = time.perf_counter()
        try:
            result = await handler(request)
            response = result if isinstance(result, Response) else JSONResponse(result)
        except ServeError as exc:
            response = error_response(exc, family)
        except Exception:
            log.exception("%s %s failed", request.method, route)
            response = error_response(ModelError("internal server error; see the server log"), family)
        if self.worker is not None:
            response.headers[WORKER_HEADER] = self.worker
        if self.plane.state is State.DRAINING:
            response.headers["Connection"] = "close"
        self.metrics.observe_request(route, response.status_code, time.perf_counter() - started)
        return response

    async def _infer(
        self, post: _Post, params: dict[str, str], scope: Scope, receive: Receive, send: Send
    ) -> None:
        started = time.perf_counter()
        stream: EventStream | None = None
        try:
            # The body is read first: afterwards the only message left is the disconnect.
            body = await read_body(scope, receive, self.limits.max_request_bytes, self.limits.body_timeout_s)
            self.plane.enter()
            try:
                result = await until_disconnect(scope, receive, post.handler(params, body, scope))
                if isinstance(result, BinaryAnswer):
                    payload = result.body
                    status = 200
                    headers = [
                        *self.extra_headers,
                        *((k.lower().encode(), v.encode()) for k, v in result.headers),
                    ]
                elif isinstance(result, EventStream):
                    stream = result
                    try:
                        await until_disconnect(scope, receive, self._stream(send, stream))
                    finally:
                        stream.close()
                    status = 200
                else:
                    payload = dump_json(result)
                    status, headers = 200, self.ok_headers.copy()
            finally:
                self.plane.leave()
        except ServeError as exc:
            status, extra, error = error_parts(exc, post.family)
            payload = dump_json(error)
            headers = [
                *self.ok_headers,
                *((k.lower().encode(), v.encode()) for k, v in extra.items()),
            ]
            if status >= 500 and not isinstance(exc, Unavailable):
                log.warning("POST %s: %s", post.template, exc.message)
        except Exception:
            log.exception("POST %s failed", post.template)
            status, _, error = error_parts(
                ModelError("internal server error; see the server log"), post.family
            )
            payload, headers = dump_json(error), self.ok_headers.copy()
        if stream is None:
            headers.append((b"content-length", str(len(payload)).encode()))
            if self.plane.state is State.DRAINING and (b"connection", b"close") not in headers:
                headers.append((b"connection", b"close"))  # no next request on a connection that closes
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": payload})
        self.metrics.observe_request(post.template, status, time.perf_counter() - started)

    async def _stream(self, send: Send, stream: EventStream) -> None:
        headers = [*SSE_HEADERS, *self.extra_headers]
        if self.plane.state is State.DRAINING:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        async for chunk in stream.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    def get(self, path: str, handler: Handler, family: Family = "plain") -> Route:
        async def endpoint(request: Request) -> Response:
            return await self._respond(request, path, family, handler)

        return Route(path, endpoint, methods=["GET"])

    def post(self, path: str, handler: InferenceHandler, family: Family) -> _Post:
        pattern = None
        if "{" in path:
            pattern = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$")
        return _Post(path, pattern, family, handler)

    # -- handlers ---------------------------------------------------------------------------------

    async def live(self, request: Request) -> dict[str, Any]:
        return {"live": True}

    async def ready(self, request: Request) -> Response:
        """200 when the whole server is ready: with --workers, every worker has loaded, warmed up and is not
        draining (whichever worker answers the probe)."""
        plane = self.plane
        ready = plane.server_ready
        body: dict[str, Any] = {"ready": ready, "state": plane.state.value}
        if plane.peers is not None:
            body["workers"] = {"ready": plane.peers.ready_count(), "total": plane.peers.workers}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def model_ready(self, request: Request) -> Response:
        oip.check_model(self.plane, request.path_params["name"], request.path_params.get("version"))
        return await self.ready(request)

    async def model_metadata(self, request: Request) -> dict[str, Any]:
        oip.check_model(self.plane, request.path_params["name"], request.path_params.get("version"))
        return oip.model_metadata(self.plane)

    async def server_metadata(self, request: Request) -> dict[str, Any]:
        return oip.server_metadata()

    async def infer(self, params: dict[str, str], body: bytes, scope: Scope) -> dict[str, Any] | BinaryAnswer:
        return await oip.infer(
            self.plane,
            params["name"],
            body,
            params.get("version"),
            header_length=Headers(scope=scope).get(oip.HEADER_LENGTH),
        )

    async def models(self, request: Request) -> dict[str, Any]:
        return openai.models(self.plane)

    async def model(self, request: Request) -> dict[str, Any]:
        return openai.model(self.plane, request.path_params["model"])

    async def embeddings(self, params: dict[str, str], body: bytes, scope: Scope) -> dict[str, Any]:
        return await openai.embeddings(self.plane, body)

    async def completions(
        self, params: dict[str, str], body: bytes, scope: Scope
    ) -> dict[str, Any] | EventStream:
        return await openai.completions(self.plane, body)

    async def chat_completions(
        self, params: dict[str, str], body: bytes, scope: Scope
    ) -> dict[str, Any] | EventStream:
        return await chat.chat_completions(self.plane, body)

    async def unmatched(self, request: Request, exc: Exception) -> Response:
        """Starlette's 404 and 405 as the family's JSON error object, counted in the request metrics."""
        started = time.perf_counter()
        path = request.url.path
        family: Family = "openai" if path.startswith("/v1/") else "oip"
        error: ServeError
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        if status == 405:
            allowed = (exc.headers or {}).get("Allow", "GET") if isinstance(exc, HTTPException) else "GET"
            error = MethodNotAllowed(
                f"{request.method} {path}: this path takes {allowed}",
                tuple(m.strip() for m in allowed.split(",")),
            )
        else:
            error = RouteNotFound(f"{request.method} {path}: no such endpoint on this server; {self._hint()}")
        response = error_response(error, family)
        if self.worker is not None:
            response.headers[WORKER_HEADER] = self.worker
        self.metrics.observe_request(UNMATCHED_ROUTE, response.status_code, time.perf_counter() - started)
        return response

    def _hint(self) -> str:
        runtime = self.plane.model.runtime
        inference = {
            Runtime.TORCHSCRIPT: "POST /v2/models/{name}/infer",
            Runtime.EMBEDDINGS: "POST /v1/embeddings or /v2/models/{name}/infer",
            Runtime.NOOP: "POST /v1/embeddings",
            Runtime.CAUSAL_LM: "POST /v1/completions or /v1/chat/completions",
        }[runtime]
        return f"the {runtime} runtime serves {inference} (see docs/serving.md)"

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    def routes(self) -> tuple[list[Route], list[_Post]]:
        model = "/v2/models/{name}"
        version = "/v2/models/{name}/versions/{version}"
        routes = [
            self.get("/v2", self.server_metadata, "oip"),
            self.get("/v2/health/live", self.live, "oip"),
            self.get("/v2/health/ready", self.ready, "oip"),
            self.get(model, self.model_metadata, "oip"),
            self.get(version, self.model_metadata, "oip"),
            self.get(f"{model}/ready", self.model_ready, "oip"),
            self.get(f"{version}/ready", self.model_ready, "oip"),
            self.get("/v1/models", self.models, "openai"),
            self.get("/v1/models/{model:path}", self.model, "openai"),
            self.get("/metrics", self.prometheus),
        ]
        posts: list[_Post] = []
        runtime = self.plane.model.runtime
        if runtime in (Runtime.TORCHSCRIPT, Runtime.EMBEDDINGS):
            posts.append(self.post(f"{model}/infer", self.infer, "oip"))
            posts.append(self.post(f"{version}/infer", self.infer, "oip"))
        if runtime in (Runtime.EMBEDDINGS, Runtime.NOOP):
            posts.append(self.post("/v1/embeddings", self.embeddings, "openai"))
        if runtime is Runtime.CAUSAL_LM:
            posts.append(self.post("/v1/completions", self.completions, "openai"))
            posts.append(self.post("/v1/chat/completions", self.chat_completions, "openai"))
        return routes, posts


class ServeApp:
    """The ASGI app: POST inference routes are served directly (the hot path: no routing table walk, no
    middleware, no Request/Response objects); everything else goes to Starlette."""

    def __init__(self, endpoints: _Endpoints, starlette: Starlette, posts: list[_Post]) -> None:
        self.endpoints = endpoints
        self.starlette = starlette
        self.exact = {p.template: p for p in posts if p.pattern is None}
        self.patterns = [p for p in posts if p.pattern is not None]

    def _match(self, path: str) -> tuple[_Post, dict[str, str]] | None:
        post = self.exact.get(path)
        if post is not None:
            return post, {}
        for post in self.patterns:
            assert post.pattern is not None
            found = post.pattern.match(path)
            if found:
                return post, found.groupdict()
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            matched = self._match(scope["path"])
            if matched is not None:
                if scope["method"] == "POST":
                    await self.endpoints._infer(matched[0], matched[1], scope, receive, send)
                    return
                if not self.starlette_serves(scope):  # e.g. GET /v1/completions: 405, not 404
                    raise_405 = HTTPException(405, headers={"Allow": "POST"})
                    response = await self.endpoints.unmatched(Request(scope, receive), raise_405)
                    await response(scope, receive, send)
                    return
        await self.starlette(scope, receive, send)

    def starlette_serves(self, scope: Scope) -> bool:
        """Some Starlette route takes this path (with any method)."""
        from starlette.routing import Match

        return any(route.matches(scope)[0] is not Match.NONE for route in self.starlette.routes)


def build_app(
    plane: DataPlane,
    limits: HttpLimits,
    *,
    on_load_failed: Callable[[], None],
    on_loaded: Callable[[], None] = lambda: None,
    worker: str | None = None,
) -> ServeApp:
    """The ASGI app. Loading starts in the lifespan (after the port is open, so liveness answers).

    `on_loaded` runs once the model is ready, before the first request is served (the loading task does not
    yield in between). `worker` (with --workers > 1): this process's name in the `x-tandem-worker` header of
    every answer."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async def load() -> None:
            try:
                await plane.load()
            except Exception:
                log.exception("loading model %s failed; exiting", plane.model.name)
                on_load_failed()
                return
            on_loaded()

        loading = asyncio.create_task(load(), name="load-model")
        try:
            yield
        finally:
            if not loading.done():
                loading.cancel()
            await plane.close()

    endpoints = _Endpoints(plane, limits, worker)
    routes, posts = endpoints.routes()
    handlers = {404: endpoints.unmatched, 405: endpoints.unmatched}
    starlette = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    return ServeApp(endpoints, starlette, posts)
