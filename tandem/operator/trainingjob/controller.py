"""The TrainingJob controller: lean watch caches of the jobs and their pods, kopf's index of nodes,
and a keyed work queue.

A job is reconciled when it changes, when one of its pods changes, when one of its nodes goes
NotReady or away, and when the clock makes a decision due (a timeout, a backoff, the next cost write),
with a slow resync as a safety net. A reconcile runs `reconcile.decide` on what the caches hold (no
API reads), then carries out the decision: create or delete children, post events, patch status when
it changed. kopf runs the operator around it; the jobs' own events skip its per-object machinery.

All of it runs on kopf's event loop: reconciles are coroutines run by the work queue's workers, a
gang's children are written concurrently (`asyncio.gather`, at most CHILD_CALLS at once across all
reconciles), and what the controller remembers lives on the `Controller` in kopf's memo.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import kopf
import orjson

from tandem.api.common import GROUP, VERSION
from tandem.api.trainingjob import (
    KIND,
    PLURAL,
    TrainingJobPhase,
    TrainingJobSpec,
    TrainingJobStatus,
)
from tandem.operator import kube
from tandem.operator.config import OperatorSettings
from tandem.operator.controller_common import (
    CREATE_REFUSED,
    BodyStore,
    InvalidSpec,
    WarningsOnce,
    refusal_message,
    release_kopf_finalizer,
    status_patch,
    validated_spec,
)
from tandem.operator.cost_usage import UsageSource
from tandem.operator.leader import when_leading
from tandem.operator.metrics import timed_reconcile, watch_queue
from tandem.operator.status_metrics import STATUS_METRICS, training_row
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
from tandem.operator.trainingjob.reconcile import Decision, Job, decide, refused
from tandem.operator.watchcache import Key, WatchCache, by_name, custom_objects, owned
from tandem.operator.workqueue import WorkQueue

#: An unfinished job is looked at this often even when nothing is due: a safety net, not the
#: mechanism (changes of the job, its pods and its nodes wake it; `Decision.due_in` says when the
#: clock will). Resyncing every job every few seconds would cost a core at a thousand jobs.
RESYNC_SECONDS = 60.0
#: A job waiting on something other than the clock (a busy or refusing API server, an old gang going
#: away after its backoff ran out, the first pod list) is looked at again this soon.
RETRY_SECONDS = 2.0
#: A pod's change wakes its job this much later, so that a gang's pods coming up one by one (each
#: bound, then Running, then ready) fold into one reconcile and one status write, not fifteen.
POD_CHANGE_DELAY_SECONDS = 0.5
#: Jobs reconciled at the same time (work queue workers; each waits on its API round trips).
RECONCILE_WORKERS = 16
#: Child create/delete calls in flight at once, across all reconciles (the thread count that was
#: measured best when they were threads: 16 threads gave more passes that saw a gang half-way).
CHILD_CALLS = 8
log = logging.getLogger(__name__)
#: Reasons whose warnings a reconcile would repeat each time it runs (posted once per message).
REPEATING_WARNINGS = ("BadProgress", CREATE_REFUSED)


@kopf.index("nodes")
async def nodes_by_name(name: str, body: kopf.Body, **_: Any) -> dict[str, ObservedNode]:
    return {name: observe_node(body)}


class _NotListed(Exception):
    """`decide` asked for the GPUs in use, which take an API call: list them, then decide again."""


def cluster_view(
    nodes: kopf.Index[str, ObservedNode], pods: WatchCache[ObservedPod], in_use: Mapping[str, int] | None
) -> ClusterView:
    """What `decide` sees of the cluster; `in_use` None: the GPUs in use are not listed yet (only an
    Unschedulable message needs them; asking raises _NotListed, and the reconcile lists and decides
    again: `decide` is pure, so deciding twice is harmless)."""

    def gpus() -> Mapping[str, int]:
        if in_use is None:
            raise _NotListed
        return in_use

    return ClusterView(
        nodes={name: next(iter(store)) for name, store in nodes.items()},
        gpus_in_use=gpus,
        job_pods=pods.entries,
    )


async def gpus_in_use() -> dict[str, int]:
    """GPUs held on each node by live pods of any owner (one list call, made only when needed)."""
    used: dict[str, int] = {}
    for pod in await kube.list_bound_pods():
        node = (pod.get("spec") or {}).get("nodeName")
        if node and (pod.get("status") or {}).get("phase") not in TERMINAL_PHASES:
            used[node] = used.get(node, 0) + pod_gpus(pod)
    return used


ChildKey = tuple[str, str, str, str]
#: Kinds written whole (server-side apply) whenever their content changes; others are created once.
#: A job's Role names its current head pod, so each new attempt applies it again.
APPLIED_KINDS = frozenset({"EndpointSlice", "Role"})
#: A job's identity goes first and in order: a RoleBinding needs its Role, and admission rejects a pod
#: whose ServiceAccount does not exist yet. Its NetworkPolicy and PodGroup (when the settings ask for
#: them) too: pods must not run unfenced, and the coscheduling plugin does not schedule a pod whose
#: group does not exist yet.
IDENTITY_KINDS = ("ServiceAccount", "Role", "RoleBinding", "NetworkPolicy", "PodGroup")


class SeenChildren:
    """Children other than pods that this process has written or seen in place, so that each is
    written once per content and not on every reconcile that asks for it (pods need no such memory:
    the pod cache shows them).

    Keyed by (kind, namespace, name, owner uid); the value is the content last applied
    (APPLIED_KINDS), or empty for a child created once.
    """

    def __init__(self) -> None:
        self._written: dict[ChildKey, bytes] = {}

    @staticmethod
    def key(manifest: Mapping[str, Any]) -> ChildKey | None:
        if manifest["kind"] == "Pod":
            return None
        meta = manifest["metadata"]
        owners = meta.get("ownerReferences") or ({"uid": ""},)
        return manifest["kind"], meta["namespace"], meta["name"], owners[0]["uid"]

    @staticmethod
    def content(manifest: Mapping[str, Any]) -> bytes:
        if manifest["kind"] not in APPLIED_KINDS:
            return b""
        return orjson.dumps(manifest, option=orjson.OPT_SORT_KEYS)

    def has(self, manifest: Mapping[str, Any]) -> bool:
        """Whether this child is known to be in place as given."""
        key = self.key(manifest)
        if key is None:
            return False
        return self._written.get(key) == self.content(manifest)

    def note(self, children: Sequence[Mapping[str, Any]], outcomes: Sequence[Any]) -> None:
        """Remember the children now known to be in place: written, or there already (a conflict)."""
        for manifest, outcome in zip(children, outcomes, strict=True):
            key = self.key(manifest)
            if key is not None and not isinstance(outcome, Exception):
                self._written[key] = self.content(manifest)

    def forget_owner(self, uid: str) -> None:
        """A job was deleted: the garbage collector removes its children."""
        self._written = {key: value for key, value in self._written.items() if key[3] != uid}


async def _create(manifest: dict[str, Any]) -> bool | kube.Refused | kube.Busy:
    """Write one child: create it (False: it was there); one of APPLIED_KINDS that was there is then
    applied (a create costs the API server half an apply, and most are written once)."""
    try:
        created = await kube.create(manifest)
        if not created and manifest["kind"] in APPLIED_KINDS:
            await kube.apply(manifest)
            return True
        return created
    except (kube.Refused, kube.Busy) as problem:
        return problem


T = TypeVar("T")
A = TypeVar("A")


async def each(calls: asyncio.Semaphore, call: Callable[[A], Awaitable[T]], items: Sequence[A]) -> list[T]:
    """`call` on every item concurrently, at most as many at once as `calls` allows; results in order."""

    async def limited(item: A) -> T:
        async with calls:
            return await call(item)

    return list(await asyncio.gather(*(limited(item) for item in items)))


@dataclass(frozen=True)
class Applied:
    """How carrying out a decision went: why the API server refused a child for good (which child,
    which field, bounded); whether it was busy (then its Retry-After, the longest asked)."""

    refused: str | None = None
    busy: kube.Busy | None = None


async def apply(
    decision: Decision, namespace: str, name: str, seen: SeenChildren, calls: asyncio.Semaphore
) -> Applied:
    """Create and delete the decision's children (the identity in order, then the rest at most
    `calls` at once); say whether the API server refused a child or was too busy to take it (events
    and the status are the caller's: a held decision has none yet). `seen` remembers the children in
    place.

    Every call is idempotent, so a crash half-way is repaired by the next reconcile.
    """
    refused: str | None = None
    busy: kube.Busy | None = None
    wanted = [m for m in decision.create if not seen.has(m)]
    # The job's identity goes first and in order (see IDENTITY_KINDS); then its pods and Service,
    # concurrently.
    first = sorted(
        (m for m in wanted if m["kind"] in IDENTITY_KINDS), key=lambda m: IDENTITY_KINDS.index(m["kind"])
    )
    created = [await _create(manifest) for manifest in first]
    seen.note(first, created)
    own = [m for m in wanted if m["kind"] not in IDENTITY_KINDS]
    own_created = await each(calls, _create, own)
    seen.note(own, own_created)
    made = []
    for manifest, outcome in zip(first + own, created + own_created, strict=True):
        child = f"{manifest['kind']} {manifest['metadata']['name']}"
        if isinstance(outcome, kube.Refused):
            refused = refused or refusal_message(child, outcome)
        elif isinstance(outcome, kube.Busy):
            if busy is None or (outcome.retry_after or 0) > (busy.retry_after or 0):
                busy = outcome
            log.warning("API server busy creating %s in %s (%s)", child, namespace, outcome)
        elif outcome:
            made.append(child)
    if made:  # one line per reconcile: at thousands of pods a minute, a line each showed in profiles
        log.info("%s/%s: created %s", namespace, name, ", ".join(made))
    deletes = await each(calls, lambda pod: kube.delete_pod(namespace, pod), decision.delete)
    gone = [pod for pod, deleted in zip(decision.delete, deletes, strict=True) if deleted]
    if gone:
        log.info("%s/%s: deleted pod %s", namespace, name, ", ".join(gone))
    return Applied(refused, busy)


async def post_events(decision: Decision, body: Mapping[str, Any], uid: str, warnings: WarningsOnce) -> None:
    """The decision's events, in order; a warning a reconcile would repeat, once per message."""
    for event in decision.events:
        if event.reason in REPEATING_WARNINGS:
            await warnings.warn(body, uid, event.reason, event.message)
        else:
            await kube.post_event(body, event.type, event.reason, event.message)


def recheck_in(decision: Decision, retry: bool) -> float | None:
    """Seconds until the job should be looked at again without a change (None: only on a change).

    `retry`: waiting on something other than the clock (the first pod list; a busy API server raises
    instead, for the work queue's per-key backoff)."""
    due = decision.due_in
    if retry or (due is not None and due <= 0):
        return RETRY_SECONDS
    phase = decision.status.phase
    if due is None:
        return None if phase is not None and phase.finished else RESYNC_SECONDS
    return min(due + 0.05, RESYNC_SECONDS)  # just past it: the clock has then surely reached it


class Controller:
    """What the TrainingJob reconciler needs between calls: the job bodies, the caches, the queue, the
    children written and the warnings posted (kopf's memo holds it: no state in module globals)."""

    def __init__(
        self,
        settings: OperatorSettings,
        pods: WatchCache[ObservedPod],
        job_cache: WatchCache[dict[str, Any]],
        jobs: BodyStore,
        nodes: kopf.Index[str, ObservedNode],
    ) -> None:
        self.settings, self.pods, self.job_cache, self.nodes = settings, pods, job_cache, nodes
        self.jobs = jobs
        #: Each node's last seen readiness, so that only a change wakes the jobs on it.
        self.node_ready: dict[str, bool] = {}
        self.queue: WorkQueue[Key] | None = None
        #: The containers' measured usage for the cost model (None: requests only).
        self.usage: UsageSource | None = None
        self.seen = SeenChildren()
        self.warnings = WarningsOnce()
        #: Child calls in flight at once, across all reconciles.
        self.child_calls = asyncio.Semaphore(CHILD_CALLS)

    def job_changed(self, key: Key) -> None:
        """From the jobs' watch: keep the newest body and queue the job (news only)."""
        assert self.queue is not None
        bodies = self.job_cache.get(key)
        if not bodies:  # deleted: its children go by ownerReference; drop what we kept of it
            gone = self.jobs.get(key)
            self.jobs.drop(key)
            if gone is not None:
                self.warnings.forget(str(gone["metadata"].get("uid")))
                self.seen.forget_owner(str(gone["metadata"].get("uid")))
            STATUS_METRICS.forget(KIND, *key)
            return
        if self.jobs.put(bodies[0]):
            self.queue.add(key)

    async def reconcile(self, key: Key) -> float | None:
        """Converge one job; seconds until it should be looked at again (None: only on a change)."""
        body = self.jobs.get(key)
        if body is None:
            return None  # deleted
        await release_kopf_finalizer(body, PLURAL)
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return None  # being deleted: its children go with it; recreating "lost" pods would fight the GC
        if not self.pods.synced:
            return RETRY_SECONDS  # before the first list, a missing pod proves nothing
        with timed_reconcile(KIND):
            return await self._reconcile(body)

    async def _reconcile(self, body: dict[str, Any]) -> float | None:
        meta, status = body["metadata"], body.get("status") or {}
        namespace, name, uid = str(meta["namespace"]), str(meta["name"]), str(meta["uid"])
        generation = int(meta.get("generation") or 0)
        try:
            job_spec = await validated_spec(TrainingJobSpec, body, TrainingJobPhase.FAILED.value)
        except InvalidSpec as invalid:
            await self.jobs.write_status(namespace, name, invalid.status)
            return None  # nothing to do until the spec changes (its watch event queues the job)
        settings = self.settings
        job = Job(
            name,
            namespace,
            uid,
            generation,
            job_spec,
            job_spec.image or settings.training_image,
            network_policy=settings.network_policy,
            gang_scheduler_name=settings.gang_scheduler_name
            if settings.gang_scheduler == "coscheduling"
            else None,
        )
        current = TrainingJobStatus.model_validate(status)
        pods, usage = self.pods.get((namespace, name)), self.usage.snapshot() if self.usage else None
        try:
            view = cluster_view(self.nodes, self.pods, None)
            decision = decide(job, current, pods, view, datetime.now(UTC), settings.prices(), usage)
        except _NotListed:
            view = cluster_view(self.nodes, self.pods, await gpus_in_use())
            decision = decide(job, current, pods, view, datetime.now(UTC), settings.prices(), usage)
        applied = await apply(decision, namespace, name, self.seen, self.child_calls)
        if applied.refused is not None:
            await self._refused(body, job, decision, applied.refused)
            return None
        if (
            decision.hold and applied.busy is None
        ):  # a gang just created: its status waits (it may bind at once)
            return recheck_in(decision, retry=False)
        await post_events(decision, body, uid, self.warnings)
        if decision.delete_job:
            await kube.delete_custom_object(GROUP, VERSION, PLURAL, namespace, name)
            return None
        new_status = decision.status
        changes = status_patch(status, new_status.to_dict())
        if changes:
            await self.jobs.write_status(namespace, name, changes)
        STATUS_METRICS.record(KIND, namespace, name, training_row(name, new_status, decision.rate))
        if applied.busy is not None:  # the work queue backs off, no sooner than its Retry-After
            raise applied.busy
        return recheck_in(decision, retry=False)

    async def _refused(self, body: dict[str, Any], job: Job, decision: Decision, message: str) -> None:
        """The API server refused a child for good: delete the half-made gang (a head alone must not
        run until its gang timeout), say why in one Warning event and a Failed status naming the
        child and field, and look again only when the job changes (its spec, or a pod going)."""
        namespace, name = job.namespace, job.name
        made = {m["metadata"]["name"] for m in decision.create if m["kind"] == "Pod"}
        made |= {pod.name for pod in self.pods.get((namespace, name)) if not pod.deleting}
        await each(self.child_calls, lambda pod: kube.delete_pod(namespace, pod), sorted(made))
        await self.warnings.warn(body, job.uid, CREATE_REFUSED, message)
        new_status = refused(job, decision.status, message, datetime.now(UTC))
        await self.jobs.write_status(
            namespace, name, status_patch(body.get("status") or {}, new_status.to_dict())
        )
        STATUS_METRICS.record(KIND, namespace, name, training_row(name, new_status, decision.rate))
        log.warning("%s/%s failed: %s", namespace, name, message)


# kopf's ActivityFn protocol does not know the index keyword arguments kopf passes by name.
@kopf.on.startup()  # type: ignore[arg-type]
async def start_controller(memo: kopf.Memo, nodes_by_name: kopf.Index[str, ObservedNode], **_: Any) -> None:
    """Watch the jobs and their pods (selected by label on the server) into lean caches; start the queue."""
    settings: OperatorSettings = memo.settings
    kube.warm_up()
    pods = owned("v1", "pods", LABEL_JOB, observe_pod, settings.namespaces)
    bodies = BodyStore(KIND, PLURAL)
    jobs: WatchCache[dict[str, Any]] = WatchCache(
        "trainingjobs", custom_objects(GROUP, VERSION, PLURAL), by_name, bodies.observe, settings.namespaces
    )
    controller = Controller(settings, pods, jobs, bodies, nodes_by_name)
    controller.usage = getattr(memo, "usage", None)
    controller.queue = WorkQueue(controller.reconcile, workers=RECONCILE_WORKERS)
    queue = controller.queue
    pods.on_change = lambda key: queue.add(key, POD_CHANGE_DELAY_SECONDS)
    jobs.on_change = controller.job_changed
    when_leading(memo, queue.start)  # a standby queues what its caches see, and starts when it leads
    watch_queue(KIND, queue.__len__)
    pods.start()
    jobs.start()
    memo.trainingjobs = controller
    memo.trainingjob_cache = jobs  # the InferenceService's lineage reads the jobs from here


@kopf.on.cleanup()
async def stop_controller(memo: kopf.Memo, **_: Any) -> None:
    controller: Controller = memo.trainingjobs
    await controller.pods.stop()
    await controller.job_cache.stop()
    watch_queue(KIND, None)
    if controller.queue is not None:
        await controller.queue.stop()


@kopf.on.event("nodes")
async def node_event(type: str, body: kopf.Body, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Wake the jobs with pods on a node that went NotReady, came back, or went away."""
    controller: Controller = memo.trainingjobs
    ready = type != "DELETED" and observe_node(body).ready
    if controller.node_ready.get(name, True) == ready:
        if type != "DELETED":
            controller.node_ready[name] = ready
        return
    if type == "DELETED":
        controller.node_ready.pop(name, None)
    else:
        controller.node_ready[name] = ready
    if controller.queue is not None:
        for key in controller.pods.keys_where(lambda pod: pod.node == name):
            controller.queue.add(key)
