"""Domain errors of the model server.

These know nothing about HTTP: the transport maps each class to a status code in one table
(`tandem.workloads.serve.http.HTTP_STATUS`). Messages are written for the client: what is wrong and,
where it helps, what to do.
"""

from __future__ import annotations


class ServeError(Exception):
    """Base of every error the server reports to a client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServeError):
    """The request is malformed; `field` names the offending part (`input[2]`, `inputs[0].shape`)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class PayloadTooLarge(ServeError):
    """The request body is larger than the server accepts."""


class ModelNotFound(ServeError):
    """The request names a model this server does not serve."""


class RouteNotFound(ServeError):
    """No endpoint at this path (for this server's runtime)."""


class MethodNotAllowed(ServeError):
    """The path exists but not for this HTTP method; `allowed` lists the methods it takes."""

    def __init__(self, message: str, allowed: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allowed = allowed


class QueueFull(ServeError):
    """The batch queue has no room; retry after `retry_after_s` seconds (or on another replica)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(ServeError):
    """The server cannot take requests now (loading, failed, or shutting down)."""

    retry_after_s: int = 1


class NotReady(Unavailable):
    """The model is not loaded and warmed up yet."""


class Draining(Unavailable):
    """The server is shutting down: requests already accepted finish, new ones are refused."""


class RequestTimeout(ServeError):
    """The request did not finish within the server's per-request timeout."""


class BodyTimeout(ServeError):
    """The client stopped sending its request body (a slow or half-sent request); the connection closes."""


class ModelError(ServeError):
    """The model failed while computing a batch (every request of that batch gets this error)."""


class ClientDisconnected(ServeError):
    """The client went away before its answer was ready; no answer is sent."""
