"""The few Kubernetes API calls the reconcilers make, each idempotent, as coroutines on the
operator's one event loop (the HTTP client is `kubehttp`: aiohttp, not kopf's session; it says why).

Creating a child that exists and deleting one that is gone both succeed: with deterministic names,
that is what makes re-running a reconcile (or an operator restart mid-way) harmless.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, NoReturn
from urllib.parse import urlencode

import orjson

from tandem.operator import kubehttp
from tandem.operator.kubehttp import Reply
from tandem.operator.metrics import API_SECONDS
from tandem.operator.workqueue import TryAgain

FIELD_MANAGER = "tandem-operator"
USER_AGENT = "tandem-operator"
#: Messages written into a condition or an event are cut to this many characters (as kopf cuts
#: events): `kubectl describe` shows them whole on one line, and an API server's refusal can quote a
#: field value of a megabyte (a 1 MiB nodeSelector value once made every status write fail).
MESSAGE_LIMIT = 1024
EVENT_MESSAGE_LIMIT = MESSAGE_LIMIT
log = logging.getLogger(__name__)


@functools.cache
def configuration() -> Any:
    """The kubernetes client's configuration (server, CA, credentials): in-cluster credentials in a
    pod, else the current kubeconfig. Only its settings are used; calls go through `kubehttp`.
    Synchronous (it reads files): called once, before the loop serves calls (`warm_up`)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        # KUBECONFIG as it is now (the client reads its default when first imported).
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)  # type: ignore[no-untyped-call]
    return client.Configuration.get_default_copy()


#: The plural of each kind the operator creates or watches (the last part of its collection's path).
PLURALS = {
    "Pod": "pods",
    "Service": "services",
    "ServiceAccount": "serviceaccounts",
    "Event": "events",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "Deployment": "deployments",
    "EndpointSlice": "endpointslices",
    "ServiceMonitor": "servicemonitors",
    "NetworkPolicy": "networkpolicies",
    "PodGroup": "podgroups",
}


