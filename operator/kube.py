"""The few Kubernetes API calls the reconcilers make, each idempotent.

Creating a child that exists and deleting one that is gone both succeed: with deterministic names,
that is what makes re-running a reconcile (or an operator restart mid-way) harmless.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

import orjson

if TYPE_CHECKING:
    from kubernetes.client import CoreV1Api, CustomObjectsApi

FIELD_MANAGER = "tandem-operator"
#: Events longer than this are cut (as kopf does): `kubectl describe` shows them whole on one line.
EVENT_MESSAGE_LIMIT = 1024
log = logging.getLogger(__name__)


@functools.cache
def api_client() -> Any:
    """One shared client: in-cluster credentials in a pod, else the current kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = 32  # handler threads x concurrent child calls
    return client.ApiClient(configuration)


@functools.cache
def api(name: str) -> Any:
    """The shared client's API class `name` (`CoreV1Api`, `AppsV1Api`, ...), made once: the client
    resolves its classes lazily, through an import on each module attribute lookup, which showed in
    profiles of the reconcile hot path."""
    from kubernetes import client

    return getattr(client, name)(api_client())


def core_api() -> CoreV1Api:
    typed: CoreV1Api = api("CoreV1Api")
    return typed


def custom_api() -> CustomObjectsApi:
    typed: CustomObjectsApi = api("CustomObjectsApi")
    return typed


def finish(reply: Any) -> bytes:
    """Read a raw reply (`_preload_content=False`) and give its connection back to the pool.

    Such a reply holds its connection until it is read and released: left alone, every call opens a new
    TLS connection (measured: 100 creates, 100 handshakes; read and released, one).
    """
    try:
        data: bytes = reply.data
        return data
    finally:
        reply.release_conn()


class Refused(Exception):
    """The API server rejected a child for a reason the user must fix (bad reference, quota, policy)."""


class Busy(Exception):
    """The API server asked us to come back later (429, or a 5xx): the reconcile retries shortly."""


def _status_of(error: Exception) -> int | None:
    return getattr(error, "status", None)


#: (group, version, plural) of the custom-resource children the operator creates.
_CUSTOM_CHILDREN = {"ServiceMonitor": ("monitoring.coreos.com", "v1", "servicemonitors")}


@functools.cache
def _creator(kind: str) -> Any:
    """The client call that creates a namespaced child of this kind: f(namespace, body, **options)."""
    if kind in _CUSTOM_CHILDREN:
        group, version, plural = _CUSTOM_CHILDREN[kind]
        custom = custom_api()
        return lambda namespace, body, **options: custom.create_namespaced_custom_object(
            group, version, namespace, plural, body, **options
        )
    core, rbac = api("CoreV1Api"), api("RbacAuthorizationV1Api")
    return {
        "Pod": core.create_namespaced_pod,
        "Service": core.create_namespaced_service,
        "ServiceAccount": core.create_namespaced_service_account,
        "Role": rbac.create_namespaced_role,
        "RoleBinding": rbac.create_namespaced_role_binding,
        "PodDisruptionBudget": api("PolicyV1Api").create_namespaced_pod_disruption_budget,
    }[kind]


def warm_up(kinds: tuple[str, ...] = ("Pod", "Service", "ServiceAccount", "Role", "RoleBinding")) -> None:
    """Load the client's API modules and models now rather than in the first reconciles.

    The client imports them on first use and builds hundreds of pydantic models as it does (about a
    second of CPU): at startup that delays readiness, later it would delay the first jobs.
    """
    for kind in kinds:
        _creator(kind)
    custom_api()


def create(manifest: Mapping[str, Any]) -> bool:
    """Create a namespaced child; False if it already exists (or its namespace is going away).

    Raises Refused on a 4xx the user must fix, Busy when the API server asks us to come back.
    """
    from kubernetes.client.exceptions import ApiException

    try:
        # _preload_content=False: the reply is not needed, and decoding it into models costs milliseconds.
        finish(
            _creator(manifest["kind"])(
                manifest["metadata"]["namespace"],
                dict(manifest),
                field_manager=FIELD_MANAGER,
                _preload_content=False,
            )
        )
    except ApiException as error:
        if _status_of(error) == 409 or _namespace_terminating(error):
            return False
        _raise_classified(error)
    return True


def _raise_classified(error: Exception) -> NoReturn:
    """Raise Refused for a 4xx the user must fix, Busy for 429 and 5xx, else the error itself."""
    status = _status_of(error) or 0
    if status in (400, 403, 404, 422):
        raise Refused(_api_message(error)) from error
    if status == 429 or status >= 500:
        raise Busy(_api_message(error)) from error
    raise error


