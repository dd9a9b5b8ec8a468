"""The PodGroup of one gang, for the coscheduling plugin of sigs.k8s.io/scheduler-plugins.

With the operator's `gangScheduler: coscheduling`, every attempt gets a PodGroup named after the
`scheduling.x-k8s.io/pod-group` label its pods carry (`<job>-<attempt>`), created before the pods:
the plugin holds each pod at Permit until `minMember` of the group can be placed, and refuses the
group at PreFilter while the cluster lacks `minResources`, so a gang is bound whole or not at all and
two gangs contending for the same GPUs never each hold a part of them.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from tandem.api.trainingjob import TrainingJobSpec
from tandem.operator.gpu import GPU_RESOURCE
from tandem.operator.trainingjob.builders import LABEL_JOB, owner_reference

API_VERSION = "scheduling.x-k8s.io/v1alpha1"
KIND = "PodGroup"


def pod_group_name(job: str, attempt: int) -> str:
    """The same name as the pods' `scheduling.x-k8s.io/pod-group` label."""
    return f"{job}-{attempt}"


def _quantity(value: Any) -> Decimal:
    from kubernetes.utils import parse_quantity

    result: Decimal = parse_quantity(str(value))  # type: ignore[no-untyped-call]
    return result


def gang_resources(spec: TrainingJobSpec) -> dict[str, str]:
    """What the whole gang requests (head + every worker): cpu in millicores, memory in bytes, GPUs."""
    members = [(spec.head.resources, 1), (spec.workers.resources, spec.workers.replicas)]
    cpu = sum((_quantity(r.cpu) * n for r, n in members if r.cpu is not None), Decimal(0))
    memory = sum((_quantity(r.memory) * n for r, n in members if r.memory is not None), Decimal(0))
    gpus = sum(r.gpu * n for r, n in members)
    total: dict[str, str] = {}
    if cpu:
        total["cpu"] = f"{int((cpu * 1000).to_integral_value(rounding='ROUND_CEILING'))}m"
    if memory:
        total["memory"] = str(int(memory.to_integral_value(rounding="ROUND_CEILING")))
    if gpus:
        total[GPU_RESOURCE] = str(gpus)
    return total


def pod_group(spec: TrainingJobSpec, *, job: str, uid: str, namespace: str, attempt: int) -> dict[str, Any]:
    """The PodGroup of attempt `attempt`: all its pods, all their requests, the job's gang timeout."""
    group: dict[str, Any] = {
        "minMember": spec.workers.replicas + 1,
        "scheduleTimeoutSeconds": spec.scheduling.gang_timeout_seconds,
    }
    resources = gang_resources(spec)
    if resources:
        group["minResources"] = resources
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": pod_group_name(job, attempt),
            "namespace": namespace,
            "labels": {LABEL_JOB: job, "app.kubernetes.io/managed-by": "tandem-operator"},
            "ownerReferences": [owner_reference(job, uid)],
        },
        "spec": group,
    }
