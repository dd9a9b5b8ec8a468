"""The operator's one HTTP client: aiohttp on kopf's event loop, for the API server (calls and
watches), Prometheus and the replicas' /metrics.

Why aiohttp: kopf already runs on it, and a call costs about 110 us of Python against libcurl's 141 us
(pycurl, which the operator used while its reconcilers were threads); a call in flight is a coroutine,
not a thread. HTTP/1.1: it cost both the operator and the API server less per call than HTTP/2 in the
TrainingJob scale benchmark (docs/benchmarks.md).

Why not kopf's own session: kopf makes it in its login handler and makes a new one at every re-login
(a 401), closing the old one under the calls in flight, and it carries kopf's credential headers on
every request. Tandem's session lives as long as the operator (opened on first use on the loop,
closed by `close()` at cleanup) and has no default headers: the API server's credentials go with each
call to it (`kube`), never to a replica or to Prometheus. TLS comes from the same kubernetes client
configuration as before (CA, client certificate, `tls-server-name`, proxy), as an `ssl.SSLContext`.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple, TypeVar

import aiohttp

CONNECT_TIMEOUT_SECONDS = 10
#: A call that takes longer is given up (the reconcile retries). Past the API server's own 60 s
#: request timeout, so that its answer, not ours, ends a slow call.
CALL_TIMEOUT_SECONDS = 90
#: Connections the session holds open. Calls in flight are bounded well below this by the work
#: queues' workers and the child-call limit (about 30); the watches hold one each (seven per watched
#: namespace). Each TLS connection keeps its own buffers: an unbounded pool took 200 MB in kopf's.
CONNECTIONS = 128
T = TypeVar("T")
_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = (
    weakref.WeakKeyDictionary()
)


class Reply(NamedTuple):
    """A reply's status code and body, and its Retry-After in seconds (None: not sent or not a number)."""

    status: int
    body: bytes
    retry_after: float | None = None


def retry_after(value: str | None) -> float | None:
    """A Retry-After header in seconds (the API server sends whole seconds; an HTTP date, which it
    never sends, counts as none)."""
    if value is None:
        return None
    try:
        return max(float(value.strip()), 0.0)
    except ValueError:
        return None


def session() -> aiohttp.ClientSession:
    """The running loop's session, made on first use (one per loop: `tandem cost` and tests run
    their own loops with `run`)."""
    loop = asyncio.get_running_loop()
    found = _sessions.get(loop)
    if found is None or found.closed:
        connector = aiohttp.TCPConnector(limit=CONNECTIONS, ttl_dns_cache=300)
        timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_SECONDS, connect=CONNECT_TIMEOUT_SECONDS)
        found = _sessions[loop] = aiohttp.ClientSession(
            connector=connector, timeout=timeout, skip_auto_headers=("Accept-Encoding",)
        )
    return found


async def close() -> None:
    """Close the running loop's session (the operator's cleanup; the end of a `run`)."""
    found = _sessions.pop(asyncio.get_running_loop(), None)
    if found is not None:
        await found.close()


def run(call: Coroutine[Any, Any, T]) -> T:
    """Run `call` to the end on a new event loop and close its session: the CLI's way in."""

    async def closing() -> T:
        try:
            return await call
        finally:
            await close()

    return asyncio.run(closing())


@functools.cache
def tls(configuration: Any) -> ssl.SSLContext | bool:
    """The TLS settings of a kubernetes client configuration (False: do not verify)."""
    config = configuration
    if not config.verify_ssl:
        return False
    context = ssl.create_default_context(cafile=config.ssl_ca_cert or None)
    if config.cert_file:
        context.load_cert_chain(config.cert_file, config.key_file or None)
    if config.assert_hostname is False:
        context.check_hostname = False
    return context


def _options(configuration: Any, url: str) -> dict[str, Any]:
    """Per-request TLS, proxy and server name (`tls-server-name` of a kubeconfig) of the API server."""
    options: dict[str, Any] = {"proxy": configuration.proxy or None}
    if url.startswith("https:"):
        options["ssl"] = tls(configuration)
        server_name = getattr(configuration, "tls_server_name", None)
        if server_name:
            options["server_hostname"] = server_name
    return options


async def call(
    configuration: Any, method: str, url: str, body: bytes | None, headers: dict[str, str]
) -> Reply:
    """One call to the API server. Raises ConnectionError when no reply came (refused, timed out)."""
    try:
        async with session().request(
            method, url, data=body, headers=headers, **_options(configuration, url)
        ) as response:
            data = await response.read()
            wait = retry_after(response.headers.get("Retry-After")) if response.status >= 300 else None
            return Reply(response.status, data, wait)
    except (aiohttp.ClientError, TimeoutError) as error:
        raise no_reply(method, url, error) from None


async def stream(
    configuration: Any, url: str, headers: dict[str, str], on_block: Callable[[bytes], bool], timeout: float
) -> Reply:
    """GET a streaming reply (a watch), handing each block to `on_block` as it arrives, until the
    server ends it, `timeout` seconds pass, or `on_block` returns False. The reply (with the body of
    an error reply). An exception raised by `on_block` ends the stream and is raised here.

    Blocks, not lines: aiohttp's line reader refuses lines over 64 KiB, and one watch event (a pod
    with a 1 MiB label value) can be far longer; the caller splits them (`watchcache.Lines`)."""
    limit = aiohttp.ClientTimeout(total=timeout, connect=CONNECT_TIMEOUT_SECONDS)
    try:
        async with session().get(
            url, headers=headers, timeout=limit, **_options(configuration, url)
        ) as response:
            if response.status >= 300:
                data = await response.read()
                return Reply(response.status, data, retry_after(response.headers.get("Retry-After")))
            async for block in response.content.iter_any():
                if not on_block(block):
                    break
            return Reply(response.status, b"")
    except (aiohttp.ClientError, TimeoutError) as error:
        raise no_reply("GET", url, error) from None


async def get_text(url: str, timeout: float) -> str | None:
    """GET a plain URL (a replica's /metrics, a Prometheus query): its text, None on any failure."""
    try:
        async with session().get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            if response.status >= 300:
                return None
            return await response.text()
    except (aiohttp.ClientError, TimeoutError, ValueError, UnicodeDecodeError):
        return None


def no_reply(method: str, url: str, error: BaseException) -> ConnectionError:
    """A call that got no reply, said with the call and the reason (refused, TLS, timeout)."""
    reason = str(error) or type(error).__name__
    if isinstance(error, TimeoutError):
        reason = f"no reply in time ({reason})"
    return ConnectionError(f"{method} {url}: no reply: {reason}")