def _namespace_terminating(error: Exception) -> bool:
    """The namespace is being deleted: its objects are going away, nothing to create there."""
    return _status_of(error) == 403 and "NamespaceTerminating" in str(getattr(error, "body", ""))


def _api_message(error: Exception) -> str:
    try:
        return str(json.loads(getattr(error, "body", "") or "{}").get("message") or error)
    except ValueError:
        return str(error)


def delete_pod(namespace: str, name: str) -> bool:
    """Delete a pod (graceful: the driver gets SIGTERM and checkpoints); False if it was gone."""
    from kubernetes.client.exceptions import ApiException

    try:
        finish(core_api().delete_namespaced_pod(name, namespace, _preload_content=False))
    except ApiException as error:
        if _status_of(error) == 404:
            return False
        raise
    return True


def list_bound_pods() -> list[dict[str, Any]]:
    """Every pod bound to a node, cluster-wide, as plain dicts."""

    reply: Any = core_api().list_pod_for_all_namespaces(
        field_selector="spec.nodeName!=", _preload_content=False
    )
    return list(orjson.loads(finish(reply))["items"])


def delete_custom_object(group: str, version: str, plural: str, namespace: str, name: str) -> bool:
    """Delete one of Tandem's resources (children follow through ownerReferences); False if gone."""
    from kubernetes.client.exceptions import ApiException

    try:
        finish(
            custom_api().delete_namespaced_custom_object(
                group,
                version,
                namespace,
                plural,
                name,
                propagation_policy="Background",
                _preload_content=False,
            )
        )
    except ApiException as error:
        if _status_of(error) == 404:
            return False
        raise
    return True


# ------------------------------------------------------------------------------------------------
# InferenceService children
# ------------------------------------------------------------------------------------------------


def apply_deployment(manifest: Mapping[str, Any]) -> None:
    """Server-side apply a Deployment as the operator's one field manager (forcing its own fields).

    Raises Refused on a 4xx the user must fix (e.g. a quota or an admission policy).
    """
    from kubernetes.client.exceptions import ApiException

    meta = manifest["metadata"]
    try:
        finish(
            api("AppsV1Api").patch_namespaced_deployment(
                meta["name"],
                meta["namespace"],
                dict(manifest),
                field_manager=FIELD_MANAGER,
                force=True,
                _content_type="application/apply-patch+yaml",
                _preload_content=False,
            )
        )
    except ApiException as error:
        if _namespace_terminating(error):
            return
        _raise_classified(error)


def crd_exists(name: str) -> bool:
    """Whether a CustomResourceDefinition (e.g. `servicemonitors.monitoring.coreos.com`) is installed."""
    from kubernetes.client.exceptions import ApiException

    try:
        finish(api("ApiextensionsV1Api").read_custom_resource_definition(name, _preload_content=False))
    except ApiException as error:
        if _status_of(error) == 404:
            return False
        raise
    return True


def scale_custom_object(
    group: str, version: str, plural: str, namespace: str, name: str, replicas: int
) -> None:
    """Set a custom resource's replica count through its scale subresource (as `kubectl scale` does)."""

    finish(
        custom_api().patch_namespaced_custom_object_scale(
            group,
            version,
            namespace,
            plural,
            name,
            {"spec": {"replicas": replicas}},
            field_manager=FIELD_MANAGER,
            _preload_content=False,
        )
    )


def patch_custom_object_status(
    group: str, version: str, plural: str, namespace: str, name: str, status: Mapping[str, Any]
) -> dict[str, Any]:
    """Merge-patch a custom resource's status subresource (fields not named are left alone).

    Returns the object as stored after the patch.
    """

    reply: Any = custom_api().patch_namespaced_custom_object_status(
        group, version, namespace, plural, name, {"status": dict(status)}, _preload_content=False
    )
    stored: dict[str, Any] = orjson.loads(finish(reply))
    return stored


def post_event(obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
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
        "message": message[:EVENT_MESSAGE_LIMIT],
        "source": {"component": FIELD_MANAGER},
        "reportingComponent": FIELD_MANAGER,
        "reportingInstance": FIELD_MANAGER,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    core: Any = core_api()  # the stubs want a model; a dict is what the client sends
    try:
        finish(core.create_namespaced_event(meta["namespace"], event, _preload_content=False))
    except (ApiException, OSError) as error:
        log.warning("could not post event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], error)
