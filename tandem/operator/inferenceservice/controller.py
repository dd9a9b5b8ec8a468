"""The InferenceService controller: lean watch caches of the services and their children, a keyed work
queue, and one autoscaler task per service.

A service is reconciled when it or one of its children changes, and every RECONCILE_INTERVAL_SECONDS
(readiness, metrics and the served TrainingJob's checkpoints move on their own). A reconcile runs
`reconcile.decide` on what the caches hold (no API reads), then carries out the decision: server-side
apply the Deployment when its hash changed, create missing children, post events, patch status when it
changed. The autoscaler task reads load every `autoscaler_tick_seconds`, writes `status.metrics`, and
in builtin mode writes its decisions to `spec.replicas.count` through the scale subresource.

No kopf timer or daemon: they put a finalizer on every service, so that deleting one hung while the
operator was down (`tandem/operator/workqueue.py`). All of it runs on kopf's event loop; what the
controller remembers lives on the `Controller` in kopf's memo, not in module globals.
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

from tandem.api.common import GROUP, VERSION
from tandem.api.inferenceservice import (
    KIND,
    PLURAL,
    AutoscalingMode,
    ConditionType,
    InferenceServicePhase,
    InferenceServiceSpec,
    InferenceServiceStatus,
)
from tandem.operator import autoscaler, kube
from tandem.operator.autoscaler_metrics import Load, Scraper, promql, query_prometheus, rounded
from tandem.operator.config import OperatorSettings
from tandem.operator.controller_common import (
    CREATE_REFUSED,
    BodyStore,
    InvalidSpec,
    WarningsOnce,
    refusal_message,
    refused_at,
    release_kopf_finalizer,
    status_patch,
    validated_spec,
    with_refusal,
)
from tandem.operator.cost_usage import UsageSource
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
from tandem.operator.leader import when_leading
from tandem.operator.metrics import timed_reconcile, watch_queue
from tandem.operator.status_metrics import STATUS_METRICS, serving_row
from tandem.operator.watchcache import Key, WatchCache, by_name, custom_objects, owned
from tandem.operator.workqueue import WorkQueue

RECONCILE_INTERVAL_SECONDS = 2.0
SERVICE_MONITOR_CRD = "servicemonitors.monitoring.coreos.com"
#: How long the answer to "is the ServiceMonitor CRD installed?" is reused.
CRD_CHECK_SECONDS = 300.0
#: status.metrics is written at most this often (and when a scaling decision is made).
METRICS_WRITE_SECONDS = 5.0
log = logging.getLogger(__name__)

#: Services reconciled at the same time (work queue workers).
RECONCILE_WORKERS = 4


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


def _kind(kind: str) -> Callable[[Mapping[str, Any]], str]:
    """An observation that says only that a child of this kind exists."""
    return lambda _: kind


def training_job(cache: WatchCache[dict[str, Any]], namespace: str, name: str) -> ObservedTrainingJob | None:
    """The TrainingJob a service serves, from the TrainingJob controller's watch cache."""
    bodies = cache.get((namespace, name))
    return observe_trainingjob(bodies[0]) if bodies else None


class CrdCheck:
    """Whether the Prometheus Operator's ServiceMonitor CRD exists (asked at most every 5 minutes)."""

    def __init__(self) -> None:
        self._asked: tuple[float, bool] | None = None

    async def __call__(self) -> bool:
        now = time.monotonic()
        if self._asked is None or now - self._asked[0] > CRD_CHECK_SECONDS:
            self._asked = (now, await kube.crd_exists(SERVICE_MONITOR_CRD))
        return self._asked[1]


# -- reconcile -------------------------------------------------------------------------------------


async def apply(
    decision: Decision, body: Mapping[str, Any], uid: str, monitors: set[str], warnings: WarningsOnce
) -> str | None:
    """Carry out a decision; return why the API server refused a child for good (which child, which
    field, bounded), if it did. Idempotent. A busy API server raises kube.Busy (the queue backs off).
    `monitors`: the uids of the services whose ServiceMonitor is in place."""
    refused = None
    for manifest in decision.create:
        child = f"{manifest['kind']} {manifest['metadata']['name']}"
        try:
            if await kube.create(manifest):
                log.info("created %s in %s", child, manifest["metadata"]["namespace"])
            if manifest["kind"] == "ServiceMonitor":
                monitors.add(uid)
        except kube.Refused as error:
            refused = refused or refusal_message(child, error)
    # A refused Service or PDB: no Deployment either (replicas must not run unreachable behind a
    # Failed service). A refused Deployment of a new spec leaves the one of the last good spec serving.
    if decision.apply is not None and refused is None:
        try:
            await kube.apply(decision.apply)
        except kube.Refused as error:
            refused = refused or refusal_message(f"Deployment {decision.apply['metadata']['name']}", error)
    for event in decision.events:
        await kube.post_event(body, event.type, event.reason, event.message)
    if refused:
        await warnings.warn(body, uid, CREATE_REFUSED, refused)
    return refused


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


