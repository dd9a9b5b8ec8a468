"""The operator's one request path (`kube.request`, aiohttp underneath): credentials that rotate, calls
that reuse one connection, a server that is not there.

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
from typing import ClassVar

import pytest
import yaml
from collect import Collect

from tandem.operator import kube, kubehttp
from tandem.operator.watchcache import Lines

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
    kube.configuration.cache_clear()
    try:
        yield served, token_file
    finally:
        kube.configuration.cache_clear()
        served.shutdown()
        served.server_close()


def test_a_token_rotated_between_requests_is_fetched_again_on_the_first_401(
    server: tuple[TokenServer, Path],
) -> None:
    served, token_file = server
    assert json.loads(kube.run(kube.request("GET", "/api/v1/namespaces")))["items"] == []
    token_file.write_text("second")  # the credential rotates: the server takes only the new one
    served.accepted = "second"
    assert json.loads(kube.run(kube.request("GET", "/api/v1/namespaces")))["items"] == []
    assert served.seen == ["first", "first", "second"]  # reused, refused once, asked again


def test_a_token_the_server_keeps_refusing_is_an_error_that_says_so(server: tuple[TokenServer, Path]) -> None:
    from kubernetes.client.exceptions import ApiException

    served, _ = server
    served.accepted = "nobody has this one"
    with pytest.raises(ApiException) as raised:
        kube.run(kube.request("GET", "/api/v1/namespaces"))
    assert raised.value.status == 401
    assert "Unauthorized" in str(raised.value.body)
    assert len(served.seen) == 2  # one retry with fresh credentials, no loop


class RecordingHandler(BaseHTTPRequestHandler):
    """Records each call's method, path, content type and body; answers 201 with the body echoed."""

    calls: ClassVar[list[tuple[str, str, str, bytes]]] = []

    def _record(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.calls.append((self.command, self.path, self.headers.get("Content-Type", ""), body))
        reply = body or b"{}"
        self.send_response(201)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_GET = do_POST = do_PATCH = do_DELETE = _record

    def log_message(self, *_: object) -> None:
        pass


def test_calls_on_one_connection_carry_their_own_method_and_body(server: tuple[TokenServer, Path]) -> None:
    """A reused connection must not send an earlier call's body or method with the next call."""
    recording = ThreadingHTTPServer(("127.0.0.1", 0), RecordingHandler)
    threading.Thread(target=recording.serve_forever, daemon=True).start()
    RecordingHandler.calls = []
    settings = kube.configuration()
    base = f"http://127.0.0.1:{recording.server_port}"

    async def calls() -> tuple[kubehttp.Reply, kubehttp.Reply]:
        created = await kubehttp.call(
            settings, "POST", f"{base}/a?x=1", b'{"kind":"Pod"}', {"Content-Type": "application/json"}
        )
        await kubehttp.call(settings, "DELETE", f"{base}/b", None, {})
        await kubehttp.call(settings, "GET", f"{base}/c", None, {})
        patched = await kubehttp.call(
            settings, "PATCH", f"{base}/d", b"{}", {"Content-Type": "application/merge-patch+json"}
        )
        return created, patched

    try:
        created, patched = kube.run(calls())
    finally:
        recording.shutdown()
        recording.server_close()
    assert created[:2] == (201, b'{"kind":"Pod"}')
    assert patched[:2] == (201, b"{}")
    assert RecordingHandler.calls == [
        ("POST", "/a?x=1", "application/json", b'{"kind":"Pod"}'),
        ("DELETE", "/b", "", b""),
        ("GET", "/c", "", b""),
        ("PATCH", "/d", "application/merge-patch+json", b"{}"),
    ]


def test_an_unreachable_server_is_a_connection_error_that_names_the_call(
    server: tuple[TokenServer, Path],
) -> None:
    served, _ = server
    port = served.server_port
    served.shutdown()
    served.server_close()  # nothing listens there now
    with pytest.raises(
        ConnectionError, match=rf"GET http://127.0.0.1:{port}/api/v1/namespaces: no reply: .*[Cc]onnect"
    ):
        kube.run(kube.request("GET", "/api/v1/namespaces"))


class WatchHandler(BaseHTTPRequestHandler):
    """A watch: three events sent as separate chunks (as the API server does), or 410 Gone for an
    expired resourceVersion."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if "resourceVersion=old" in self.path:
            body = b'{"kind":"Status","reason":"Expired","code":410}'
            self.send_response(410)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        events = [b'{"type":"ADDED"}\n', b'{"type":"MODIFIED"}\n', b'{"type":"DELETED"}\n']
        if "huge" in self.path:  # a pod with a 1 MiB label value is one event of over a megabyte
            events[1] = b'{"type":"MODIFIED","value":"' + b"x" * (1 << 20) + b'"}\n'
        for event in events:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def watch_server(server: tuple[TokenServer, Path], tmp_path: Path) -> Iterator[str]:
    """A kubeconfig (no credentials) pointing at a WatchHandler server; yields its URL."""
    watching = ThreadingHTTPServer(("127.0.0.1", 0), WatchHandler)
    threading.Thread(target=watching.serve_forever, daemon=True).start()
    config = yaml.safe_load((tmp_path / "kubeconfig").read_text())
    config["clusters"][0]["cluster"]["server"] = f"http://127.0.0.1:{watching.server_port}"
    del config["users"][0]["user"]["exec"]
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    kube.configuration.cache_clear()
    try:
        yield f"http://127.0.0.1:{watching.server_port}"
    finally:
        watching.shutdown()
        watching.server_close()


def test_a_watch_hands_on_each_event_and_stops_when_asked(watch_server: str) -> None:
    got = Collect()
    kube.run(kube.watch("/api/v1/pods", {"watch": "true"}, Lines(got).feed, timeout=10))
    assert got.lines == [b'{"type":"ADDED"}', b'{"type":"MODIFIED"}', b'{"type":"DELETED"}']

    first = Collect(limit=1)

    async def stop_then_call() -> bytes:
        await kube.watch("/api/v1/pods", {"watch": "true"}, Lines(first).feed, timeout=10)
        # A plain call on the same session (after a stream left half-read) reads its whole reply.
        return await kube.request("GET", "/api/v1/pods")

    assert kube.run(stop_then_call()).count(b"\n") == 3
    assert first.lines == [b'{"type":"ADDED"}']  # the reader said stop: nothing after, and no error


def test_a_watch_error_status_and_a_failing_reader_are_raised(watch_server: str) -> None:
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as expired:
        kube.run(kube.watch("/api/v1/pods", {"resourceVersion": "old"}, lambda block: True, timeout=10))
    assert expired.value.status == 410
    assert "Expired" in str(expired.value.body)

    def reader(block: bytes) -> bool:
        raise RuntimeError("watch error: too old resource version")

    with pytest.raises(RuntimeError, match="too old resource version"):
        kube.run(kube.watch("/api/v1/pods", {"watch": "true"}, reader, timeout=10))


def test_a_watch_event_longer_than_any_read_buffer_arrives_whole(watch_server: str) -> None:
    got = Collect()
    kube.run(kube.watch("/api/v1/pods", {"watch": "true", "huge": "1"}, Lines(got).feed, timeout=10))
    assert [len(line) for line in got.lines] == [16, (1 << 20) + 30, 18]
    assert json.loads(got.lines[1])["value"] == "x" * (1 << 20)
