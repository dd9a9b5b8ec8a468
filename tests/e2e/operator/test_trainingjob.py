"""TrainingJob on a real control plane with kwok GPU nodes: gang scheduling, recovery, lifecycle.

kwok stands in for kubelets (no containers run): pods become Running when bound, and the
devcluster's crash/complete annotations end them as a dying or finishing process would. The
training driver's progress record is written here by the test, as the driver writes it in a pod.
"""

from __future__ import annotations

import json
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubeobjects import events, get, items, status_of
from operator_process import TAKEOVER_SECONDS, OperatorProcess, start_operator, wait_for

from tandem.api.trainingrun import TrainingRun
from tandem.devcluster.nodes import (
    COMPLETE_POD_ANNOTATION,
    CRASH_POD_ANNOTATION,
    NodeSpec,
    node_manifest,
)
from tandem.devinstall import Kubectl
from tandem.errors import UserError

WAIT = 30
CHECKPOINT_URI = "file:///checkpoints/ns/job/step-00000100"


def job_manifest(name: str, **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "trainer": {
            "builtin": {"size": "tiny", "dataset": {"uri": "file:///data/corpus.txt"}, "maxSteps": 2000}
        },
        "workers": {"replicas": 2},
        "checkpoint": {"storage": {"uri": "file:///checkpoints/job"}, "everySteps": 100},
        "failurePolicy": {"maxRestarts": 3, "backoffSeconds": 0},
        "scheduling": {"gangTimeoutSeconds": 20},
    }
    for key, value in spec.items():
        base[key] = value
    return {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": base,
    }


def apply(kubectl: Kubectl, namespace: str, manifest: dict[str, Any]) -> None:
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(manifest))


def phase_is(kubectl: Kubectl, namespace: str, name: str, phase: str) -> dict[str, Any] | None:
    status = status_of(kubectl, namespace, "tj", name)
    return status if status.get("phase") == phase else None


def wait_phase(
    kubectl: Kubectl, namespace: str, name: str, phase: str, timeout: float = WAIT
) -> dict[str, Any]:
    return wait_for(partial(phase_is, kubectl, namespace, name, phase), timeout, f"{name} {phase}")


def pods(kubectl: Kubectl, namespace: str, name: str) -> list[dict[str, Any]]:
    return [
        pod
        for pod in items(kubectl, namespace, "pods", f"-l=tandem.dev/trainingjob={name}")
        if not pod["metadata"].get("deletionTimestamp")
    ]


def annotate(kubectl: Kubectl, namespace: str, pod: str, key: str, value: str) -> None:
    kubectl.run("annotate", "--overwrite", "pod", pod, "-n", namespace, f"{key}={value}")


def report_progress(
    kubectl: Kubectl, namespace: str, head: str, step: int, checkpoint_step: int | None
) -> None:
    record: dict[str, Any] = {
        "step": step,
        "totalSteps": 2000,
        "epoch": 0,
        "loss": 2.53219,
        "samplesPerSecond": 812.5,
    }
    if checkpoint_step is not None:
        record["checkpoint"] = {
            "step": checkpoint_step,
            "uri": CHECKPOINT_URI,
            "time": "2026-11-26T04:00:00Z",
        }
    annotate(kubectl, namespace, head, "tandem.dev/progress", json.dumps(record))


