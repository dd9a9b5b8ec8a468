"""HTTP/1.1 to the API server through libcurl (pycurl): calls and watches, one reused connection per
thread.

Why not the kubernetes client's urllib3 pool: at a burst of gangs the operator makes thousands of calls
a minute, and urllib3 with `http.client` spent about 290 us of Python per call (URL parsing, header
objects, the email parser for response headers) against about 140 us here; the operator's CPU in the
TrainingJob scale benchmark fell by a quarter (docs/benchmarks.md, "Fourth round"). HTTP/1.1, not
HTTP/2: it cost both the operator and the API server less per call in the same benchmark.

The connection settings (server CA, client certificate, proxy, TLS server name) come from the same
kubernetes client configuration as before, so kubeconfigs and in-cluster credentials work unchanged.
Watches (`stream`) go the same way: libcurl undoes the chunked encoding, the caller gets blocks.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import pycurl

CONNECT_TIMEOUT_SECONDS = 10
#: A call that takes longer is given up (the reconcile retries). Past the API server's own 60 s
#: request timeout, so that its answer, not ours, ends a slow call.
CALL_TIMEOUT_SECONDS = 90


class Reply(NamedTuple):
    """A reply's status code and body, and its Retry-After in seconds (None: not sent or not a number)."""

    status: int
    body: bytes
    retry_after: float | None = None


def retry_after(header_lines: bytes) -> float | None:
    """The Retry-After of a reply's header block, in seconds (the API server sends whole seconds;
    an HTTP date, which it never sends, counts as none)."""
    for line in header_lines.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"retry-after":
            try:
                return max(float(value.strip()), 0.0)
            except ValueError:
                return None
    return None


