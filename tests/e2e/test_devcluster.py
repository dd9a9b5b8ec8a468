"""The local control plane: simulated GPU nodes, scheduling, controllers, pod crashes, restart."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client

from tandem.devcluster import cluster as devcluster
from tandem.devcluster import nodes

pytestmark = pytest.mark.e2e
T = TypeVar("T")
POD_TIMEOUT = 30.0


def eventually(check: Callable[[], T | None], what: str, timeout: float = POD_TIMEOUT) -> T:
    """Poll `check` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def pod(name: str, *, gpus: int = 0, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": "registry.example/tandem:test"}
    spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    if gpus:
        container["resources"] = {"limits": {nodes.GPU_RESOURCE: str(gpus)}}
        spec["tolerations"] = [nodes.GPU_TOLERATION]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": spec,
    }


def phase_of(core: Any, namespace: str, name: str, phase: str) -> Any:
    found = core.read_namespaced_pod(name, namespace)
    return found if found.status.phase == phase else None


def test_nodes_advertise_gpus_labels_and_taints(kube_client: Any) -> None:
    core: Any = client.CoreV1Api(kube_client)
    listed = {n.metadata.name: n for n in core.list_node().items}
    gpu_nodes = [n for n in listed.values() if nodes.GPU_RESOURCE in (n.status.capacity or {})]
    cpu_nodes = [n for n in listed.values() if nodes.GPU_RESOURCE not in (n.status.capacity or {})]
    assert len(gpu_nodes) >= 2
    assert len(cpu_nodes) >= 1
    for node in gpu_nodes:
        assert node.status.capacity[nodes.GPU_RESOURCE] == "8"
        assert node.status.allocatable[nodes.GPU_RESOURCE] == "8"
        assert node.metadata.labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        assert node.metadata.labels["nvidia.com/gpu.count"] == "8"
        assert node.metadata.labels["nvidia.com/gpu.present"] == "true"
        taints = {(t.key, t.value, t.effect) for t in node.spec.taints}
        assert ("nvidia.com/gpu", "present", "NoSchedule") in taints
    for node in listed.values():
        ready = {c.type: c.status for c in node.status.conditions}["Ready"]
        assert ready == "True", node.metadata.name
    assert all(not n.spec.taints for n in cpu_nodes)


def test_gpu_pod_runs_on_a_gpu_node(kube_client: Any, namespace: str) -> None:
    core: Any = client.CoreV1Api(kube_client)
    core.create_namespaced_pod(namespace, pod("trainer", gpus=1))
    running = eventually(lambda: phase_of(core, namespace, "trainer", "Running"), "the GPU pod to run")
    node = core.read_node(running.spec.node_name)
    assert node.metadata.labels["nvidia.com/gpu.present"] == "true"


def test_pod_without_toleration_stays_off_gpu_nodes(kube_client: Any, namespace: str) -> None:
    core: Any = client.CoreV1Api(kube_client)
    core.create_namespaced_pod(namespace, pod("web"))
    running = eventually(lambda: phase_of(core, namespace, "web", "Running"), "the CPU pod to run")
    assert running.spec.node_name.startswith("cpu-node-")


def test_too_many_gpus_stays_pending(kube_client: Any, namespace: str) -> None:
    core: Any = client.CoreV1Api(kube_client)
    core.create_namespaced_pod(namespace, pod("greedy", gpus=9))

    def unschedulable() -> bool:
        conditions = core.read_namespaced_pod("greedy", namespace).status.conditions or []
        return any(c.type == "PodScheduled" and c.reason == "Unschedulable" for c in conditions)

    eventually(unschedulable, "the scheduler to report the 9-GPU pod unschedulable")