async def read_load(
    settings: OperatorSettings, namespace: str, name: str, ready: list[tuple[str, str]], memory: _Scaling
) -> Load:
    if settings.prometheus_url:
        return await query_prometheus(settings.prometheus_url, promql(namespace, name))
    if not ready:
        return Load()
    return await memory.scraper.scrape(ready, time.monotonic())


async def autoscale_tick(
    settings: OperatorSettings,
    namespace: str,
    name: str,
    spec: Mapping[str, Any],
    replicas: list[ObservedReplica],
    memory: _Scaling,
) -> _Outcome:
    """One autoscaler step for one service: read its load, write status.metrics, scale (builtin)."""
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
    load = await read_load(settings, namespace, name, ready, memory)
    metrics = rounded(load)
    if metrics and (metrics != memory.written and now - memory.written_at >= METRICS_WRITE_SECONDS):
        await kube.patch_custom_object_status(GROUP, VERSION, PLURAL, namespace, name, {"metrics": metrics})
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
        await kube.scale_custom_object(GROUP, VERSION, PLURAL, namespace, name, decision.replicas)
        events.append(("Normal", "Scaled", text))
        log.info("%s/%s: %s", namespace, name, text)
    if decision.stable_value is None:
        return _Outcome(events, ScalingInfo(False, "NoMetrics", text))
    return _Outcome(events, ScalingInfo(True, decision.reason, text))


# -- the controller --------------------------------------------------------------------------------


class Controller:
    """What the InferenceService reconciler and autoscalers need between calls (kopf's memo holds it)."""

    def __init__(
        self,
        settings: OperatorSettings,
        caches: Caches,
        service_cache: WatchCache[dict[str, Any]],
        bodies: BodyStore,
        trainingjobs: Callable[[], WatchCache[dict[str, Any]] | None],
    ) -> None:
        self.settings, self.caches, self.service_cache = settings, caches, service_cache
        self.bodies, self.trainingjobs = bodies, trainingjobs
        self.queue: WorkQueue[Key] | None = None
        #: The autoscaler task of each service, with the uid it was started for.
        self.autoscalers: dict[Key, tuple[str, asyncio.Task[None]]] = {}
        #: Set while this replica leads: autoscalers scale only then (see tandem.operator.leader).
        self.leading: asyncio.Event | None = None
        #: The containers' measured usage for the cost model (None: requests only).
        self.usage: UsageSource | None = None
        #: The autoscaler's last word per service uid, read by the reconcile (ScalingActive condition).
        self.scaling: dict[str, ScalingInfo] = {}
        #: The uids of the services whose ServiceMonitor is in place.
        self.service_monitors: set[str] = set()
        self.warnings = WarningsOnce()
        self.service_monitor_crd = CrdCheck()

    # -- from the watches --------------------------------------------------------------------------

    def service_changed(self, key: Key) -> None:
        """Keep the newest body, queue the service (news only); start or stop its autoscaler."""
        assert self.queue is not None
        bodies = self.service_cache.get(key)
        if not bodies:  # deleted: children go by ownerReference; drop what we kept of it
            gone = self.bodies.get(key)
            self.bodies.drop(key)
            if gone is not None:
                uid = str(gone["metadata"].get("uid"))
                self.scaling.pop(uid, None)
                self.service_monitors.discard(uid)
                self.warnings.forget(uid)
            STATUS_METRICS.forget(KIND, *key)
            self._autoscaler(key, None)
            return
        if self.bodies.put(bodies[0]):
            self.queue.add(key)
            self._autoscaler(key, str(bodies[0]["metadata"]["uid"]))

    def _autoscaler(self, key: Key, uid: str | None) -> None:
        """The service `key` now has `uid` (None: gone); one autoscaler task per uid."""
        running = self.autoscalers.get(key)
        if running is not None and running[0] == uid:
            return
        if running is not None:
            running[1].cancel()
            del self.autoscalers[key]
        if uid is not None:
            self.autoscalers[key] = (uid, asyncio.create_task(self._autoscale(key, uid)))

    # -- reconcile ---------------------------------------------------------------------------------

    async def reconcile(self, key: Key) -> float | None:
        """Converge the children to the spec, and the status to what the children report."""
        body = self.bodies.get(key)
        if body is None:
            return None  # deleted
        await release_kopf_finalizer(body, PLURAL)
        if body["metadata"].get("deletionTimestamp"):
            return None  # being deleted: its children go with it
        trainingjobs = self.trainingjobs()
        if trainingjobs is None or not all(cache.synced for cache in (*self.caches.all(), trainingjobs)):
            return RECONCILE_INTERVAL_SECONDS  # before the first lists, a missing child proves nothing
        with timed_reconcile(KIND):
            return await self._reconcile(body, trainingjobs)

    async def _reconcile(
        self, body: dict[str, Any], trainingjobs: WatchCache[dict[str, Any]]
    ) -> float | None:
        meta, status = body["metadata"], body.get("status") or {}
        namespace, name, uid = str(meta["namespace"]), str(meta["name"]), str(meta["uid"])
        generation = int(meta.get("generation") or 0)
        try:
            failed = InferenceServicePhase.FAILED.value
            service_spec = await validated_spec(InferenceServiceSpec, body, failed)
        except InvalidSpec as invalid:
            await self.bodies.write_status(namespace, name, invalid.status)
            return None  # nothing to do until the spec changes (its watch event queues the service)
        if refused_at(status, generation):
            return None  # the API server refused a child of this spec for good: wait for a new spec
        service = Service(
            name, namespace, uid, service_spec, service_spec.image or self.settings.serving_image
        )
        key = (namespace, name)
        ref = service_spec.model.training_job_ref
        caches = self.caches
        children = frozenset(
            caches.services.get(key)
            + caches.pdbs.get(key)
            + (["ServiceMonitor"] if uid in self.service_monitors else [])
        )
        observed = Observed(
            deployment=next(iter(caches.deployments.get(key)), None),
            replicas=caches.replicas.get(key),
            training_job=training_job(trainingjobs, namespace, ref.name) if ref else None,
            children=children,
            service_monitor_crd=await self.service_monitor_crd(),
            scaling=self.scaling.get(uid),
            usage=self.usage.snapshot() if self.usage else None,
        )
        current = InferenceServiceStatus.model_validate(status)
        decision = decide(service, generation, current, observed, datetime.now(UTC), self.settings)
        refused = await apply(decision, body, uid, self.service_monitors, self.warnings)
        new_status = decision.status
        if refused:
            failed = InferenceServicePhase.FAILED
            new_status = with_refusal(new_status, ConditionType.READY, refused, generation, failed)
        changes = status_patch(status, new_status.to_dict())
        # status.metrics belongs to the autoscaler: never overwrite it from a stale view.
        changes.pop("metrics", None)
        await self.bodies.write_status(namespace, name, changes)
        STATUS_METRICS.record(KIND, namespace, name, serving_row(service_spec, new_status, decision.rate))
        return None if refused else RECONCILE_INTERVAL_SECONDS

    # -- autoscaler --------------------------------------------------------------------------------

    async def _autoscale(self, key: Key, uid: str) -> None:
        """Read load and (builtin mode) scale, every autoscaler_tick_seconds, until the service goes."""
        namespace, name = key
        memory = _Scaling()
        while True:
            if self.leading is not None:
                await self.leading.wait()  # a standby neither scales nor reports
            body = self.bodies.get(key)
            if body is None or str(body["metadata"].get("uid")) != uid:
                return
            replicas = self.caches.replicas.get(key)
            spec = dict(body.get("spec") or {})
            try:
                outcome = await autoscale_tick(self.settings, namespace, name, spec, replicas, memory)
            except Exception as error:  # one bad tick (API hiccup, Prometheus down) must not end the loop
                log.warning("autoscaler %s/%s: %s", namespace, name, error)
            else:
                for type_, reason, message in outcome.events:
                    await kube.post_event(body, type_, reason, message)
                if outcome.scaling is not None:
                    self.scaling[uid] = outcome.scaling
            await asyncio.sleep(self.settings.autoscaler_tick_seconds)


