"""HTTP transport: the Starlette app, the error table, body limits, disconnects and request metrics.

Every endpoint goes through `_endpoint`, the one place that turns domain errors into status codes
(`HTTP_STATUS`), records the request-duration histogram, and (for inference) counts the request in flight and
cancels it when the client disconnects, so its items are dropped before compute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tandem.workloads.serve.dataplane import DataPlane
from tandem.workloads.serve.errors import (
    ClientDisconnected,
    Draining,
    InvalidInput,
    ModelError,
    ModelNotFound,
    PayloadTooLarge,
    QueueFull,
    RequestTimeout,
    ServeError,
    Unavailable,
)
from tandem.workloads.serve.metrics import CONTENT_TYPE
from tandem.workloads.serve.model import Runtime
from tandem.workloads.serve.protocols import oip, openai

log = logging.getLogger("tandem.serve")

#: The one table from domain errors to HTTP status codes (most specific class wins).
HTTP_STATUS: Final[Mapping[type[ServeError], int]] = {
    InvalidInput: 400,
    ModelNotFound: 404,
    PayloadTooLarge: 413,
    QueueFull: 429,
    ClientDisconnected: 499,  # nginx's code for "client closed request"; never reaches the client
    ModelError: 500,
    Unavailable: 503,
    RequestTimeout: 504,
}

Family = Literal["openai", "oip", "plain"]
Handler = Callable[[Request], Awaitable[Response | dict[str, Any]]]
InferenceHandler = Callable[[Request, bytes], Awaitable[dict[str, Any]]]


def status_for(error: ServeError) -> int:
    for cls in type(error).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500


def error_response(error: ServeError, family: Family) -> JSONResponse:
    status = status_for(error)
    headers: dict[str, str] = {}
    if isinstance(error, QueueFull):
        headers["Retry-After"] = str(error.retry_after_s)
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
    return JSONResponse(body, status_code=status, headers=headers)


@dataclass(frozen=True)
class HttpLimits:
    max_request_bytes: int = 8 * 1024 * 1024
    """Largest request body accepted (413 beyond)."""


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body has {declared} bytes; the limit is {limit} (--max-request-bytes)")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over the {limit}-byte limit (--max-request-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`, cancelling it if the client disconnects first (its queued items are then dropped)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientDisconnected("the client disconnected")
    return task.result()


class _Endpoints:
    """The handlers; `wrap` is the one place that applies the error table and records metrics."""

    def __init__(self, plane: DataPlane, limits: HttpLimits) -> None:
        self.plane = plane
        self.limits = limits

    async def _respond(
        self,
        request: Request,
        route: str,
        family: Family,
        inference: InferenceHandler | None,
        plain: Handler | None,
    ) -> Response:
        started = time.perf_counter()
        result: Response | dict[str, Any]
        try:
            if inference is not None:
                # The body is read first: afterwards the only message left is the disconnect.
                body = await read_body(request, self.limits.max_request_bytes)
                with self.plane.admit():
                    result = await _until_disconnect(request, inference(request, body))
            else:
                assert plain is not None
                result = await plain(request)
            response = result if isinstance(result, Response) else JSONResponse(result)
        except ServeError as exc:
            response = error_response(exc, family)
            if status_for(exc) >= 500 and not isinstance(exc, Unavailable):
                log.warning("%s %s: %s", request.method, route, exc.message)
        except Exception:
            log.exception("%s %s failed", request.method, route)
            response = error_response(ModelError("internal server error; see the server log"), family)
        self.plane.metrics.observe_request(route, response.status_code, time.perf_counter() - started)
        return response

    def get(self, path: str, handler: Handler, family: Family = "plain") -> Route:
        async def endpoint(request: Request) -> Response:
            return await self._respond(request, path, family, None, handler)

        return Route(path, endpoint, methods=["GET"])

    def post(self, path: str, handler: InferenceHandler, family: Family) -> Route:
        async def endpoint(request: Request) -> Response:
            return await self._respond(request, path, family, handler, None)

        return Route(path, endpoint, methods=["POST"])

    # -- handlers ---------------------------------------------------------------------------------

    async def live(self, request: Request) -> dict[str, Any]:
        return {"live": True}

    async def ready(self, request: Request) -> Response:
        plane = self.plane
        return JSONResponse(
            {"ready": plane.ready, "state": plane.state.value}, status_code=200 if plane.ready else 503
        )

    async def model_ready(self, request: Request) -> Response:
        oip.check_model(self.plane, request.path_params["name"], request.path_params.get("version"))
        return await self.ready(request)

    async def model_metadata(self, request: Request) -> dict[str, Any]:
        oip.check_model(self.plane, request.path_params["name"], request.path_params.get("version"))
        return oip.model_metadata(self.plane)

    async def server_metadata(self, request: Request) -> dict[str, Any]:
        return oip.server_metadata()

    async def infer(self, request: Request, body: bytes) -> dict[str, Any]:
        params = request.path_params
        return await oip.infer(self.plane, params["name"], body, params.get("version"))

    async def models(self, request: Request) -> dict[str, Any]:
        return openai.models(self.plane)

    async def embeddings(self, request: Request, body: bytes) -> dict[str, Any]:
        return await openai.embeddings(self.plane, body)

    async def prometheus(self, request: Request) -> Response:
        return Response(self.plane.metrics.render(), media_type=CONTENT_TYPE)

    def routes(self) -> list[Route]:
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
            self.get("/metrics", self.prometheus),
        ]
        runtime = self.plane.model.runtime
        if runtime is Runtime.TORCHSCRIPT:
            routes.append(self.post(f"{model}/infer", self.infer, "oip"))
            routes.append(self.post(f"{version}/infer", self.infer, "oip"))
        if runtime is Runtime.EMBEDDINGS:
            routes.append(self.post("/v1/embeddings", self.embeddings, "openai"))
        return routes


def build_app(plane: DataPlane, limits: HttpLimits, *, on_load_failed: Callable[[], None]) -> Starlette:
    """The ASGI app. Loading starts in the lifespan (after the port is open, so liveness answers)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async def load() -> None:
            try:
                await plane.load()
            except Exception:
                log.exception("loading model %s failed; exiting", plane.model.name)
                on_load_failed()

        loading = asyncio.create_task(load(), name="load-model")
        try:
            yield
        finally:
            if not loading.done():
                loading.cancel()
            if plane.batcher is not None:
                await plane.batcher.close(drain=False)

    return Starlette(routes=_Endpoints(plane, limits).routes(), lifespan=lifespan)