class Transport:
    """Thread-local libcurl handles for one API server, configured from a kubernetes client
    `Configuration` (read once, when a thread makes its first call)."""

    def __init__(self, configuration: Any) -> None:
        self._configuration = configuration
        self._local = threading.local()

    def call(self, method: str, url: str, body: bytes | None, headers: dict[str, str]) -> Reply:
        """The reply. Raises ConnectionError when no reply came (refused, timed out).

        The header block is kept (libcurl writes it into a buffer, no Python per line) and read only
        for an error reply, for its Retry-After."""
        handle = self._prepared(method, url, body, headers)
        reply, head = io.BytesIO(), io.BytesIO()
        handle.setopt(pycurl.WRITEDATA, reply)
        handle.setopt(pycurl.HEADERFUNCTION, head.write)
        try:
            handle.perform()
        except pycurl.error as error:
            raise _no_reply(method, url, error) from None
        finally:
            handle.unsetopt(pycurl.HEADERFUNCTION)
        status = int(handle.getinfo(pycurl.RESPONSE_CODE))
        return Reply(status, reply.getvalue(), retry_after(head.getvalue()) if status >= 300 else None)

    def stream(
        self, url: str, headers: dict[str, str], on_block: Callable[[bytes], bool], timeout: float
    ) -> Reply:
        """GET a streaming reply (a watch), handing each block to `on_block` as it arrives, until the
        server ends it, `timeout` seconds pass, or `on_block` returns False. The reply (the body of an
        error reply). An exception raised by `on_block` ends the stream and is raised here."""
        handle = self._prepared("GET", url, None, headers)
        error_reply = io.BytesIO()
        stopped: list[BaseException | None] = []
        status = [0]
        head = io.BytesIO()

        def header(line: bytes) -> None:  # the status line comes first (getinfo waits for the end)
            if line.startswith(b"HTTP/"):
                status[0] = int(line.split()[1])
            head.write(line)

        def write(block: bytes) -> int:
            if status[0] >= 300:
                error_reply.write(block)
                return len(block)
            try:
                if on_block(block):
                    return len(block)
                stopped.append(None)
            except BaseException as raised:  # libcurl cannot carry it: end the transfer, raise it below
                stopped.append(raised)
            return 0  # anything but len(block) makes libcurl end the transfer

        handle.setopt(pycurl.HEADERFUNCTION, header)
        handle.setopt(pycurl.WRITEFUNCTION, write)
        handle.setopt(pycurl.TIMEOUT_MS, int(timeout * 1000))
        try:
            handle.perform()
        except pycurl.error as error:
            if stopped and stopped[0] is not None:
                raise stopped[0] from None
            if not stopped:
                raise _no_reply("GET", url, error) from None
        finally:
            handle.unsetopt(pycurl.HEADERFUNCTION)
            handle.setopt(pycurl.TIMEOUT, CALL_TIMEOUT_SECONDS)
        code = int(handle.getinfo(pycurl.RESPONSE_CODE))
        return Reply(code, error_reply.getvalue(), retry_after(head.getvalue()) if code >= 300 else None)

    def _prepared(self, method: str, url: str, body: bytes | None, headers: dict[str, str]) -> pycurl.Curl:
        """This thread's handle, set up for one request (nothing left over from the one before)."""
        handle = self._handle()
        handle.setopt(pycurl.URL, self._url(url))
        if body is None:
            handle.setopt(pycurl.HTTPGET, 1)  # forget an earlier call's body
        else:
            handle.setopt(pycurl.POSTFIELDS, body)
        handle.setopt(pycurl.CUSTOMREQUEST, method)
        # "Expect:" stops libcurl from waiting for a 100 Continue before sending a large body.
        handle.setopt(pycurl.HTTPHEADER, [f"{k}: {v}" for k, v in headers.items()] + ["Expect:"])
        return handle

    def _url(self, url: str) -> str:
        """With a TLS server name set (kubeconfig `tls-server-name`), the URL names it; CONNECT_TO
        (set on the handle) still sends the connection to the configured address."""
        server_name = getattr(self._configuration, "tls_server_name", None)
        if not server_name:
            return url
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
        return urlunsplit(parts._replace(netloc=f"{server_name}{port}"))

    def _handle(self) -> pycurl.Curl:
        handle: pycurl.Curl | None = getattr(self._local, "handle", None)
        if handle is None:
            handle = self._new_handle()
            self._local.handle = handle
        return handle

    def _new_handle(self) -> pycurl.Curl:
        config = self._configuration
        handle = pycurl.Curl()
        handle.setopt(pycurl.NOSIGNAL, 1)  # timeouts without signals: required with threads
        handle.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
        handle.setopt(pycurl.CONNECTTIMEOUT, CONNECT_TIMEOUT_SECONDS)
        handle.setopt(pycurl.TIMEOUT, CALL_TIMEOUT_SECONDS)
        # The configured proxy or none: libcurl would otherwise follow https_proxy from the environment,
        # which the kubernetes client never did.
        handle.setopt(pycurl.PROXY, config.proxy or "")
        if config.ssl_ca_cert:
            handle.setopt(pycurl.CAINFO, config.ssl_ca_cert)
        if config.cert_file:
            handle.setopt(pycurl.SSLCERT, config.cert_file)
        if config.key_file:
            handle.setopt(pycurl.SSLKEY, config.key_file)
        if not config.verify_ssl:
            handle.setopt(pycurl.SSL_VERIFYPEER, 0)
        if not config.verify_ssl or config.assert_hostname is False:
            handle.setopt(pycurl.SSL_VERIFYHOST, 0)
        server_name = getattr(config, "tls_server_name", None)
        if server_name:
            address = urlsplit(config.host)
            port, host = address.port or 443, address.hostname or ""
            host = f"[{host}]" if ":" in host else host  # an IPv6 address
            handle.setopt(pycurl.CONNECT_TO, [f"{server_name}:{port}:{host}:{port}"])
        return handle


def _no_reply(method: str, url: str, error: pycurl.error) -> ConnectionError:
    """A call that got no reply, said with the call and libcurl's reason (refused, TLS, timeout)."""
    code, message = error.args if len(error.args) == 2 else (0, str(error))
    return ConnectionError(f"{method} {url}: {message} (libcurl error {code})")