def run_of(pod: dict[str, Any]) -> TrainingRun:
    """The run document the pod received, parsed as the pod parses it."""
    return TrainingRun.from_env(
        {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"] if "value" in e}
    )


pytestmark = pytest.mark.usefixtures("operator")


def test_gang_lands_on_gpu_nodes_with_resources_and_tolerations(kubectl: Kubectl, namespace: str) -> None:
    workers = {
        "replicas": 4,
        "resources": {"gpu": 2, "cpu": "4", "memory": "16Gi"},
        "gpuProduct": "NVIDIA-H100-80GB-HBM3",
    }
    apply(kubectl, namespace, job_manifest("gpu", workers=workers, batch={"perDevice": 4}))
    wait_phase(kubectl, namespace, "gpu", "Running")  # Running once all are bound; ready may trail it
    wait_for(
        lambda: status_of(kubectl, namespace, "tj", "gpu").get("workersDisplay") == "4/4",
        WAIT,
        "all 4 workers ready in status",
    )
    found = pods(kubectl, namespace, "gpu")
    assert len(found) == 5
    job_uid = get(kubectl, namespace, "tj", "gpu")["metadata"]["uid"]
    for pod in found:
        assert pod["metadata"]["ownerReferences"][0]["uid"] == job_uid
        assert pod["spec"]["restartPolicy"] == "Never"
        role = pod["metadata"]["labels"]["tandem.dev/role"]
        if role == "worker":
            assert pod["spec"]["nodeName"].startswith("gpu-node-")
            assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"][
                "tolerations"
            ]
            assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
            assert pod["spec"]["containers"][0]["command"] == ["tandem", "train", "worker"]
        else:
            assert pod["spec"]["nodeName"] == "cpu-node-0"  # the head asks for no GPU
            assert run_of(pod).spec.workers.replicas == 4
    # The head's Service is made once the head pod has an IP (its name resolves from then on), with
    # an EndpointSlice that names the head: what DNS answers for gpu-head.<namespace>.svc.
    wait_for(
        lambda: items(kubectl, namespace, "services", "-l=tandem.dev/trainingjob=gpu") != [],
        WAIT,
        "the head's Service",
    )
    service = get(kubectl, namespace, "service", "gpu-head")
    assert service["metadata"]["ownerReferences"][0]["uid"] == job_uid
    assert service["spec"]["clusterIP"] == "None"
    head_ip = get(kubectl, namespace, "pod", "gpu-1-head")["status"]["podIP"]
    wait_for(
        lambda: head_endpoint(kubectl, namespace, "gpu") == ("gpu-1-head", head_ip),
        WAIT,
        "the head Service to name the head pod",
    )


def head_endpoint(kubectl: Kubectl, namespace: str, job: str) -> tuple[str, str] | None:
    """(pod, IP) that the job's head Service resolves to, from the EndpointSlices DNS reads."""
    slices = items(kubectl, namespace, "endpointslices", f"-l=kubernetes.io/service-name={job}-head")
    found = [(e["targetRef"]["name"], e["addresses"][0]) for s in slices for e in s.get("endpoints") or ()]
    assert len(found) <= 1, f"the head Service resolves to several pods: {found}"
    return found[0] if found else None


