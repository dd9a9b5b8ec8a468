"""Simulated nodes (kwok) and the pod-crash switch that tests flip.

There is no kubelet and no GPU here: kwok plays the kubelet for nodes carrying `KWOK_NODE_ANNOTATION`
(their status heartbeats, and pods on them become Running), and the GPU nodes advertise
`nvidia.com/gpu` the way the NVIDIA device plugin and GPU feature discovery would on a real H100 node.
The scheduler, quotas and everything above the kubelet are the real thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# kwok manages only nodes with this annotation (`--manage-nodes-with-annotation-selector`).
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_NODE_ANNOTATION_VALUE = "fake"
SIMULATED_LABEL = "tandem.dev/simulated"

# Set this annotation to "true" on a pod (at creation, or later with a patch) and kwok fails it:
# phase Failed, each container terminated with exit code CRASH_EXIT_CODE_ANNOTATION (default 1)
# and reason CRASH_REASON_ANNOTATION (default "Error"). The pod must be Running first; one created
# with the annotation is Running for an instant, then Failed. See tandem/devcluster/kwok/pod-crash.yaml.
CRASH_POD_ANNOTATION = "devcluster.tandem.dev/crash"
CRASH_EXIT_CODE_ANNOTATION = "devcluster.tandem.dev/crash-exit-code"
CRASH_REASON_ANNOTATION = "devcluster.tandem.dev/crash-reason"
#: A Running pod with this annotation set to "true" succeeds (exit 0); see kwok/pod-complete.yaml here.
COMPLETE_POD_ANNOTATION = "devcluster.tandem.dev/complete"

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
GPUS_PER_NODE = 8
# The taint the NVIDIA GPU operator's convention puts on GPU nodes: only pods that tolerate it land there.
GPU_TAINT: dict[str, str] = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
GPU_TOLERATION: dict[str, str] = {
    "key": GPU_RESOURCE,
    "operator": "Equal",
    "value": "present",
    "effect": "NoSchedule",
}


@dataclass(frozen=True)
class NodeSpec:
    """Shape of one simulated node; GPU nodes look like an 8x H100 80GB server."""

    name: str
    gpus: int = 0
    cpu: str = "64"
    memory: str = "256Gi"
    pods: str = "250"
    ephemeral_storage: str = "1Ti"


def gpu_node(index: int) -> NodeSpec:
    return NodeSpec(
        f"gpu-node-{index}", gpus=GPUS_PER_NODE, cpu="192", memory="2Ti", ephemeral_storage="30Ti"
    )


def cpu_node(index: int) -> NodeSpec:
    return NodeSpec(f"cpu-node-{index}")


def default_nodes(gpu_nodes: int = 2, cpu_nodes: int = 1) -> list[NodeSpec]:
    """The nodes `cluster up` registers: `gpu-node-0..` then `cpu-node-0..`."""
    return [gpu_node(i) for i in range(gpu_nodes)] + [cpu_node(i) for i in range(cpu_nodes)]


def node_manifest(spec: NodeSpec) -> dict[str, Any]:
    """The Node object to create; kwok keeps the given capacity and fills in conditions and addresses."""
    resources = {
        "cpu": spec.cpu,
        "memory": spec.memory,
        "pods": spec.pods,
        "ephemeral-storage": spec.ephemeral_storage,
    }
    labels = {
        "kubernetes.io/hostname": spec.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
        SIMULATED_LABEL: "true",
    }
    taints: list[dict[str, str]] = []
    if spec.gpus:
        resources[GPU_RESOURCE] = str(spec.gpus)
        labels |= {
            "nvidia.com/gpu.product": GPU_PRODUCT,
            "nvidia.com/gpu.count": str(spec.gpus),
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.memory": "81559",
        }
        taints.append(dict(GPU_TAINT))
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": spec.name,
            "annotations": {
                KWOK_NODE_ANNOTATION: KWOK_NODE_ANNOTATION_VALUE,
                "node.alpha.kubernetes.io/ttl": "0",
            },
            "labels": labels,
        },
        "spec": {"taints": taints},
        "status": {"allocatable": dict(resources), "capacity": dict(resources)},
    }
