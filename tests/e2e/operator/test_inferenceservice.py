"""InferenceService on a real control plane with kwok GPU nodes: children, phases, suspend, lineage, cleanup.

kwok stands in for kubelets: replica pods become Running and Ready when bound, but no container runs,
so the model server's metrics are not reachable here (the composed test,
test_inferenceservice_autoscaling.py, runs a real server under a real Prometheus for that). The
TrainingJob's checkpoints are written into its status here by the test, as the operator does when the
training driver reports one.
"""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubeobjects import events, get, items, status_of
from operator_process import OperatorProcess, start_operator, wait_for

from tandem.devinstall import Kubectl, install_example_volumes
from tandem.errors import UserError
from tandem.operator import cost
from tandem.operator.config import OperatorSettings

WAIT = 60
H100 = "NVIDIA-H100-80GB-HBM3"
PRICES = OperatorSettings().prices()  # the chart's defaults, which the session's operator runs with

pytestmark = pytest.mark.usefixtures("operator")


def service_manifest(name: str, **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"uri": "file:///models/minilm"},
        "runtime": "embeddings",
        "replicas": {"min": 1, "max": 4, "count": 2},
    }
    base.update(spec)
    return {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": name},
        "spec": base,
    }


def apply(kubectl: Kubectl, namespace: str, manifest: dict[str, Any]) -> None:
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(manifest))


def patch_spec(kubectl: Kubectl, namespace: str, kind: str, name: str, spec: dict[str, Any]) -> None:
    kubectl.run("patch", kind, name, "-n", namespace, "--type=merge", "-p", json.dumps({"spec": spec}))


def wait_phase(kubectl: Kubectl, namespace: str, name: str, phase: str) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        status = status_of(kubectl, namespace, "tisvc", name)
        return status if status.get("phase") == phase else None

    return wait_for(reached, WAIT, f"InferenceService {name} {phase}")


def replicas_of(kubectl: Kubectl, namespace: str, name: str) -> list[dict[str, Any]]:
    return [
        pod
        for pod in items(kubectl, namespace, "pods", f"-l=tandem.dev/inferenceservice={name}")
        if not pod["metadata"].get("deletionTimestamp")
    ]


