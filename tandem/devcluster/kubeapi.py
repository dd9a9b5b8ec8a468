"""A minimal JSON-over-HTTPS client for the few calls `cluster up` makes (health, nodes, probe pod).

The dev cluster needs only `cryptography` (the `cluster` extra); this keeps it free of the Kubernetes
Python client, and gives readiness polls short, explicit timeouts.
"""

from __future__ import annotations

import http.client
import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class ApiError(Exception):
    """An unexpected HTTP status from the API server."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:500]}")
        self.status = status


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class KubeAPI:
    """Talks to one API server with a client certificate; one short-lived connection per call."""

    def __init__(
        self, server: str, *, ca_file: Path, cert_file: Path, key_file: Path, timeout: float = 5.0
    ) -> None:
        parts = urlsplit(server)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 443
        self.timeout = timeout
        self._context = ssl.create_default_context(cafile=str(ca_file))
        self._context.load_cert_chain(str(cert_file), str(key_file))

    def request(self, method: str, path: str, body: Any = None) -> Response:
        """Send one request; connection errors propagate as OSError for callers that poll."""
        conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self._context)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"Accept": "application/json"}
            if payload is not None:
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            return Response(response.status, response.read())
        finally:
            conn.close()

    def get(self, path: str) -> Any | None:
        """The decoded object, or None when it does not exist."""
        response = self.request("GET", path)
        if response.status == 404:
            return None
        if response.status != 200:
            raise ApiError("GET", path, response.status, response.body.decode(errors="replace"))
        return response.json()

    def create(self, path: str, obj: dict[str, Any]) -> bool:
        """POST `obj` to the collection `path`; False when it already exists (create-if-absent)."""
        response = self.request("POST", path, obj)
        if response.status == 409:
            return False
        if response.status not in (200, 201, 202):
            raise ApiError("POST", path, response.status, response.body.decode(errors="replace"))
        return True

    def delete(self, path: str, grace_period_seconds: int | None = None) -> None:
        """Delete `path`; a missing object is fine."""
        body = None if grace_period_seconds is None else {"gracePeriodSeconds": grace_period_seconds}
        response = self.request("DELETE", path, body)
        if response.status not in (200, 202, 404):
            raise ApiError("DELETE", path, response.status, response.body.decode(errors="replace"))