@kopf.on.startup()
async def start_controller(memo: kopf.Memo, **_: Any) -> None:
    """Watch the services and their replicas, Deployments, Services and PDBs; start the queue."""
    settings: OperatorSettings = memo.settings
    namespaces = settings.namespaces
    caches = Caches(
        replicas=owned("v1", "pods", SERVICE_LABEL, observe_replica, namespaces),
        deployments=owned("apps/v1", "deployments", SERVICE_LABEL, observe_deployment, namespaces),
        services=owned("v1", "services", SERVICE_LABEL, _kind("Service"), namespaces),
        pdbs=owned(
            "policy/v1", "poddisruptionbudgets", SERVICE_LABEL, _kind("PodDisruptionBudget"), namespaces
        ),
    )
    bodies = BodyStore(KIND, PLURAL)
    services: WatchCache[dict[str, Any]] = WatchCache(
        "inferenceservices", custom_objects(GROUP, VERSION, PLURAL), by_name, bodies.observe, namespaces
    )

    def trainingjobs() -> WatchCache[dict[str, Any]] | None:
        """The TrainingJob controller's cache (lineage), read when needed: it may start up later."""
        return getattr(memo, "trainingjob_cache", None)

    controller = Controller(settings, caches, services, bodies, trainingjobs)
    controller.usage = getattr(memo, "usage", None)
    queue = controller.queue = WorkQueue(controller.reconcile, workers=RECONCILE_WORKERS)
    for cache in caches.all():
        cache.on_change = queue.add
    services.on_change = controller.service_changed
    controller.leading = memo.leading
    when_leading(memo, queue.start)  # a standby queues what its caches see, and starts when it leads
    watch_queue(KIND, queue.__len__)
    for cache in (*caches.all(), services):
        cache.start()
    memo.inferenceservices = controller


@kopf.on.cleanup()
async def stop_controller(memo: kopf.Memo, **_: Any) -> None:
    controller: Controller = memo.inferenceservices
    for cache in (*controller.caches.all(), controller.service_cache):
        await cache.stop()
    watch_queue(KIND, None)
    for _uid, task in controller.autoscalers.values():
        task.cancel()
    if controller.queue is not None:
        await controller.queue.stop()
