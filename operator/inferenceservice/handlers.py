"""kopf glue for InferenceService: indexes of its children and of TrainingJobs, a reconcile timer, and
the autoscaler daemon.

The timer runs `reconcile.decide` on what the indexes hold (no API reads per reconcile), then carries
out the decision: server-side apply the Deployment when its hash changed, create missing children,
post events, patch status when it changed. The daemon (one per service, asyncio) reads load every
`autoscaler_tick_seconds`, writes `status.metrics`, and in builtin mode writes its decisions to
`spec.replicas.count` through the scale subresource.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf

from tandem.operator import autoscaler, kube
from tandem.operator.api.common import GROUP, VERSION
from tandem.operator.api.inferenceservice import (
    KIND,
    PLURAL,
    AutoscalingMode,
    ConditionType,
    InferenceServicePhase,
    InferenceServiceSpec,
    InferenceServiceStatus,
)
from tandem.operator.autoscaler_metrics import Load, Scraper, promql, query_prometheus, rounded
from tandem.operator.config import OperatorSettings
from tandem.operator.handlers_common import (
    WarningsOnce,
    parse_spec_or_reject,
    status_patch,
    with_refusal,
)
from tandem.operator.inferenceservice.builders import SERVICE_LABEL, Service
from tandem.operator.inferenceservice.observe import (
    ObservedDeployment,
    ObservedReplica,
    ObservedTrainingJob,
    observe_deployment,
    observe_replica,
    observe_trainingjob,
)
from tandem.operator.inferenceservice.reconcile import Decision, Observed, ScalingInfo, decide
from tandem.operator.metrics import timed_reconcile
from tandem.operator.watchcache import WatchCache, owned

RECONCILE_INTERVAL_SECONDS = 2.0
SERVICE_MONITOR_CRD = "servicemonitors.monitoring.coreos.com"
#: How long the answer to "is the ServiceMonitor CRD installed?" is reused.
CRD_CHECK_SECONDS = 300.0
#: status.metrics is written at most this often (and when a scaling decision is made).
METRICS_WRITE_SECONDS = 5.0
log = logging.getLogger(__name__)

#: The autoscaler's last word per service uid, read by the reconcile timer (ScalingActive condition).
_scaling: dict[str, ScalingInfo] = {}
_warnings = WarningsOnce()
_crd_cache: dict[str, tuple[float, bool]] = {}
_service_monitors: set[str] = set()


# -- indexes ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Caches:
    """What the operator watches of the services' children, each selected by label on the server
    (kopf would stream every Deployment, Service and PDB in the cluster through its machinery)."""

    replicas: WatchCache[ObservedReplica]
    deployments: WatchCache[ObservedDeployment]
    services: WatchCache[str]
    pdbs: WatchCache[str]

    def all(self) -> tuple[WatchCache[Any], ...]:
        return self.replicas, self.deployments, self.services, self.pdbs


@kopf.on.startup()
def start_caches(memo: kopf.Memo, **_: Any) -> None:
    """Watch the services' replicas, Deployments, Services and PDBs into lean caches."""
    namespaces = memo.settings.namespaces
    memo.isvc_caches = Caches(
        replicas=owned("v1", "pods", SERVICE_LABEL, observe_replica, namespaces),
        deployments=owned("apps/v1", "deployments", SERVICE_LABEL, observe_deployment, namespaces),
        services=owned("v1", "services", SERVICE_LABEL, _kind("Service"), namespaces),
        pdbs=owned(
            "policy/v1", "poddisruptionbudgets", SERVICE_LABEL, _kind("PodDisruptionBudget"), namespaces
        ),
    )
    for cache in memo.isvc_caches.all():
        cache.start()


def _kind(kind: str) -> Callable[[Mapping[str, Any]], str]:
    """An observation that says only that a child of this kind exists."""
    return lambda _: kind


@kopf.on.cleanup()
def stop_caches(memo: kopf.Memo, **_: Any) -> None:
    for cache in memo.isvc_caches.all():
        cache.stop()


def training_job(cache: WatchCache[dict[str, Any]], namespace: str, name: str) -> ObservedTrainingJob | None:
    """The TrainingJob a service serves, from the TrainingJob controller's watch cache."""
    bodies = cache.get((namespace, name))
    return observe_trainingjob(bodies[0]) if bodies else None


def service_monitor_crd() -> bool:
    """Whether the Prometheus Operator's ServiceMonitor CRD exists (asked at most every 5 minutes)."""
    now = time.monotonic()
    cached = _crd_cache.get(SERVICE_MONITOR_CRD)
    if cached is None or now - cached[0] > CRD_CHECK_SECONDS:
        cached = (now, kube.crd_exists(SERVICE_MONITOR_CRD))
        _crd_cache[SERVICE_MONITOR_CRD] = cached
    return cached[1]