def api_path(
    api_version: str,
    plural: str,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """The URL path of a collection (`/api/v1/namespaces/NS/pods`; all namespaces without one), or
    of one object in it, or of that object's subresource (`.../NAME/status`)."""
    root = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
    path = f"{root}/namespaces/{namespace}/{plural}" if namespace else f"{root}/{plural}"
    for part in (name, subresource):
        if part:
            path += f"/{part}"
    return path


async def request(
    method: str,
    path: str,
    body: Any = None,
    *,
    query: Mapping[str, str] | None = None,
    content_type: str = "application/json",
) -> bytes:
    """One API call with the client configuration's credentials, JSON in and out; the reply's bytes.

    The generated client's per-call work (argument validation, recursive body sanitising, model
    lookups) cost more than the HTTP call itself on the operator's hot path, thousands of times a
    minute, and it blocks a thread per call. Raises the client's ApiException on an error status, as
    the generated calls do; ConnectionError when no reply came.
    """
    data = orjson.dumps(body) if body is not None else None

    async def call(url: str, headers: dict[str, str]) -> Reply:
        if data is not None:
            headers["Content-Type"] = content_type
        return await kubehttp.call(configuration(), method, url, data, headers)

    started = time.perf_counter()
    try:
        return await _authenticated(path, query, call)
    finally:
        API_SECONDS.labels(verb=method).observe(time.perf_counter() - started)


async def watch(
    path: str, query: Mapping[str, str], on_block: Callable[[bytes], bool], timeout: float
) -> None:
    """Stream a watch, handing each block of its reply to `on_block` until the server ends it after
    `timeout` seconds (a `timeoutSeconds` in `query` ends it sooner) or `on_block` returns False.
    Raises as `request` does."""

    async def stream(url: str, headers: dict[str, str]) -> Reply:
        return await kubehttp.stream(configuration(), url, headers, on_block, timeout)

    await _authenticated(path, query, stream)


async def _authenticated(
    path: str, query: Mapping[str, str] | None, send: Callable[[str, dict[str, str]], Awaitable[Reply]]
) -> bytes:
    """Send with the cached server address and credentials; on a 401 (a token that expired within the
    cache's lifetime) once more with fresh ones. The reply's bytes; ApiException on an error status,
    with `retry_after` (seconds or None) set from the reply (see `retry_after_of`)."""
    from kubernetes.client.exceptions import ApiException

    for attempt in (1, 2):
        host, credentials = await _endpoint.get(fresh=attempt > 1)
        url = host + path + (f"?{urlencode(query)}" if query else "")
        reply = await send(url, dict(credentials))
        if reply.status == 401 and attempt == 1:
            continue
        if reply.status >= 300:
            detail = reply.body.decode(errors="replace")
            error = ApiException(status=reply.status, reason=_phrase(reply.status), body=detail)
            # An attribute on the client's own exception, so that every caller catching ApiException
            # keeps working; the work queue reads it (`retry_after_of`).
            wait = reply.retry_after if reply.retry_after is not None else _retry_after(detail)
            setattr(error, "retry_after", wait)  # noqa: B010
            raise error
        return reply.body
    raise AssertionError("unreachable")


def _retry_after(body: str) -> float | None:
    """A Status reply's `details.retryAfterSeconds` (the API server sets it with a Retry-After header
    on 429s and timeouts; the header wins when both came)."""
    try:
        details = (json.loads(body) or {}).get("details") or {}
        seconds = details.get("retryAfterSeconds")
    except (ValueError, AttributeError):
        return None
    return float(seconds) if isinstance(seconds, int | float) and seconds > 0 else None


def retry_after_of(error: BaseException) -> float | None:
    """The seconds an error reply asked us to wait before trying again (Retry-After), else None."""
    value = getattr(error, "retry_after", None)
    return float(value) if isinstance(value, int | float) else None


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:  # a code the standard does not name
        return ""


#: How long the server address and credential headers are reused before the client is asked again.
AUTH_REFRESH_SECONDS = 30.0


class _Endpoint:
    """The API server's URL and the request headers with credentials, asked of the client at most
    every AUTH_REFRESH_SECONDS: its kubeconfig loader re-reads its whole configuration on each ask
    (to refresh an expiring token), which showed in profiles at thousands of calls a minute.

    The ask runs in a thread (`asyncio.to_thread`), once for every caller waiting on it: the loader is
    synchronous and may run a kubeconfig exec plugin, which must not stall the event loop."""

    def __init__(self) -> None:
        self._asked = float("-inf")
        self._host = ""
        self._headers: dict[str, str] = {}
        self._asking: asyncio.Future[None] | None = None

    async def get(self, fresh: bool = False) -> tuple[str, dict[str, str]]:
        if fresh or time.monotonic() - self._asked > AUTH_REFRESH_SECONDS:
            asking = self._asking
            if (
                fresh
                or asking is None
                or asking.done()
                or asking.get_loop() is not asyncio.get_running_loop()
            ):
                asking = self._asking = asyncio.ensure_future(asyncio.to_thread(self._ask))
            await asyncio.shield(asking)
        return self._host, self._headers

    def _ask(self) -> None:
        settings = configuration()
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        for auth in settings.auth_settings().values():  # refreshes an expiring token
            if auth["in"] == "header" and auth["value"]:
                headers[auth["key"]] = auth["value"]
        self._asked, self._host, self._headers = time.monotonic(), settings.host, headers


_endpoint = _Endpoint()


def bounded(message: str, limit: int = MESSAGE_LIMIT) -> str:
    """`message` cut to `limit` characters, saying how much was cut: what goes into a condition or an
    event (the API server's own messages quote the values it refused, of any size)."""
    if len(message) <= limit:
        return message
    kept = max(limit - len(f"... ({len(message)} more characters)"), 0)
    return f"{message[:kept]}... ({len(message) - kept} more characters)"


class Refused(Exception):
    """The API server refused a child for a reason the user must fix: permanent, retrying cannot help.

    400 BadRequest, 422 Invalid (a value the API server rejects), 403 Forbidden (an admission policy,
    RBAC), 404 NotFound (a kind or namespace that is not there). `reason` is the Status reason
    (`Invalid`, `Forbidden`, ...), `field` the first field the API server named (e.g.
    `spec.nodeSelector`), the message bounded (see `bounded`).
    """

    def __init__(self, message: str, *, status: int = 0, reason: str = "", field: str = "") -> None:
        super().__init__(bounded(message))
        self.status, self.reason, self.field = status, reason, field


class Busy(TryAgain):
    """The API server asked us to come back later (409 on a write, 429, a 5xx, an exceeded quota) or
    did not answer: the work queue tries the key again with backoff, no sooner than Retry-After."""


def _status_of(error: Exception) -> int | None:
    return getattr(error, "status", None)


def warm_up() -> None:
    """Load the client's configuration and modules now rather than in the first reconciles (at
    startup, before the caches and queues run: it reads files)."""
    configuration()
    from kubernetes.client.exceptions import ApiException  # noqa: F401


async def create(manifest: Mapping[str, Any]) -> bool:
    """Create a namespaced child; False if it already exists (or its namespace is going away).

    Raises Refused on a 4xx the user must fix, Busy when the API server asks us to come back.
    """
    from kubernetes.client.exceptions import ApiException

    path = api_path(manifest["apiVersion"], PLURALS[manifest["kind"]], manifest["metadata"]["namespace"])
    try:
        await request("POST", path, manifest, query={"fieldManager": FIELD_MANAGER})
    except ApiException as error:
        if _status_of(error) == 409 or _namespace_terminating(error):
            return False
        _raise_classified(error)
    except ConnectionError as error:
        raise Busy(str(error)) from error
    return True


#: Refusals that retrying cannot cure: the object or the request is what is wrong.
PERMANENT_STATUSES = frozenset({400, 403, 404, 422})


def _raise_classified(error: Exception) -> NoReturn:
    """Raise Refused for a refusal retrying cannot cure, Busy for one that may pass (409 Conflict,
    429, 5xx, an exceeded ResourceQuota, which is a 403 until something else frees the quota)."""
    status = _status_of(error) or 0
    message = _api_message(error)
    if status in PERMANENT_STATUSES and not _quota_exceeded(error):
        reason, field = _status_cause(error)
        raise Refused(message, status=status, reason=reason, field=field) from error
    if status in (409, 429) or status >= 500 or _quota_exceeded(error):
        raise Busy(bounded(message), retry_after=retry_after_of(error)) from error
    raise error


def _quota_exceeded(error: Exception) -> bool:
    return _status_of(error) == 403 and "exceeded quota" in str(getattr(error, "body", ""))


def _status_cause(error: Exception) -> tuple[str, str]:
    """The Status reply's reason (`Invalid`) and the first field its causes name (`spec.nodeSelector`)."""
    try:
        status = json.loads(getattr(error, "body", "") or "{}")
        causes = (status.get("details") or {}).get("causes") or []
        field = next((str(c["field"]) for c in causes if c.get("field")), "")
        return str(status.get("reason") or ""), field
    except (ValueError, AttributeError, TypeError):
        return "", ""


def _namespace_terminating(error: Exception) -> bool:
    """The namespace is being deleted: its objects are going away, nothing to create there."""
    return _status_of(error) == 403 and "NamespaceTerminating" in str(getattr(error, "body", ""))


def _api_message(error: Exception) -> str:
    try:
        return str(json.loads(getattr(error, "body", "") or "{}").get("message") or error)
    except ValueError:
        return str(error)


async def _found(method: str, path: str, query: Mapping[str, str] | None = None) -> bool:
    """Make the call; False if the object is not there (404), which for a delete is success too."""
    from kubernetes.client.exceptions import ApiException

    try:
        await request(method, path, query=query)
    except ApiException as error:
        if _status_of(error) == 404:
            return False
        raise
    return True


async def delete_pod(namespace: str, name: str) -> bool:
    """Delete a pod (graceful: the driver gets SIGTERM and checkpoints); False if it was gone."""
    return await _found("DELETE", api_path("v1", "pods", namespace, name))


async def list_bound_pods() -> list[dict[str, Any]]:
    """Every pod bound to a node, cluster-wide, as plain dicts."""

    reply = await request("GET", api_path("v1", "pods"), query={"fieldSelector": "spec.nodeName!="})
    return list(orjson.loads(reply)["items"])


async def delete_custom_object(group: str, version: str, plural: str, namespace: str, name: str) -> bool:
    """Delete one of Tandem's resources (children follow through ownerReferences); False if gone."""
    path = api_path(f"{group}/{version}", plural, namespace, name)
    return await _found("DELETE", path, query={"propagationPolicy": "Background"})


async def apply(manifest: Mapping[str, Any]) -> None:
    """Server-side apply a namespaced object as the operator's one field manager (forcing its fields):
    created if missing, else made to match; fields others own are kept.

    Raises Refused on a 4xx the user must fix (e.g. a quota or an admission policy), Busy when the
    API server asks us to come back.
    """
    from kubernetes.client.exceptions import ApiException

    meta = manifest["metadata"]
    path = api_path(manifest["apiVersion"], PLURALS[manifest["kind"]], meta["namespace"], meta["name"])
    try:
        await request(
            "PATCH",
            path,
            manifest,
            query={"fieldManager": FIELD_MANAGER, "force": "true"},
            content_type="application/apply-patch+yaml",  # JSON is YAML
        )
    except ApiException as error:
        if _namespace_terminating(error):
            return
        _raise_classified(error)
    except ConnectionError as error:
        raise Busy(str(error)) from error


async def crd_exists(name: str) -> bool:
    """Whether a CustomResourceDefinition (e.g. `servicemonitors.monitoring.coreos.com`) is installed."""
    return await _found("GET", api_path("apiextensions.k8s.io/v1", "customresourcedefinitions", name=name))


async def scale_custom_object(
    group: str, version: str, plural: str, namespace: str, name: str, replicas: int
) -> None:
    """Set a custom resource's replica count through its scale subresource (as `kubectl scale` does)."""

    path = api_path(f"{group}/{version}", plural, namespace, name, "scale")
    await request(
        "PATCH",
        path,
        {"spec": {"replicas": replicas}},
        query={"fieldManager": FIELD_MANAGER},
        content_type="application/merge-patch+json",
    )


async def remove_finalizer(obj: Mapping[str, Any], plural: str, finalizer: str) -> None:
    """Take `finalizer` off one of Tandem's resources, as last seen (a JSON patch that first tests the
    entry is still where it was seen: a concurrent change fails it, 422, and the caller retries)."""
    meta = obj["metadata"]
    index = list(meta.get("finalizers") or ()).index(finalizer)
    path = api_path(str(obj["apiVersion"]), plural, meta["namespace"], meta["name"])
    ops = [
        {"op": "test", "path": f"/metadata/finalizers/{index}", "value": finalizer},
        {"op": "remove", "path": f"/metadata/finalizers/{index}"},
    ]
    await request("PATCH", path, ops, content_type="application/json-patch+json")


async def patch_custom_object_status(
    group: str, version: str, plural: str, namespace: str, name: str, status: Mapping[str, Any]
) -> dict[str, Any]:
    """Merge-patch a custom resource's status subresource (fields not named are left alone).

    Returns the object as stored after the patch.
    """

    path = api_path(f"{group}/{version}", plural, namespace, name, "status")
    reply = await request(
        "PATCH", path, {"status": dict(status)}, content_type="application/merge-patch+json"
    )
    stored: dict[str, Any] = orjson.loads(reply)
    return stored


async def post_event(obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    """Post a core/v1 Event about `obj` (what `kubectl describe` lists). Best effort: a failure is
    logged, never raised, so that a busy API server cannot fail the reconcile that reported it."""
    from kubernetes.client.exceptions import ApiException

    meta = obj["metadata"]
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    event: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": obj.get("apiVersion"),
            "kind": obj.get("kind"),
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
        },
        "type": type_,
        "reason": reason,
        "message": bounded(message),
        "source": {"component": FIELD_MANAGER},
        "reportingComponent": FIELD_MANAGER,
        "reportingInstance": FIELD_MANAGER,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    try:
        await request("POST", api_path("v1", "events", meta["namespace"]), event)
    except (ApiException, OSError) as error:
        log.warning("could not post event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], error)


#: Run a coroutine of these calls to the end on a new loop, closing its session (the CLI's way in).
run = kubehttp.run
#: Close the running loop's session (the operator's cleanup).
close = kubehttp.close