def test_progress_annotation_shows_in_kubectl_get(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    apply(kubectl, namespace, job_manifest("prog"))
    wait_phase(kubectl, namespace, "prog", "Running")
    head = "prog-1-head"
    report_progress(kubectl, namespace, head, step=120, checkpoint_step=100)
    status = wait_for(
        lambda: (s := status_of(kubectl, namespace, "tj", "prog")).get("stepDisplay") == "120/2000" and s,
        WAIT,
        "progress in status",
    )
    assert status["progress"]["loss"] == 2.5322
    assert status["lastCheckpoint"] == {"step": 100, "uri": CHECKPOINT_URI, "time": "2026-11-26T04:00:00Z"}
    row = kubectl.run("get", "tj", "prog", "-n", namespace, "--no-headers").split()
    assert row[:6] == ["prog", "Running", "2/2", "120/2000", "2.5322", "100"]
    # Status is one atomic field owned by the operator (each status write is cheaper for the API server).
    fields = json.loads(
        kubectl.run("get", "tj", "prog", "-n", namespace, "-o", "json", "--show-managed-fields")
    )
    owned = [m["fieldsV1"] for m in fields["metadata"]["managedFields"] if m.get("subresource") == "status"]
    assert owned == [{"f:status": {}}]

    annotate(kubectl, namespace, head, "tandem.dev/progress", "{not json")
    wait_for(
        lambda: any(e["reason"] == "BadProgress" for e in events(kubectl, namespace, "prog")),
        WAIT,
        "a BadProgress warning",
    )
    assert operator.healthy()
    assert status_of(kubectl, namespace, "tj", "prog")["stepDisplay"] == "120/2000"  # kept, not broken


def test_crashed_worker_restarts_the_gang_from_the_last_checkpoint(kubectl: Kubectl, namespace: str) -> None:
    apply(kubectl, namespace, job_manifest("crash"))
    wait_phase(kubectl, namespace, "crash", "Running")
    report_progress(kubectl, namespace, "crash-1-head", step=130, checkpoint_step=100)
    wait_for(lambda: status_of(kubectl, namespace, "tj", "crash").get("lastCheckpoint"), WAIT, "checkpoint")

    annotate(kubectl, namespace, "crash-1-worker-1", CRASH_POD_ANNOTATION, "true")
    wait_for(
        lambda: (
            (s := status_of(kubectl, namespace, "tj", "crash")).get("attempt") == 2
            and s.get("phase") == "Running"
        ),
        WAIT,
        "the second gang Running",
    )
    status = status_of(kubectl, namespace, "tj", "crash")
    assert status["restarts"] == 1
    assert status["lastFailure"]["reason"] == "WorkerFailed"
    assert "crash-1-worker-1" in status["lastFailure"]["message"]
    names = sorted(p["metadata"]["name"] for p in pods(kubectl, namespace, "crash"))
    assert names == ["crash-2-head", "crash-2-worker-0", "crash-2-worker-1"]
    head = get(kubectl, namespace, "pod", "crash-2-head")
    assert (run_of(head).resume_from, run_of(head).attempt) == (CHECKPOINT_URI, 2)
    warnings = [e for e in events(kubectl, namespace, "crash") if e["type"] == "Warning"]
    assert any(e["reason"] == "WorkerFailed" and "resume from step 100" in e["message"] for e in warnings)


def node_schedulable(kubectl: Kubectl, name: str) -> bool:
    node = json.loads(kubectl.run("get", "node", name, "-o", "json"))
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", ()))
    return ready and not node["spec"].get("taints")


def test_a_node_that_goes_away_restarts_the_gang_at_once(kubectl: Kubectl, namespace: str) -> None:
    """The node's watch event wakes the job (no periodic tick would notice within seconds); a
    simulated node of its own, so that other tests keep theirs."""
    node = f"lost-node-{uuid.uuid4().hex[:8]}"
    manifest = node_manifest(NodeSpec(node))
    manifest["metadata"]["labels"]["e2e.tandem.dev/node"] = node
    kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump(manifest))
    try:
        wait_for(partial(node_schedulable, kubectl, node), WAIT, f"node {node} Ready and untainted")
        workers = {"replicas": 2, "nodeSelector": {"e2e.tandem.dev/node": node}}
        apply(kubectl, namespace, job_manifest("lost", workers=workers))
        wait_phase(kubectl, namespace, "lost", "Running")
        kubectl.run("delete", "node", node)
        wait_for(
            lambda: (
                (status_of(kubectl, namespace, "tj", "lost").get("lastFailure") or {}).get("reason")
                == "NodeLost"
            ),
            15,  # well within the 60 s resync: the node's deletion itself woke the job
            "a NodeLost restart",
        )
        status = status_of(kubectl, namespace, "tj", "lost")
        assert status["restarts"] == 1
        assert node in status["lastFailure"]["message"]
    finally:
        kubectl.run("delete", "node", node, "--ignore-not-found")


def test_deleted_head_restarts_the_gang(kubectl: Kubectl, namespace: str) -> None:
    apply(kubectl, namespace, job_manifest("headless"))
    wait_phase(kubectl, namespace, "headless", "Running")
    kubectl.run("delete", "pod", "headless-1-head", "-n", namespace, "--wait=false")
    wait_for(
        lambda: (
            (s := status_of(kubectl, namespace, "tj", "headless")).get("attempt") == 2
            and s.get("phase") == "Running"
        ),
        WAIT,
        "the second gang Running",
    )
    status = status_of(kubectl, namespace, "tj", "headless")
    assert status["restarts"] == 1
    assert status["lastFailure"]["reason"] == "PodDeleted"
    # The head Service follows the new head (workers of gang 2 dial it), once it has an IP.
    new_head = partial(get, kubectl, namespace, "pod", "headless-2-head")
    wait_for(
        lambda: (
            head_endpoint(kubectl, namespace, "headless")
            == ("headless-2-head", new_head()["status"]["podIP"])
        ),
        WAIT,
        "the head Service to name the new head",
    )