# -- reconcile -------------------------------------------------------------------------------------


def apply(decision: Decision, body: kopf.Body, uid: str) -> str | None:
    """Carry out a decision; return why the API server refused a child, if it did. Idempotent."""
    refused = None
    for manifest in decision.create:
        child = f"{manifest['kind']} {manifest['metadata']['name']}"
        try:
            if kube.create(manifest):
                log.info("created %s in %s", child, manifest["metadata"]["namespace"])
            if manifest["kind"] == "ServiceMonitor":
                _service_monitors.add(uid)
        except kube.Refused as error:
            refused = refused or f"the API server refused {child}: {error}"
    if decision.apply is not None:
        try:
            kube.apply(decision.apply)
        except kube.Refused as error:
            refused = (
                refused or f"the API server refused Deployment {decision.apply['metadata']['name']}: {error}"
            )
    for event in decision.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
    if refused:
        _warnings.warn(body, uid, "CreateFailed", refused)
    return refused


@kopf.timer(GROUP, VERSION, PLURAL, interval=RECONCILE_INTERVAL_SECONDS)
def reconcile_inferenceservice(
    body: kopf.Body,
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    patch: kopf.Patch,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Converge the children to the spec, and the status to what the children report."""
    with timed_reconcile(KIND):
        settings: OperatorSettings = memo.settings
        namespace, name, uid = str(meta["namespace"]), str(meta["name"]), str(meta["uid"])
        generation = int(meta.get("generation") or 0)
        if meta.get("deletionTimestamp"):
            return
        caches: Caches = memo.isvc_caches
        trainingjobs: WatchCache[dict[str, Any]] = memo.trainingjob_cache
        if not all(cache.synced for cache in (*caches.all(), trainingjobs)):
            return  # before the first lists, a missing child or TrainingJob proves nothing
        service_spec = parse_spec_or_reject(
            InferenceServiceSpec, body, spec, status, generation, patch, InferenceServicePhase.FAILED.value
        )
        service = Service(name, namespace, uid, service_spec, service_spec.image or settings.serving_image)
        key = (namespace, name)
        ref = service_spec.model.training_job_ref
        with_monitor = service_monitor_crd()
        children = frozenset(
            caches.services.get(key)
            + caches.pdbs.get(key)
            + (["ServiceMonitor"] if uid in _service_monitors else [])
        )
        observed = Observed(
            deployment=next(iter(caches.deployments.get(key)), None),
            replicas=caches.replicas.get(key),
            training_job=training_job(trainingjobs, namespace, ref.name) if ref else None,
            children=children,
            service_monitor_crd=with_monitor,
            scaling=_scaling.get(uid),
        )
        current = InferenceServiceStatus.model_validate(dict(status))
        decision = decide(service, generation, current, observed, datetime.now(UTC), settings)
        refused = apply(decision, body, uid)
        new_status = decision.status
        if refused:
            new_status = with_refusal(new_status, ConditionType.READY, refused, generation)
        changes = status_patch(dict(status), new_status.to_dict())
        # status.metrics belongs to the autoscaler daemon: never overwrite it from a stale view.
        changes.pop("metrics", None)
        if changes:
            patch.status.update(changes)


# A raw event handler, not on.delete, which would make kopf write a diff-base annotation per service.
@kopf.on.event(GROUP, VERSION, PLURAL)
def forget_inferenceservice(type: str, meta: kopf.Meta, **_: Any) -> None:
    """Children go with the service (ownerReferences); only in-memory bookkeeping is dropped here."""
    if type != "DELETED":
        return
    uid = str(meta.get("uid"))
    _scaling.pop(uid, None)
    _service_monitors.discard(uid)
    _warnings.forget(uid)


# -- autoscaler ------------------------------------------------------------------------------------


@dataclass
class _Scaling:
    """One service's autoscaler memory: the metric series, the decision state, the scraper."""

    samples: list[autoscaler.Sample] = field(default_factory=list)
    state: autoscaler.State = field(default_factory=autoscaler.State)
    scraper: Scraper = field(default_factory=Scraper)
    written: dict[str, float] = field(default_factory=dict)
    written_at: float = 0.0
    policy_key: tuple[Any, ...] = ()


@dataclass(frozen=True)
class _Outcome:
    """What one autoscaler tick did, for the coroutine to report (events are posted on the loop)."""

    events: list[tuple[str, str, str]]
    scaling: ScalingInfo | None


def policy(spec: InferenceServiceSpec, settings: OperatorSettings) -> autoscaler.Policy:
    """The autoscaler policy of a service, from spec.autoscaling and spec.replicas."""
    scaling = spec.autoscaling
    assert scaling is not None
    metric = scaling.metric.value
    return autoscaler.Policy(
        metric=metric,
        target=scaling.target or autoscaler.DEFAULT_TARGETS[metric],
        stable_window=float(scaling.stable_window_seconds),
        panic_window=float(scaling.panic_window_seconds),
        scale_down_delay=float(scaling.scale_down_delay_seconds),
        max_scale_up_rate=scaling.max_scale_up_rate,
        min_replicas=spec.replicas.min,
        max_replicas=spec.replicas.max,
    )


def read_load(
    settings: OperatorSettings, namespace: str, name: str, ready: list[tuple[str, str]], memory: _Scaling
) -> Load:
    if settings.prometheus_url:
        return query_prometheus(settings.prometheus_url, promql(namespace, name))
    if not ready:
        return Load()
    return memory.scraper.scrape(ready, time.monotonic())


def autoscale_tick(
    settings: OperatorSettings,
    namespace: str,
    name: str,
    spec: Mapping[str, Any],
    replicas: list[ObservedReplica],
    memory: _Scaling,
) -> _Outcome:
    """One autoscaler step for one service (blocking I/O; run off the event loop)."""
    try:
        service_spec = InferenceServiceSpec.model_validate(dict(spec))
    except ValueError:
        return _Outcome([], None)  # the reconcile timer reports an invalid spec
    if service_spec.suspend:
        memory.samples.clear()
        memory.state = autoscaler.State()
        return _Outcome([], ScalingInfo(False, "Suspended", "suspended: not scaling"))
    ready = [(r.name, r.ip) for r in replicas if r.ready and r.ip and not r.deleting]
    now = time.monotonic()
    load = read_load(settings, namespace, name, ready, memory)
    metrics = rounded(load)
    if metrics and (metrics != memory.written and now - memory.written_at >= METRICS_WRITE_SECONDS):
        kube.patch_custom_object_status(GROUP, VERSION, PLURAL, namespace, name, {"metrics": metrics})
        memory.written, memory.written_at = metrics, now
    scaling = service_spec.autoscaling
    if scaling is None or scaling.mode is AutoscalingMode.EXTERNAL:
        return _Outcome([], None)
    rules = policy(service_spec, settings)
    key = (rules,)
    if key != memory.policy_key:  # a changed policy starts a fresh history
        memory.samples.clear()
        memory.state = autoscaler.State()
        memory.policy_key = key
    value = load.value(rules.metric)
    if value is not None:
        memory.samples.append(autoscaler.Sample(now, value, max(load.replicas, len(ready))))
    memory.samples = autoscaler.prune(memory.samples, now, rules)
    count = service_spec.replicas.count
    current = service_spec.replicas.clamp()
    decision = autoscaler.decide(rules, memory.samples, now, current, len(ready), memory.state)
    memory.state = decision.state
    events: list[tuple[str, str, str]] = []
    text = decision.describe(rules, current)
    if decision.replicas != count:
        kube.scale_custom_object(GROUP, VERSION, PLURAL, namespace, name, decision.replicas)
        events.append(("Normal", "Scaled", text))
        log.info("%s/%s: %s", namespace, name, text)
    if decision.stable_value is None:
        return _Outcome(events, ScalingInfo(False, "NoMetrics", text))
    return _Outcome(events, ScalingInfo(True, decision.reason, text))


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10.0)
async def autoscale_inferenceservice(
    stopped: kopf.DaemonStopped,
    body: kopf.Body,
    spec: kopf.Spec,
    meta: kopf.Meta,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Read load and (builtin mode) scale, every autoscaler_tick_seconds, until the service goes."""
    settings: OperatorSettings = memo.settings
    namespace, name, uid = str(meta["namespace"]), str(meta["name"]), str(meta["uid"])
    memory = _Scaling()
    loop = asyncio.get_running_loop()
    while not stopped:
        replicas = memo.isvc_caches.replicas.get((namespace, name))
        try:
            outcome = await loop.run_in_executor(
                None, autoscale_tick, settings, namespace, name, dict(body.spec), replicas, memory
            )
        except Exception as error:  # one bad tick (API hiccup, Prometheus down) must not end the loop
            log.warning("autoscaler %s/%s: %s", namespace, name, error)
        else:
            for type_, reason, message in outcome.events:
                kopf.event(body, type=type_, reason=reason, message=message)
            if outcome.scaling is not None:
                _scaling[uid] = outcome.scaling
        await stopped.wait(settings.autoscaler_tick_seconds)
