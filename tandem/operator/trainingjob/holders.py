"""Who holds what a waiting gang lacks: the TrainingJobs whose pods sit on the nodes it could use.

A gang that waits for GPUs waits, most of the time, for another job to end; the scheduler names
the resource, not the job. The operator's pod cache already knows every TrainingJob's pods, their
nodes and their requests, so naming the holders costs no API call. Pods of other owners are not in
that cache: a message that names no TrainingJob says so rather than guessing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tandem.operator.gpu import GPU_RESOURCE
from tandem.operator.trainingjob.observe import (
    TERMINAL_PHASES,
    ObservedNode,
    ObservedPod,
    resource_gap,
)

#: (namespace, name) of a TrainingJob.
JobKey = tuple[str, str]
#: Holders named in one message; the rest are counted ("and 3 more").
MAX_HOLDERS = 5
#: kube-scheduler's NodeResourcesFit words for a node without room: `3 Insufficient nvidia.com/gpu.`
_INSUFFICIENT = re.compile(r"Insufficient ([A-Za-z0-9./_-]*[A-Za-z0-9_])")


def lacking(scheduler_message: str) -> list[str]:
    """The resources a scheduler message says the pods wait for: the coscheduling plugin's gap, else
    kube-scheduler's `Insufficient <resource>`; sorted, without repeats."""
    names = set(resource_gap(scheduler_message)) or set(_INSUFFICIENT.findall(scheduler_message))
    return sorted(names)


def held(pod: ObservedPod, resource: str) -> float:
    """How much of `resource` a pod holds on its node (its requests; GPUs whole). Only the resources
    the operator reads from its pods (GPUs, CPU, memory) count; others read as 0."""
    if resource == GPU_RESOURCE:
        return float(pod.gpus)
    if resource == "cpu":
        return sum(container.request.cpu for container in pod.containers)
    if resource == "memory":
        return sum(container.request.memory_bytes for container in pod.containers)
    return 0.0


def candidate_nodes(nodes: Mapping[str, ObservedNode], resource: str, product: str | None) -> set[str]:
    """Nodes the gang could use for `resource`: Ready and schedulable; for GPUs, those with GPUs of
    the product the workers ask for (any product when they name none)."""
    chosen = set()
    for node in nodes.values():
        if not node.ready or node.unschedulable:
            continue
        if resource == GPU_RESOURCE and (node.gpus == 0 or (product is not None and node.product != product)):
            continue
        chosen.add(node.name)
    return chosen


@dataclass(frozen=True)
class Holder:
    """A TrainingJob holding some of what a waiting gang lacks on the nodes it could use."""

    job: JobKey
    amounts: tuple[tuple[str, float], ...]
    nodes: int


def holders(
    pods: Iterable[tuple[JobKey, ObservedPod]],
    resources: Iterable[str],
    candidates: Mapping[str, set[str]],
    waiting: JobKey,
) -> list[Holder]:
    """Jobs other than `waiting` whose live pods hold any of `resources` on its candidate nodes (by
    resource), the largest holder of the first resource first."""
    names = list(resources)
    amounts: dict[JobKey, dict[str, float]] = {}
    where: dict[JobKey, set[str]] = {}
    for job, pod in pods:
        if job == waiting or pod.node is None or pod.phase in TERMINAL_PHASES:
            continue
        for resource in names:
            amount = held(pod, resource)
            if amount > 0 and pod.node in candidates.get(resource, ()):
                mine = amounts.setdefault(job, {})
                mine[resource] = mine.get(resource, 0.0) + amount
                where.setdefault(job, set()).add(pod.node)
    found = [
        Holder(job, tuple((r, amounts[job][r]) for r in names if r in amounts[job]), len(where[job]))
        for job in amounts
    ]
    first = names[0] if names else ""
    return sorted(found, key=lambda h: (-dict(h.amounts).get(first, 0.0), h.job))


def quantity(resource: str, amount: float) -> str:
    """An amount as people read it: GPUs and CPUs as numbers, memory in GiB."""
    if resource == "memory":
        return f"{amount / 2**30:.3g} GiB memory"
    return f"{amount:.4g} {resource}"


def holders_message(found: list[Holder], resources: list[str], candidates: int) -> str:
    """One clause naming the holders: `held on its 2 candidate nodes by TrainingJob ml/a (16
    nvidia.com/gpu on 2 nodes)`; at most MAX_HOLDERS named, the others counted."""
    what = ", ".join(resources)
    nodes = f"{candidates} candidate node{'s' if candidates != 1 else ''}"
    if not found:
        return f"no TrainingJob holds {what} on its {nodes} (other pods may, or the nodes are too few)"
    named = []
    for holder in found[:MAX_HOLDERS]:
        amounts = ", ".join(quantity(resource, amount) for resource, amount in holder.amounts)
        on = f" on {holder.nodes} node{'s' if holder.nodes != 1 else ''}"
        named.append(f"{holder.job[0]}/{holder.job[1]} ({amounts}{on})")
    more = f" and {len(found) - MAX_HOLDERS} more" if len(found) > MAX_HOLDERS else ""
    jobs = "TrainingJob" if len(found) == 1 else "TrainingJobs"
    return f"held on its {nodes} by {jobs} {', '.join(named)}{more}"