def test_crash_annotation_fails_a_running_pod(kube_client: Any, namespace: str) -> None:
    core: Any = client.CoreV1Api(kube_client)
    core.create_namespaced_pod(namespace, pod("worker", gpus=8))
    eventually(lambda: phase_of(core, namespace, "worker", "Running"), "the pod to run")
    patch = {
        "metadata": {
            "annotations": {nodes.CRASH_POD_ANNOTATION: "true", nodes.CRASH_EXIT_CODE_ANNOTATION: "137"}
        }
    }
    core.patch_namespaced_pod("worker", namespace, patch)
    failed = eventually(lambda: phase_of(core, namespace, "worker", "Failed"), "the annotated pod to fail")
    terminated = failed.status.container_statuses[0].state.terminated
    assert terminated.exit_code == 137
    assert terminated.reason == "Error"
    assert failed.status.container_statuses[0].state.running is None


def test_pod_created_with_crash_annotation_fails(kube_client: Any, namespace: str) -> None:
    core: Any = client.CoreV1Api(kube_client)
    core.create_namespaced_pod(namespace, pod("doomed", annotations={nodes.CRASH_POD_ANNOTATION: "true"}))
    failed = eventually(lambda: phase_of(core, namespace, "doomed", "Failed"), "the annotated pod to fail")
    assert failed.status.container_statuses[0].state.terminated.exit_code == 1


def test_deployment_pods_run_and_are_garbage_collected(kube_client: Any, namespace: str) -> None:
    apps: Any = client.AppsV1Api(kube_client)
    core: Any = client.CoreV1Api(kube_client)
    labels = {"app": "web"}
    template = {"metadata": {"labels": labels}, "spec": {"containers": [{"name": "web", "image": "nginx"}]}}
    deployment = {
        "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": labels}, "template": template},
    }
    apps.create_namespaced_deployment(namespace, deployment)

    def running_pods() -> list[Any]:
        found = core.list_namespaced_pod(namespace, label_selector="app=web").items
        return [p for p in found if p.status.phase == "Running"]

    eventually(lambda: len(running_pods()) == 2, "2 running replicas")
    eventually(
        lambda: apps.read_namespaced_deployment("web", namespace).status.available_replicas == 2,
        "availability",
    )
    apps.delete_namespaced_deployment("web", namespace, propagation_policy="Background")
    eventually(
        lambda: not core.list_namespaced_pod(namespace).items, "the garbage collector to delete the pods"
    )


def test_token_request_issues_a_service_account_token(kube_client: Any, namespace: str) -> None:
    core: Any = client.CoreV1Api(kube_client)
    request = {"spec": {"audiences": ["tandem"], "expirationSeconds": 600}}
    token = core.create_namespaced_service_account_token("default", namespace, request).status.token
    authn: Any = client.AuthenticationV1Api(kube_client)
    review = authn.create_token_review({"spec": {"token": token, "audiences": ["tandem"]}})
    assert review.status.authenticated
    assert review.status.user.username == f"system:serviceaccount:{namespace}:default"


def test_kubectl_and_server_report_the_pinned_version(cluster: devcluster.ClusterInfo) -> None:
    out = subprocess.run(
        [str(cluster.kubectl), "--kubeconfig", str(cluster.kubeconfig), "version", "-o", "json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    versions = json.loads(out)
    assert versions["clientVersion"]["gitVersion"] == "v1.33.13"
    assert versions["serverVersion"]["gitVersion"] == "v1.33.13"


def test_up_on_a_running_cluster_only_reports_it(cluster: devcluster.ClusterInfo) -> None:
    start = time.monotonic()
    again = devcluster.up(cluster.name)
    assert again == cluster
    assert time.monotonic() - start < 10
    assert devcluster.status(cluster.name).running


def test_down_then_up_again() -> None:
    """A separate cluster: `down` leaves no process and no state, and a new `up` works (~10 s)."""
    name = "tandem-test-restart"
    try:
        first = devcluster.up(name)
        pids = [c.pid for c in devcluster.status(name).components]
        assert all(pids)
        assert devcluster.down(name) is True
        assert not first.state_dir.exists()
        # Gone, not even zombies: `down` signals whole process groups and reaps its children.
        assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []
        assert devcluster.down(name) is False
        second = devcluster.up(name)
        assert devcluster.status(name).running
        assert second.kubeconfig.exists()
    finally:
        devcluster.down(name)
    assert not devcluster.status(name).exists