def test_exhausted_restarts_fail_the_job(kubectl: Kubectl, namespace: str) -> None:
    apply(kubectl, namespace, job_manifest("fragile", failurePolicy={"maxRestarts": 1, "backoffSeconds": 0}))
    wait_phase(kubectl, namespace, "fragile", "Running")
    annotate(kubectl, namespace, "fragile-1-worker-0", CRASH_POD_ANNOTATION, "true")
    wait_for(lambda: status_of(kubectl, namespace, "tj", "fragile").get("attempt") == 2, WAIT, "second gang")
    wait_phase(kubectl, namespace, "fragile", "Running")
    annotate(kubectl, namespace, "fragile-2-head", CRASH_POD_ANNOTATION, "true")
    status = wait_phase(kubectl, namespace, "fragile", "Failed")
    assert status["restarts"] == 1
    assert status["lastFailure"]["reason"] == "HeadFailed"
    assert "completionTime" in status
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Failed"]["status"] == "True"
    wait_for(
        lambda: all(
            p["metadata"]["labels"]["tandem.dev/role"] == "head" for p in pods(kubectl, namespace, "fragile")
        ),
        WAIT,
        "workers deleted (no GPUs held by a failed job)",
    )


def test_too_many_gpus_is_unschedulable_and_leaves_no_pods(kubectl: Kubectl, namespace: str) -> None:
    """3 workers x 8 GPUs on two 8-GPU nodes: two could bind, but no partial gang may hold GPUs."""
    workers = {"replicas": 3, "resources": {"gpu": 8}, "gpuProduct": "NVIDIA-H100-80GB-HBM3"}
    apply(
        kubectl,
        namespace,
        job_manifest(
            "huge",
            workers=workers,
            batch={"perDevice": 4},
            scheduling={"gangTimeoutSeconds": 3},
            failurePolicy={"maxRestarts": 3, "backoffSeconds": 60},
        ),
    )
    status = wait_phase(kubectl, namespace, "huge", "Pending", timeout=WAIT)
    scheduled = {c["type"]: c for c in status["conditions"]}["Scheduled"]
    assert scheduled["reason"] == "Unschedulable"
    assert "needs 24 nvidia.com/gpu (3 workers x 8)" in scheduled["message"]
    assert "nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3" in scheduled["message"]
    assert "16 free on 2 ready nodes" in scheduled["message"]
    wait_for(lambda: pods(kubectl, namespace, "huge") == [], WAIT, "every pod of the gang deleted")
    assert status["restarts"] == 0
    # The gang did not bind within the Scheduling hold: its creation is told (as Scheduling, or folded
    # into the Unschedulable warning when both came in one pass).
    said = [e["message"] for e in events(kubectl, namespace, "huge")]
    assert any("gang 1: 4 pods created together" in message for message in said), said


