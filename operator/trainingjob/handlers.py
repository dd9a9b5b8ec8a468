"""kopf glue for TrainingJob: a cache of its pods, an index of nodes, and a keyed work queue.

A job is reconciled when its watch event or one of its pods' changes queues it, and every 2 s while
it is active. A reconcile runs `reconcile.decide` on what the caches hold (no API reads), then carries
out the decision: create or delete children, post events, patch status when it changed.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import kopf

from tandem.operator import kube
from tandem.operator.api.common import GROUP, VERSION
from tandem.operator.api.trainingjob import (
    KIND,
    PLURAL,
    ConditionType,
    TrainingJobPhase,
    TrainingJobSpec,
    TrainingJobStatus,
)
from tandem.operator.config import OperatorSettings
from tandem.operator.handlers_common import WarningsOnce, parse_spec_or_reject, status_patch, with_refusal
from tandem.operator.metrics import timed_reconcile
from tandem.operator.podcache import Key, PodCache
from tandem.operator.trainingjob.builders import LABEL_JOB
from tandem.operator.trainingjob.observe import (
    TERMINAL_PHASES,
    ClusterView,
    ObservedNode,
    ObservedPod,
    observe_node,
    observe_pod,
    pod_gpus,
)
from tandem.operator.trainingjob.reconcile import Decision, Job, decide
from tandem.operator.workqueue import WorkQueue

#: Resync period of an active job (timeouts, cost accrual); changes are handled as they come.
RECONCILE_INTERVAL_SECONDS = 2.0
#: A pod's change wakes its job this much later, so that a gang's pods coming up one by one (each
#: bound, then Running, then ready) fold into one reconcile and one status write, not fifteen.
POD_CHANGE_DELAY_SECONDS = 0.5
#: Jobs reconciled at the same time (threads: a reconcile blocks on its API calls).
RECONCILE_WORKERS = 16
_RECONCILES = ThreadPoolExecutor(RECONCILE_WORKERS, thread_name_prefix="tandem-trainingjob")
#: Threads for a reconcile's child create/delete calls (the API client's pool holds as many connections).
CHILD_CALL_THREADS = 8
_CHILD_CALLS = ThreadPoolExecutor(CHILD_CALL_THREADS, thread_name_prefix="tandem-children")
log = logging.getLogger(__name__)
#: Reasons whose warnings a reconcile would repeat every tick.
REPEATING_WARNINGS = ("BadProgress", "CreateFailed")
_warnings = WarningsOnce()


@kopf.index("nodes")
def nodes_by_name(name: str, body: kopf.Body, **_: Any) -> dict[str, ObservedNode]:
    return {name: observe_node(body)}


def cluster_view(nodes: kopf.Index[str, ObservedNode]) -> ClusterView:
    return ClusterView(
        nodes={name: next(iter(store)) for name, store in nodes.items()}, gpus_in_use=gpus_in_use
    )


def gpus_in_use() -> dict[str, int]:
    """GPUs held on each node by live pods of any owner (one list call, made only when needed)."""
    used: dict[str, int] = {}
    for pod in kube.list_bound_pods():
        node = (pod.get("spec") or {}).get("nodeName")
        if node and (pod.get("status") or {}).get("phase") not in TERMINAL_PHASES:
            used[node] = used.get(node, 0) + pod_gpus(pod)
    return used


#: Shared namespace objects (no owner) this process has seen in place, so each is written once.
_shared_present: set[tuple[str, str, str]] = set()
_support_lock = threading.Lock()


def _shared_key(manifest: Mapping[str, Any]) -> tuple[str, str, str] | None:
    meta = manifest["metadata"]
    return None if meta.get("ownerReferences") else (manifest["kind"], meta["namespace"], meta["name"])


def _known_shared(manifest: Mapping[str, Any]) -> bool:
    return _shared_key(manifest) in _shared_present


def _create(manifest: dict[str, Any]) -> bool | kube.Refused | kube.Busy:
    try:
        return kube.create(manifest)
    except (kube.Refused, kube.Busy) as problem:
        return problem


def apply(decision: Decision, body: kopf.Body, namespace: str, name: str, uid: str) -> str | None:
    """Carry out a decision; return why the API server refused a child, if it did.

    Every call is idempotent, so a crash half-way is repaired on the next tick.
    """
    refused = None
    # The supporting objects go first and in order (a RoleBinding needs its Role; admission rejects a
    # pod whose ServiceAccount does not exist yet); then the gang's pods, concurrently.
    with _support_lock:  # so that the first jobs of a namespace do not all create its shared account
        support = [m for m in decision.create if m["kind"] != "Pod" and not _known_shared(m)]
        created = [_create(m) for m in support]
        for manifest, outcome in zip(support, created, strict=True):
            if (key := _shared_key(manifest)) is not None and not isinstance(outcome, Exception):
                _shared_present.add(key)
    pods = [m for m in decision.create if m["kind"] == "Pod"]
    created += list(_CHILD_CALLS.map(_create, pods))
    for manifest, outcome in zip(support + pods, created, strict=True):
        child = f"{manifest['kind']} {manifest['metadata']['name']}"
        if isinstance(outcome, kube.Refused):
            refused = refused or f"the API server refused {child}: {outcome}"
        elif isinstance(outcome, kube.Busy):
            log.warning(
                "API server busy creating %s in %s (%s); retrying next tick", child, namespace, outcome
            )
        elif outcome:
            log.info("created %s in %s", child, namespace)
    for pod, gone in zip(
        decision.delete,
        _CHILD_CALLS.map(lambda name: kube.delete_pod(namespace, name), decision.delete),
        strict=True,
    ):
        if gone:
            log.info("deleted pod %s/%s", namespace, pod)
    for event in decision.events:
        if event.reason in REPEATING_WARNINGS:
            _warnings.warn(body, uid, event.reason, event.message)
        else:
            kopf.event(body, type=event.type, reason=event.reason, message=event.message)
    if refused:
        _warnings.warn(body, uid, "CreateFailed", refused)
    if decision.delete_job:
        kube.delete_custom_object(GROUP, VERSION, PLURAL, namespace, name)
    return refused


class JobStore:
    """The newest body seen of each TrainingJob: from the watch, or from our own status patch's reply.

    A reconcile that ran on a body older than its own last status write would redo what that write
    recorded (count a restart twice), so a reply newer than the watch's copy replaces it, and a watch
    event older than what is held is ignored.
    """

    def __init__(self) -> None:
        self._bodies: dict[Key, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: Key) -> dict[str, Any] | None:
        with self._lock:
            return self._bodies.get(key)

    def put(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        key = (str(meta["namespace"]), str(meta["name"]))
        with self._lock:
            held = self._bodies.get(key)
            if held is None or held["metadata"].get("uid") != meta.get("uid") or _not_older(meta, held):
                self._bodies[key] = body

    def drop(self, key: Key) -> None:
        with self._lock:
            self._bodies.pop(key, None)


def _not_older(meta: Mapping[str, Any], held: Mapping[str, Any]) -> bool:
    """Whether `meta`'s resourceVersion is at least the held one's (etcd's are integers; else: yes)."""
    new, old = str(meta.get("resourceVersion", "")), str(held["metadata"].get("resourceVersion", ""))
    return not (new.isdigit() and old.isdigit()) or int(new) >= int(old)


class Controller:
    """What the TrainingJob reconciler needs between calls: the job bodies, the caches, the queue."""

    def __init__(self, settings: OperatorSettings, pods: PodCache[ObservedPod]) -> None:
        self.settings, self.pods = settings, pods
        self.jobs = JobStore()
        self.nodes: kopf.Index[str, ObservedNode] | None = None
        self.queue: WorkQueue[Key] | None = None

    def reconcile(self, key: Key) -> float | None:
        """Converge one job; seconds until it should be looked at again (None: only on a change)."""
        body = self.jobs.get(key)
        if body is None or self.nodes is None:
            return None  # deleted; or not seen through kopf yet (its event brings it back)
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return None  # being deleted: its children go with it; recreating "lost" pods would fight the GC
        if not self.pods.synced:
            return RECONCILE_INTERVAL_SECONDS  # before the first list, a missing pod proves nothing
        with timed_reconcile(KIND):
            return self._reconcile(body)

    def _reconcile(self, raw: dict[str, Any]) -> float | None:
        assert self.nodes is not None
        body = kopf.Body(raw)  # type: ignore[arg-type]
        meta, status = raw["metadata"], raw.get("status") or {}
        namespace, name, uid = str(meta["namespace"]), str(meta["name"]), str(meta["uid"])
        generation = int(meta.get("generation") or 0)
        patch = kopf.Patch()
        try:
            job_spec = parse_spec_or_reject(
                TrainingJobSpec,
                body,
                body.get("spec") or {},
                status,
                generation,
                patch,
                TrainingJobPhase.FAILED.value,
            )
        except kopf.PermanentError:
            self._write_status(namespace, name, dict(patch.status))
            return None  # nothing to do until the spec changes (its watch event queues the job)
        job = Job(name, namespace, uid, generation, job_spec, job_spec.image or self.settings.training_image)
        current = TrainingJobStatus.model_validate(status)
        decision = decide(
            job,
            current,
            self.pods.get((namespace, name)),
            cluster_view(self.nodes),
            datetime.now(UTC),
            self.settings.gpu_price,
        )
        refused = apply(decision, body, namespace, name, uid)
        if decision.delete_job:
            return None
        new_status = decision.status
        if refused:  # e.g. a PriorityClass or PVC that does not exist: say so, retry next tick
            new_status = with_refusal(new_status, ConditionType.SCHEDULED, refused, generation)
        changes = status_patch(status, new_status.to_dict())
        if changes:
            self._write_status(namespace, name, changes)
        return RECONCILE_INTERVAL_SECONDS

    def _write_status(self, namespace: str, name: str, changes: Mapping[str, Any]) -> None:
        if changes:
            self.jobs.put(kube.patch_custom_object_status(GROUP, VERSION, PLURAL, namespace, name, changes))


@kopf.on.startup()
async def start_controller(memo: kopf.Memo, **_: Any) -> None:
    """Watch the operator's own pods (selected by label on the server) into a lean cache; start the queue."""
    settings: OperatorSettings = memo.settings
    pods: PodCache[ObservedPod] = PodCache(LABEL_JOB, observe_pod, settings.namespaces)
    controller = Controller(settings, pods)
    controller.queue = WorkQueue(controller.reconcile, _RECONCILES, workers=RECONCILE_WORKERS)
    queue = controller.queue
    pods.on_change = lambda key: queue.add_threadsafe(key, POD_CHANGE_DELAY_SECONDS)
    pods.start()
    controller.queue.start()
    memo.trainingjobs = controller


@kopf.on.cleanup()
async def stop_controller(memo: kopf.Memo, **_: Any) -> None:
    controller: Controller = memo.trainingjobs
    controller.pods.stop()
    if controller.queue is not None:
        await controller.queue.stop()


# A raw event handler, neither a timer nor a change handler: a timer makes kopf put a finalizer on
# every job and change handlers a diff-base annotation, each one more API write per job for nothing.
# kopf's WatchingFn protocol does not know the index keyword arguments kopf passes by name.
@kopf.on.event(GROUP, VERSION, PLURAL)  # type: ignore[arg-type]
async def trainingjob_event(
    type: str,
    event: Mapping[str, Any],
    memo: kopf.Memo,
    nodes_by_name: kopf.Index[str, ObservedNode],
    **_: Any,
) -> None:
    """Keep the newest body and queue the job; forget a deleted one (its children go by ownerReference)."""
    controller: Controller = memo.trainingjobs
    body: dict[str, Any] = event["object"]
    meta = body["metadata"]
    key = (str(meta["namespace"]), str(meta["name"]))
    assert controller.queue is not None
    if controller.queue.context is None:  # kopf.event() needs the variables of a handler's context
        controller.queue.context = contextvars.copy_context()
    controller.nodes = nodes_by_name
    if type == "DELETED":
        controller.jobs.drop(key)
        controller.queue.forget(key)
        _warnings.forget(str(meta.get("uid")))
        return
    controller.jobs.put(body)
    controller.queue.add(key)
