"""The operator's one request path (`kube.request`) keeps working when its credentials rotate.

It reuses the server address and token for a while (asking the client for them on every call cost
the operator measurable CPU); a token rotated in between must not fail requests. Real HTTP: a local
server that accepts one token at a time, and a real kubeconfig exec plugin that hands out the current
token, as cloud credential plugins do.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tandem.operator import kube

PLUGIN = """
import json, sys
token = open(sys.argv[1]).read().strip()
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                  "status": {"token": token, "expirationTimestamp": "2000-01-01T00:00:00Z"}}))
"""


class TokenServer(ThreadingHTTPServer):
    """Answers `GET /api/v1/namespaces` for the one token it accepts now; 401 for any other."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), TokenHandler)
        self.accepted = "first"
        self.seen: list[str] = []


class TokenHandler(BaseHTTPRequestHandler):
    server: TokenServer

    def do_GET(self) -> None:
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        self.server.seen.append(token)
        ok = token == self.server.accepted
        body = json.dumps({"kind": "NamespaceList", "items": []} if ok else {"message": "Unauthorized"})
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TokenServer, Path]]:
    """The server, and the file the exec plugin reads its token from; the operator's client made anew."""
    served = TokenServer()
    thread = threading.Thread(target=served.serve_forever, daemon=True)
    thread.start()
    token_file = tmp_path / "token"
    token_file.write_text("first")
    (tmp_path / "plugin.py").write_text(PLUGIN)
    user = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": sys.executable,
            "args": [str(tmp_path / "plugin.py"), str(token_file)],
            "interactiveMode": "Never",
        }
    }
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{served.server_port}"}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kube, "_endpoint", kube._Endpoint())
    kube.api_client.cache_clear()
    try:
        yield served, token_file
    finally:
        kube.api_client.cache_clear()
        served.shutdown()
        served.server_close()


def test_a_token_rotated_between_requests_is_fetched_again_on_the_first_401(
    server: tuple[TokenServer, Path],
) -> None:
    served, token_file = server
    assert json.loads(kube.request("GET", "/api/v1/namespaces"))["items"] == []
    token_file.write_text("second")  # the credential rotates: the server takes only the new one
    served.accepted = "second"
    assert json.loads(kube.request("GET", "/api/v1/namespaces"))["items"] == []
    assert served.seen == ["first", "first", "second"]  # reused, refused once, asked again


def test_a_token_the_server_keeps_refusing_is_an_error_that_says_so(server: tuple[TokenServer, Path]) -> None:
    from kubernetes.client.exceptions import ApiException

    served, _ = server
    served.accepted = "nobody has this one"
    with pytest.raises(ApiException) as raised:
        kube.request("GET", "/api/v1/namespaces")
    assert raised.value.status == 401
    assert "Unauthorized" in str(raised.value.body)
    assert len(served.seen) == 2  # one retry with fresh credentials, no loop