def test_suspend_deletes_pods_and_resume_continues_from_the_checkpoint(
    kubectl: Kubectl, namespace: str
) -> None:
    apply(kubectl, namespace, job_manifest("pause"))
    wait_phase(kubectl, namespace, "pause", "Running")
    report_progress(kubectl, namespace, "pause-1-head", step=150, checkpoint_step=100)
    wait_for(lambda: status_of(kubectl, namespace, "tj", "pause").get("lastCheckpoint"), WAIT, "checkpoint")

    kubectl.run("patch", "tj", "pause", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    status = wait_phase(kubectl, namespace, "pause", "Suspended")
    wait_for(lambda: pods(kubectl, namespace, "pause") == [], WAIT, "pods deleted while suspended")
    assert status["progress"]["step"] == 150  # status kept

    kubectl.run("patch", "tj", "pause", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    wait_phase(kubectl, namespace, "pause", "Running")
    head = next(
        p for p in pods(kubectl, namespace, "pause") if p["metadata"]["labels"]["tandem.dev/role"] == "head"
    )
    assert run_of(head).resume_from == CHECKPOINT_URI
    assert status_of(kubectl, namespace, "tj", "pause")["restarts"] == 0


def test_deadline_fails_the_job(kubectl: Kubectl, namespace: str) -> None:
    apply(kubectl, namespace, job_manifest("late", activeDeadlineSeconds=3))
    status = wait_phase(kubectl, namespace, "late", "Failed")
    assert status["lastFailure"]["reason"] == "DeadlineExceeded"
    wait_for(
        lambda: all(
            p["metadata"]["labels"]["tandem.dev/role"] == "head" for p in pods(kubectl, namespace, "late")
        ),
        WAIT,
        "workers deleted",
    )


def test_success_then_ttl_deletes_the_job_and_its_children(kubectl: Kubectl, namespace: str) -> None:
    apply(kubectl, namespace, job_manifest("done", ttlSecondsAfterFinished=2))
    wait_phase(kubectl, namespace, "done", "Running")
    annotate(kubectl, namespace, "done-1-head", COMPLETE_POD_ANNOTATION, "true")
    status = wait_phase(kubectl, namespace, "done", "Succeeded")
    assert {c["type"]: c for c in status["conditions"]}["Complete"]["status"] == "True"

    def job_gone() -> bool:
        try:
            get(kubectl, namespace, "tj", "done")
        except UserError as error:
            return "NotFound" in str(error)
        return False

    wait_for(job_gone, WAIT, "the TTL to delete the job")
    wait_for(lambda: pods(kubectl, namespace, "done") == [], WAIT, "children garbage-collected")


def test_delete_removes_every_child(kubectl: Kubectl, namespace: str) -> None:
    apply(kubectl, namespace, job_manifest("bye"))
    wait_phase(kubectl, namespace, "bye", "Running")
    wait_for(
        lambda: items(kubectl, namespace, "services", "-l=tandem.dev/trainingjob=bye") != [],
        WAIT,
        "the head's Service",
    )
    kubectl.run("delete", "tj", "bye", "-n", namespace, "--wait=false")
    wait_for(lambda: pods(kubectl, namespace, "bye") == [], WAIT, "pods garbage-collected")
    wait_for(
        lambda: items(kubectl, namespace, "services", "-l=tandem.dev/trainingjob=bye") == [],
        WAIT,
        "service garbage-collected",
    )
    wait_for(
        lambda: items(kubectl, namespace, "endpointslices", "-l=tandem.dev/trainingjob=bye") == [],
        WAIT,
        "the head's EndpointSlice garbage-collected",
    )


def test_operator_killed_mid_reconcile_leaves_one_set_of_children(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess, second_operator: Path
) -> None:
    kubeconfig = operator.kubeconfig
    first = start_operator(kubeconfig, second_operator / "first.log")
    apply(kubectl, namespace, job_manifest("solo", workers={"replicas": 6}, batch={"perDevice": 4}))
    wait_for(lambda: pods(kubectl, namespace, "solo"), WAIT, "the first pods")
    first.kill()  # SIGKILL while it is creating the gang
    second = start_operator(kubeconfig, second_operator / "second.log")
    try:
        # Another replica: it leads once the killed one's Lease has expired.
        wait_phase(kubectl, namespace, "solo", "Running", timeout=WAIT + TAKEOVER_SECONDS)
        names = sorted(p["metadata"]["name"] for p in pods(kubectl, namespace, "solo"))
        assert names == ["solo-1-head"] + [f"solo-1-worker-{i}" for i in range(6)]
        assert len(items(kubectl, namespace, "services", "-l=tandem.dev/trainingjob=solo")) == 1
        assert status_of(kubectl, namespace, "tj", "solo")["attempt"] == 1
    finally:
        second.stop()


def test_a_job_deleted_while_the_operator_is_down_goes_with_its_children(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess, second_operator: Path
) -> None:
    """No finalizer on a job: deleting it never waits for the operator (kopf timers would add one)."""
    kubeconfig = operator.kubeconfig
    first = start_operator(kubeconfig, second_operator / "first.log")
    try:
        apply(kubectl, namespace, job_manifest("orphan"))
        wait_phase(kubectl, namespace, "orphan", "Running")
    finally:
        first.stop()
    assert items(kubectl, namespace, "trainingjobs")[0]["metadata"].get("finalizers") is None
    kubectl.run("delete", "tj", "orphan", "-n", namespace, "--timeout=60s")  # returns once it is gone
    wait_for(lambda: pods(kubectl, namespace, "orphan") == [], WAIT, "pods garbage-collected")