def deployment(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    return get(kubectl, namespace, "deployment", name)


def command_of(obj: dict[str, Any]) -> list[str]:
    return list(obj["spec"]["template"]["spec"]["containers"][0]["command"])


def table_row(kubectl: Kubectl, namespace: str, name: str) -> dict[str, str]:
    """`kubectl get tisvc NAME` as {column: cell}, cut at the header's positions (cells may be empty)."""
    header, line = kubectl.run("get", "tisvc", name, "-n", namespace).rstrip().splitlines()[:2]
    starts = [match.start() for match in re.finditer(r"\S+", header)]
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    return {header[a:b].strip(): line[a:b].strip() for a, b in bounds}


def test_children_are_created_with_the_right_spec(kubectl: Kubectl, namespace: str) -> None:
    install_example_volumes(kubectl, namespace, ("models",))
    spec = {
        "model": {"uri": "pvc://models/minilm-l6"},
        "precision": "fp16",
        "batching": {"maxBatchSize": 64, "maxQueueDelayMs": 2, "maxQueueSize": 2048},
        "resources": {"gpu": 1, "cpu": "4", "memory": "16Gi"},
        "gpuProduct": H100,
    }
    apply(kubectl, namespace, service_manifest("embed", **spec))
    status = wait_phase(kubectl, namespace, "embed", "Ready")
    assert status["url"] == f"http://embed.{namespace}.svc"
    assert status["selector"] == "tandem.dev/inferenceservice=embed"
    owner_uid = get(kubectl, namespace, "tisvc", "embed")["metadata"]["uid"]

    found = deployment(kubectl, namespace, "embed")
    assert found["spec"]["replicas"] == 2
    assert found["metadata"]["ownerReferences"][0]["uid"] == owner_uid
    with_fields = json.loads(
        kubectl.run("get", "deployment", "embed", "-n", namespace, "-o", "json", "--show-managed-fields")
    )
    managers = {m["manager"] for m in with_fields["metadata"]["managedFields"] if m["operation"] == "Apply"}
    assert managers == {"tandem-operator"}
    command = command_of(found)
    flags = dict(zip(command[2::2], command[3::2], strict=True))
    assert command[:2] == ["tandem", "serve"]
    assert flags["--model-uri"] == "file:///models/models/minilm-l6"
    assert (flags["--max-batch-size"], flags["--max-queue-delay-ms"], flags["--max-queue-size"]) == (
        "64",
        "2",
        "2048",
    )
    assert flags["--model-name"] == "embed"
    wait_for(lambda: len(replicas_of(kubectl, namespace, "embed")) == 2, WAIT, "2 replica pods")
    for pod in replicas_of(kubectl, namespace, "embed"):
        assert pod["spec"]["nodeName"].startswith("gpu-node-")
        container = pod["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"][
            "tolerations"
        ]
        assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": H100}
        claims = [v["persistentVolumeClaim"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
        assert claims == [{"claimName": "models", "readOnly": True}]

    service = get(kubectl, namespace, "service", "embed")
    assert service["spec"]["selector"] == {"tandem.dev/inferenceservice": "embed"}
    assert service["spec"]["ports"][0]["port"] == 80
    pdb = get(kubectl, namespace, "poddisruptionbudget", "embed")
    assert pdb["spec"]["maxUnavailable"] == 1
    for child in (service, pdb):
        assert child["metadata"]["ownerReferences"][0]["uid"] == owner_uid

    def ready_row() -> dict[str, str] | None:
        row = table_row(kubectl, namespace, "embed")
        return row if row["READY"] == "2/2" else None

    row = wait_for(ready_row, WAIT, "READY 2/2 in kubectl get")
    assert row["PHASE"] == "Ready"
    assert row["MODEL"] == "pvc://models/minilm-l6"
    # 2 replicas on nodes, each 1 H100 at $4.00 plus its CPU and memory requests (OpenCost's prices).
    replica = cost.pod_rate(cost.containers_of(replicas_of(kubectl, namespace, "embed")[0]), H100, PRICES)
    assert replica.gpus == 1
    assert row["COST/H"] == f"${2 * replica.usd_per_hour:,.2f}"
    reasons = {e["reason"] for e in events(kubectl, namespace, "embed")}
    assert {"Created", "Ready"} <= reasons


def test_unschedulable_replicas_leave_the_service_pending_with_the_reason(
    kubectl: Kubectl, namespace: str
) -> None:
    apply(
        kubectl,
        namespace,
        service_manifest("l4", resources={"gpu": 1}, gpuProduct="NVIDIA-L4"),  # no such nodes here
    )
    status = wait_for(
        lambda: (
            (s := status_of(kubectl, namespace, "tisvc", "l4")).get("phase") == "Pending"
            and {c["type"]: c for c in s.get("conditions", [])}.get("Ready", {}).get("reason")
            == "Unschedulable"
            and s
        ),
        WAIT,
        "Pending/Unschedulable",
    )
    ready = {c["type"]: c for c in status["conditions"]}["Ready"]
    assert "0/2 replicas scheduled" in ready["message"]


def test_suspend_scales_to_zero_and_resume_restores_the_count(kubectl: Kubectl, namespace: str) -> None:
    apply(kubectl, namespace, service_manifest("pause", replicas={"min": 1, "max": 4, "count": 3}))
    wait_phase(kubectl, namespace, "pause", "Ready")
    wait_for(lambda: len(replicas_of(kubectl, namespace, "pause")) == 3, WAIT, "3 replicas")

    patch_spec(kubectl, namespace, "tisvc", "pause", {"suspend": True})
    wait_phase(kubectl, namespace, "pause", "Suspended")
    wait_for(lambda: replicas_of(kubectl, namespace, "pause") == [], WAIT, "replicas gone while suspended")
    assert deployment(kubectl, namespace, "pause")["spec"]["replicas"] == 0
    assert get(kubectl, namespace, "service", "pause")  # everything else kept
    assert get(kubectl, namespace, "tisvc", "pause")["spec"]["replicas"]["count"] == 3
    # Replicas cost while they are on a node, terminating ones too; once they are gone, nothing.
    wait_for(
        lambda: status_of(kubectl, namespace, "tisvc", "pause")["cost"]["hourlyUSD"] == 0,
        WAIT,
        "no cost once the replicas are gone",
    )

    patch_spec(kubectl, namespace, "tisvc", "pause", {"suspend": False})
    wait_for(
        lambda: status_of(kubectl, namespace, "tisvc", "pause").get("replicasDisplay") == "3/3",
        WAIT,
        "3/3 after resume",
    )
    assert status_of(kubectl, namespace, "tisvc", "pause")["phase"] == "Ready"
    reasons = {e["reason"] for e in events(kubectl, namespace, "pause")}
    assert {"Suspended", "Ready"} <= reasons


def test_scale_subresource_drives_the_deployment(kubectl: Kubectl, namespace: str) -> None:
    apply(kubectl, namespace, service_manifest("hpa", autoscaling={"mode": "external"}))
    wait_phase(kubectl, namespace, "hpa", "Ready")
    kubectl.run("scale", "tisvc", "hpa", "-n", namespace, "--replicas=4")
    wait_for(lambda: deployment(kubectl, namespace, "hpa")["spec"]["replicas"] == 4, WAIT, "Deployment at 4")
    kubectl.run("scale", "tisvc", "hpa", "-n", namespace, "--replicas=9")  # clamped to max 4
    status = wait_for(
        lambda: (s := status_of(kubectl, namespace, "tisvc", "hpa")).get("replicasDisplay") == "4/4" and s,
        WAIT,
        "4/4",
    )
    assert deployment(kubectl, namespace, "hpa")["spec"]["replicas"] == 4
    assert "lastScaleTime" in status
    scaling = {c["type"]: c for c in status["conditions"]}["ScalingActive"]
    assert (scaling["status"], scaling["reason"]) == ("True", "External")


def _checkpoint(kubectl: Kubectl, namespace: str, job: str, step: int) -> None:
    """Record a checkpoint in the TrainingJob's status, as the operator does from the driver's report."""
    checkpoint = {
        "step": step,
        "uri": f"file:///checkpoints/{namespace}/{job}/step-{step:08d}",
        "time": "2026-11-26T04:00:00Z",
    }
    kubectl.run(
        "patch", "tj", job, "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"lastCheckpoint": checkpoint}}),
    )  # fmt: skip


def _model_condition(kubectl: Kubectl, namespace: str, name: str, reason: str) -> dict[str, Any] | None:
    status = status_of(kubectl, namespace, "tisvc", name)
    condition = {c["type"]: c for c in status.get("conditions", [])}.get("ModelResolved") or {}
    return status if condition.get("reason") == reason else None


def test_lineage_serves_the_jobs_checkpoint_and_rolls_forward(kubectl: Kubectl, namespace: str) -> None:
    install_example_volumes(kubectl, namespace, ("tandem-checkpoints",))
    apply(
        kubectl,
        namespace,
        service_manifest(
            "gpt", model={"trainingJobRef": {"name": "gpt"}}, runtime="causal-lm", replicas={"count": 1}
        ),
    )
    missing = wait_for(
        partial(_model_condition, kubectl, namespace, "gpt", "TrainingJobNotFound"), WAIT, "no such job"
    )
    assert missing["phase"] == "Pending"
    assert missing["modelDisplay"] == "gpt@?"

    job = {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "gpt"},
        "spec": {
            "trainer": {
                "builtin": {"size": "tiny", "dataset": {"uri": "file:///data/c.txt"}, "maxSteps": 500}
            },
            "workers": {"replicas": 1},
            "checkpoint": {"storage": {"pvc": "tandem-checkpoints"}, "everySteps": 100},
            "suspend": True,  # no training pods needed: the test writes checkpoints into the status
        },
    }
    apply(kubectl, namespace, job)
    wait_for(partial(_model_condition, kubectl, namespace, "gpt", "NoCheckpoint"), WAIT, "no checkpoint yet")
    assert "gpt-" not in " ".join(p["metadata"]["name"] for p in replicas_of(kubectl, namespace, "gpt"))

    _checkpoint(kubectl, namespace, "gpt", 100)
    wait_for(
        lambda: status_of(kubectl, namespace, "tisvc", "gpt").get("modelDisplay") == "gpt@100",
        WAIT,
        "serving step 100",
    )
    first = deployment(kubectl, namespace, "gpt")
    assert f"file:///checkpoints/{namespace}/gpt/step-00000100" in command_of(first)
    volumes = first["spec"]["template"]["spec"]["volumes"]
    claims = [v["persistentVolumeClaim"] for v in volumes if "persistentVolumeClaim" in v]
    assert claims == [{"claimName": "tandem-checkpoints", "readOnly": True}]
    assert status_of(kubectl, namespace, "tisvc", "gpt")["model"] == {
        "uri": f"file:///checkpoints/{namespace}/gpt/step-00000100",
        "trainingJob": "gpt",
        "checkpointStep": 100,
    }

    _checkpoint(kubectl, namespace, "gpt", 200)
    wait_for(
        lambda: status_of(kubectl, namespace, "tisvc", "gpt").get("modelDisplay") == "gpt@200",
        WAIT,
        "rolled forward to step 200",
    )
    assert f"file:///checkpoints/{namespace}/gpt/step-00000200" in command_of(
        deployment(kubectl, namespace, "gpt")
    )
    rollouts = [e for e in events(kubectl, namespace, "gpt") if e["reason"] == "RollingOut"]
    assert rollouts
    assert "step 200" in rollouts[0]["message"]
    assert "was step 100" in rollouts[0]["message"]
    assert table_row(kubectl, namespace, "gpt")["MODEL"] == "gpt@200"


def test_manual_rollout_reports_the_newer_checkpoint_and_keeps_serving(
    kubectl: Kubectl, namespace: str
) -> None:
    job = {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "run"},
        "spec": {
            "trainer": {"entrypoint": "pkg.train:main"},
            "checkpoint": {"storage": {"uri": "file:///shared/run"}},
            "suspend": True,
        },
    }
    apply(kubectl, namespace, job)
    apply(
        kubectl,
        namespace,
        service_manifest(
            "pinned",
            model={"trainingJobRef": {"name": "run"}},
            rollout={"onNewCheckpoint": "manual"},
            replicas={"count": 1},
        ),
    )
    _checkpoint(kubectl, namespace, "run", 100)
    wait_for(
        lambda: status_of(kubectl, namespace, "tisvc", "pinned").get("modelDisplay") == "run@100",
        WAIT,
        "step 100",
    )
    _checkpoint(kubectl, namespace, "run", 300)

    def newer_reported() -> dict[str, Any] | None:
        status = status_of(kubectl, namespace, "tisvc", "pinned")
        condition = {c["type"]: c for c in status.get("conditions", [])}.get("NewCheckpointAvailable") or {}
        return condition if condition.get("status") == "True" else None

    condition = wait_for(newer_reported, WAIT, "NewCheckpointAvailable")
    assert "step 300" in condition["message"]
    assert status_of(kubectl, namespace, "tisvc", "pinned")["modelDisplay"] == "run@100"
    assert "step-00000100" in " ".join(command_of(deployment(kubectl, namespace, "pinned")))


def test_delete_removes_every_child(kubectl: Kubectl, namespace: str) -> None:
    apply(kubectl, namespace, service_manifest("bye"))
    wait_phase(kubectl, namespace, "bye", "Ready")
    kubectl.run("delete", "tisvc", "bye", "-n", namespace, "--wait=false")

    def gone(kind: str) -> bool:
        try:
            get(kubectl, namespace, kind, "bye")
        except UserError as error:
            return "NotFound" in str(error)
        return False

    for kind in ("deployment", "service", "poddisruptionbudget"):
        wait_for(partial(gone, kind), WAIT, f"{kind} garbage-collected")
    wait_for(lambda: replicas_of(kubectl, namespace, "bye") == [], WAIT, "replica pods gone")


def test_a_service_deleted_while_the_operator_is_down_goes_with_its_children(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess, second_operator: Path
) -> None:
    """No finalizer on a service: deleting it never waits for the operator (a kopf timer or daemon
    would add one), and the finalizer an older operator left on a service is taken off."""
    first = start_operator(operator.kubeconfig, second_operator / "first.log")
    try:
        apply(kubectl, namespace, service_manifest("orphan"))
        wait_phase(kubectl, namespace, "orphan", "Ready")
        assert get(kubectl, namespace, "tisvc", "orphan")["metadata"].get("finalizers") is None
        old = '{"metadata":{"finalizers":["tandem.dev/finalizer"]}}'
        kubectl.run("patch", "tisvc", "orphan", "-n", namespace, "--type=merge", "-p", old)
        wait_for(
            lambda: get(kubectl, namespace, "tisvc", "orphan")["metadata"].get("finalizers") is None,
            WAIT,
            "the older operator's finalizer taken off",
        )
    finally:
        first.stop()
    kubectl.run("delete", "tisvc", "orphan", "-n", namespace, "--timeout=60s")  # returns once it is gone
    wait_for(lambda: replicas_of(kubectl, namespace, "orphan") == [], WAIT, "replica pods garbage-collected")
