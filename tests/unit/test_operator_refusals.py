"""How the operator reads the API server's refusals: permanent ones (the child is what is wrong) end up
as one condition naming the field; temporary ones (busy, conflict, no answer) are retried no sooner
than the server's Retry-After. Real HTTP against a local server that answers as kube-apiserver does.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from tandem.operator import kube

POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "job-1-worker-0", "namespace": "team"}}
HUGE = "x" * (1 << 20)  # a 1 MiB label value, quoted back by the API server


def status(code: int, reason: str, message: str, **details: object) -> dict[str, object]:
    return {
        "kind": "Status",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
        "details": details,
    }


class CannedHandler(BaseHTTPRequestHandler):
    """Answers every call with the (status, headers, body) the test set."""

    reply: ClassVar[tuple[int, dict[str, str], bytes]] = (200, {}, b"{}")

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        code, headers, body = self.reply
        self.send_response(code)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = _answer

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[type[CannedHandler]]:
    served = ThreadingHTTPServer(("127.0.0.1", 0), CannedHandler)
    threading.Thread(target=served.serve_forever, daemon=True).start()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{served.server_port}"}}],
        "users": [{"name": "u", "user": {}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kube, "_endpoint", kube._Endpoint())
    kube.configuration.cache_clear()
    try:
        yield CannedHandler
    finally:
        kube.configuration.cache_clear()
        served.shutdown()
        served.server_close()


def set_reply(handler: type[CannedHandler], code: int, body: object, **headers: str) -> None:
    handler.reply = (code, {"Content-Type": "application/json", **headers}, json.dumps(body).encode())


def test_an_invalid_child_is_refused_for_good_naming_the_field_in_a_bounded_message(
    answer: type[CannedHandler],
) -> None:
    message = (
        f'Pod "job-1-worker-0" is invalid: spec.nodeSelector: Invalid value: "{HUGE}": must be 63 characters'
    )
    cause = {"reason": "FieldValueInvalid", "message": "Invalid value", "field": "spec.nodeSelector"}
    set_reply(answer, 422, status(422, "Invalid", message, causes=[cause]))
    with pytest.raises(kube.Refused) as refused:
        kube.run(kube.create(POD))
    assert (refused.value.status, refused.value.reason, refused.value.field) == (
        422,
        "Invalid",
        "spec.nodeSelector",
    )
    text = str(refused.value)
    assert len(text) <= kube.MESSAGE_LIMIT
    assert text.startswith('Pod "job-1-worker-0" is invalid: spec.nodeSelector')
    assert "more characters)" in text  # says it was cut


@pytest.mark.parametrize(("code", "reason"), [(403, "Forbidden"), (400, "BadRequest")])
def test_forbidden_and_bad_requests_are_permanent(
    answer: type[CannedHandler], code: int, reason: str
) -> None:
    set_reply(answer, code, status(code, reason, 'pods "x" is forbidden: violates PodSecurity'))
    with pytest.raises(kube.Refused) as refused:
        kube.run(kube.create(POD))
    assert refused.value.reason == reason


def test_a_busy_server_is_temporary_and_its_retry_after_header_is_kept(answer: type[CannedHandler]) -> None:
    # API priority and fairness answers a plain-text 429 with only the header.
    answer.reply = (429, {"Retry-After": "7"}, b"Too many requests, please try again later.\n")
    with pytest.raises(kube.Busy) as busy:
        kube.run(kube.create(POD))
    assert busy.value.retry_after == 7.0


def test_retry_after_from_a_status_body_when_no_header_came(answer: type[CannedHandler]) -> None:
    set_reply(
        answer, 504, status(504, "Timeout", "the server was unable to return a response", retryAfterSeconds=3)
    )
    with pytest.raises(kube.Busy) as busy:
        kube.run(kube.apply(POD))
    assert busy.value.retry_after == 3.0


def test_an_exceeded_quota_is_temporary_although_it_is_a_403(answer: type[CannedHandler]) -> None:
    message = 'pods "x" is forbidden: exceeded quota: gpus, requested: nvidia.com/gpu=8, used: 0, limited: 4'
    set_reply(answer, 403, status(403, "Forbidden", message))
    with pytest.raises(kube.Busy, match="exceeded quota"):
        kube.run(kube.create(POD))


def test_an_existing_child_is_no_error_and_a_server_that_is_gone_is_temporary(
    answer: type[CannedHandler], tmp_path: Path
) -> None:
    set_reply(answer, 409, status(409, "AlreadyExists", 'pods "job-1-worker-0" already exists'))
    assert kube.run(kube.create(POD)) is False
    config = yaml.safe_load((tmp_path / "kubeconfig").read_text())
    config["clusters"][0]["cluster"]["server"] = "http://127.0.0.1:1"  # nothing listens there
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    kube.configuration.cache_clear()
    kube._endpoint = kube._Endpoint()
    with pytest.raises(kube.Busy, match="no reply"):
        kube.run(kube.create(POD))


def test_messages_are_cut_to_the_limit_saying_how_much_was_cut() -> None:
    assert kube.bounded("short") == "short"
    cut = kube.bounded(HUGE)
    assert kube.MESSAGE_LIMIT - 10 < len(cut) <= kube.MESSAGE_LIMIT
    shown = cut.index("...")
    assert cut[shown:] == f"... ({len(HUGE) - shown} more characters)"
