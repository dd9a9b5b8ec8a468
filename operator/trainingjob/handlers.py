"""kopf glue for TrainingJob: a cache of its pods, an index of nodes, and a level-based reconcile timer.

The timer runs `reconcile.decide` on what the cache and index hold (no API reads per reconcile), then
carries out the decision: create or delete children, post events, patch status when it changed.
"""

from __future__ import annotations

import logging
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
from tandem.operator.podcache import PodCache
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

RECONCILE_INTERVAL_SECONDS = 2.0
#: Threads for a reconcile's child create/delete calls (the API client's pool holds as many connections).
CHILD_CALL_THREADS = 8
_CHILD_CALLS = ThreadPoolExecutor(CHILD_CALL_THREADS, thread_name_prefix="tandem-children")
log = logging.getLogger(__name__)
#: Reasons whose warnings a reconcile would repeat every tick.
REPEATING_WARNINGS = ("BadProgress", "CreateFailed")
_warnings = WarningsOnce()


@kopf.on.startup()
def start_pod_cache(memo: kopf.Memo, **_: Any) -> None:
    """Watch the operator's own pods (selected by label on the server) into a lean cache."""
    settings: OperatorSettings = memo.settings
    memo.training_pods = PodCache(LABEL_JOB, observe_pod, settings.namespaces)
    memo.training_pods.start()


@kopf.on.cleanup()
def stop_pod_cache(memo: kopf.Memo, **_: Any) -> None:
    memo.training_pods.stop()


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
    support = [m for m in decision.create if m["kind"] != "Pod" and not _known_shared(m)]
    pods = [m for m in decision.create if m["kind"] == "Pod"]
    created = [_create(m) for m in support] + list(_CHILD_CALLS.map(_create, pods))
    for manifest, outcome in zip(support + pods, created, strict=True):
        child = f"{manifest['kind']} {manifest['metadata']['name']}"
        if isinstance(outcome, kube.Refused):
            refused = refused or f"the API server refused {child}: {outcome}"
        elif isinstance(outcome, kube.Busy):
            log.warning(
                "API server busy creating %s in %s (%s); retrying next tick", child, namespace, outcome
            )
        else:
            if (key := _shared_key(manifest)) is not None:
                _shared_present.add(key)
            if outcome:
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


# kopf's TimerFn protocol does not know the index keyword arguments kopf passes by name.
@kopf.timer(GROUP, VERSION, PLURAL, interval=RECONCILE_INTERVAL_SECONDS)  # type: ignore[arg-type]
def reconcile_trainingjob(
    body: kopf.Body,
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    patch: kopf.Patch,
    memo: kopf.Memo,
    nodes_by_name: kopf.Index[str, ObservedNode],
    **_: Any,
) -> None:
    """Converge the job's pods to its phase, and its status to what the pods and driver report."""
    if meta.get("deletionTimestamp"):
        return  # being deleted: its children go with it; recreating "lost" pods would fight the GC
    training_pods: PodCache[ObservedPod] = memo.training_pods
    if not training_pods.synced:
        return  # before the first list, a missing pod proves nothing: try again next tick
    with timed_reconcile(KIND):
        settings: OperatorSettings = memo.settings
        namespace, name, uid = str(meta["namespace"]), str(meta["name"]), str(meta["uid"])
        generation = int(meta.get("generation") or 0)
        job_spec = parse_spec_or_reject(
            TrainingJobSpec, body, spec, status, generation, patch, TrainingJobPhase.FAILED.value
        )
        job = Job(name, namespace, uid, generation, job_spec, job_spec.image or settings.training_image)
        current = TrainingJobStatus.model_validate(dict(status))
        pods = training_pods.get((namespace, name))
        decision = decide(
            job,
            current,
            pods,
            cluster_view(nodes_by_name),
            datetime.now(UTC),
            settings.gpu_price,
        )
        refused = apply(decision, body, namespace, name, uid)
        new_status = decision.status
        if refused:  # e.g. a PriorityClass or PVC that does not exist: say so, retry next tick
            new_status = with_refusal(new_status, ConditionType.SCHEDULED, refused, generation)
        changes = status_patch(dict(status), new_status.to_dict())
        if changes and not decision.delete_job:
            patch.status.update(changes)


# A raw event handler, not on.delete: change handlers make kopf write a diff-base annotation on every
# object it first sees, one more API write per job for nothing.
@kopf.on.event(GROUP, VERSION, PLURAL)
def forget_trainingjob(type: str, meta: kopf.Meta, **_: Any) -> None:
    """Children go with the job (ownerReferences); only in-memory bookkeeping is dropped here."""
    if type != "DELETED":
        return
    _warnings.forget(str(meta.get("uid")))
