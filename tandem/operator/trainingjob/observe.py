"""What the operator sees of a TrainingJob's world, reduced to small immutable facts.

Lean watch caches feed these from watch events (no API calls per reconcile); the state machine in
`reconcile` reads only these, so it can be tested on hand-made observations.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from tandem.operator import cost
from tandem.operator.gpu import GPU_PRODUCT_LABEL, GPU_RESOURCE
from tandem.operator.trainingjob.builders import (
    LABEL_ATTEMPT,
    LABEL_INDEX,
    LABEL_ROLE,
    LABEL_SPEC_HASH,
    PROGRESS_ANNOTATION,
)

TERMINAL_PHASES = ("Succeeded", "Failed")
#: The coscheduling plugin's PreFilter refusal names what the whole group lacks, as Go prints a map of
#: resource.Quantity: `resource gap: map[nvidia.com/gpu:{{16 0} {<nil>}  DecimalSI}]` (value, power of 10).
_RESOURCE_GAP = re.compile(r"resource gap: map\[(?P<entries>[^\]]*)\]")
_GAP_ENTRY = re.compile(r"(?P<name>[\w./-]+):\{\{(?P<value>-?\d+) (?P<scale>-?\d+)\}")


def _time(value: Any) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def pod_gpus(pod: Mapping[str, Any]) -> int:
    """GPUs a pod holds (its containers' `nvidia.com/gpu` limits)."""
    total = 0
    for container in (pod.get("spec") or {}).get("containers") or ():
        limits = (container.get("resources") or {}).get("limits") or {}
        total += int(limits.get(GPU_RESOURCE, 0) or 0)
    return total


def resource_gap(scheduler_message: str) -> dict[str, str]:
    """What a PodGroup lacks in the cluster, by resource (`{"nvidia.com/gpu": "16"}`), read from a pod's
    PodScheduled message under the coscheduling plugin; empty when the message names no gap."""
    found = _RESOURCE_GAP.search(scheduler_message)
    if found is None:
        return {}
    gap = {}
    for entry in _GAP_ENTRY.finditer(found["entries"]):
        amount = Decimal(entry["value"]).scaleb(int(entry["scale"]))
        gap[entry["name"]] = format(amount.normalize(), "f")
    return gap


@dataclass(frozen=True)
class ObservedPod:
    """One child pod as last seen."""

    name: str
    role: str
    attempt: int
    index: int | None
    phase: str
    node: str | None
    ready: bool
    deleting: bool
    created: datetime | None
    started: datetime | None
    gpus: int
    failure: str
    scheduler_message: str
    progress: str | None
    spec_hash: str = ""
    #: The pod's IP, once its sandbox is up (the head's is published as its Service's endpoint).
    ip: str | None = None
    #: Its containers' priced requests (the cost model's input).
    containers: tuple[cost.Container, ...] = ()

    @property
    def bound(self) -> bool:
        return self.node is not None

    @property
    def failed(self) -> bool:
        return self.phase == "Failed"


#: How much of a failed container's own last words goes into the failure (its last log lines when
#: the pod asks for them: `terminationMessagePolicy: FallbackToLogsOnError`).
LAST_WORDS_CHARS = 400


def _failure(status: Mapping[str, Any]) -> str:
    """Why a pod failed, from its container states (exit code, reason, and the last non-empty line of
    its termination message: usually the error it died of), or its own reason."""
    for container in status.get("containerStatuses") or ():
        terminated = (container.get("state") or {}).get("terminated")
        if terminated and terminated.get("exitCode", 0) != 0:
            reason = terminated.get("reason") or "Error"
            said = (
                f"container {container.get('name')} exited with code {terminated.get('exitCode')} ({reason})"
            )
            lines = [line.strip() for line in str(terminated.get("message") or "").splitlines()]
            last = next((line for line in reversed(lines) if line), "")
            if len(last) > LAST_WORDS_CHARS:
                last = "..." + last[-LAST_WORDS_CHARS:]
            return f"{said}: {last}" if last else said
    return str(status.get("reason") or status.get("message") or "")


def observe_pod(pod: Mapping[str, Any]) -> ObservedPod:
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    status = pod.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or ()}
    scheduled = conditions.get("PodScheduled") or {}
    ready = conditions.get("Ready") or {}
    index = labels.get(LABEL_INDEX)
    return ObservedPod(
        name=str(meta.get("name")),
        role=str(labels.get(LABEL_ROLE, "")),
        attempt=int(labels.get(LABEL_ATTEMPT, 0) or 0),
        index=int(index) if index is not None else None,
        phase=str(status.get("phase") or "Pending"),
        node=(pod.get("spec") or {}).get("nodeName") or None,
        ready=ready.get("status") == "True",
        deleting=bool(meta.get("deletionTimestamp")),
        created=_time(meta.get("creationTimestamp")),
        started=_time(status.get("startTime")),
        gpus=pod_gpus(pod),
        failure=_failure(status),
        scheduler_message=str(scheduled.get("message") or "") if scheduled.get("status") == "False" else "",
        progress=(meta.get("annotations") or {}).get(PROGRESS_ANNOTATION),
        spec_hash=str(labels.get(LABEL_SPEC_HASH, "")),
        ip=status.get("podIP") or None,
        containers=cost.containers_of(pod),
    )


@dataclass(frozen=True)
class ObservedNode:
    """A node's readiness, GPU capacity and GPU product."""

    name: str
    ready: bool
    gpus: int
    product: str | None
    unschedulable: bool


def observe_node(node: Mapping[str, Any]) -> ObservedNode:
    meta = node.get("metadata") or {}
    status = node.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or ()}
    return ObservedNode(
        name=str(meta.get("name")),
        ready=(conditions.get("Ready") or {}).get("status") == "True",
        gpus=int((status.get("allocatable") or {}).get(GPU_RESOURCE, 0) or 0),
        product=(meta.get("labels") or {}).get(GPU_PRODUCT_LABEL),
        unschedulable=bool((node.get("spec") or {}).get("unschedulable")),
    )


@dataclass(frozen=True)
class ClusterView:
    """Nodes and the GPUs that pods (of any owner) hold on them: for Unschedulable messages and cost."""

    nodes: Mapping[str, ObservedNode]
    #: GPUs held per node by pods of any owner. A callable, because only an Unschedulable message
    #: needs it: the operator then lists pods once instead of watching every pod in the cluster.
    gpus_in_use: Callable[[], Mapping[str, int]]
    #: Every TrainingJob's pods with their job's (namespace, name), as the operator's pod cache holds
    #: them (no API call): who holds what a waiting gang lacks. A callable: read only then.
    job_pods: Callable[[], Iterable[tuple[tuple[str, str], ObservedPod]]] = field(default=lambda: ())

    def free_gpus(self, product: str | None, ignore: Mapping[str, int] | None = None) -> tuple[int, int]:
        """(free GPUs, matching Ready nodes) for a product (None: any GPU node); `ignore` adds back
        GPUs that the job's own pods hold (they would be freed by a retry)."""
        free = 0
        count = 0
        in_use = self.gpus_in_use()
        for node in self.nodes.values():
            if not node.ready or node.unschedulable or node.gpus == 0:
                continue
            if product is not None and node.product != product:
                continue
            count += 1
            used = max(in_use.get(node.name, 0) - (ignore or {}).get(node.name, 0), 0)
            free += max(node.gpus - used, 0)
        return free, count
