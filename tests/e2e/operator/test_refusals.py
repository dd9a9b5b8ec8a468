"""Errors that never loop, on a real control plane: a TrainingJob whose worker pods the API server
refuses (422: a toleration key that is not a valid label name, which the CRD admits) fails with one
condition naming the field, one event, its half-made gang deleted, and no further create attempts;
a fixed spec (a new generation) runs. An InferenceService whose Deployment is refused the same way
fails once and is not tried again until its spec changes.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
import yaml
from kubeobjects import events, items, status_of
from operator_process import OperatorProcess, wait_for

from tandem.devinstall import Kubectl

pytestmark = pytest.mark.usefixtures("operator")
#: The old operator retried a refused gang every 2 s: watching this long after a nudge shows a loop.
QUIET_SECONDS = 10.0
BAD_TOLERATION = {"key": "not a label name!", "operator": "Exists"}
WAIT = 60
REFUSED_PODS = re.compile(
    r'^apiserver_request_total\{(?=[^}]*code="422")(?=[^}]*resource="pods")(?=[^}]*verb="POST")'
    r"[^}]*\} (\S+)$",
    re.MULTILINE,
)


def job_manifest(name: str, workers: dict[str, Any]) -> dict[str, Any]:
    spec = {
        "trainer": {"builtin": {"size": "tiny", "dataset": {"uri": "file:///data/corpus.txt"}}},
        "workers": workers,
        "failurePolicy": {"maxRestarts": 3, "backoffSeconds": 0},
    }
    return {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def apply(kubectl: Kubectl, namespace: str, manifest: dict[str, Any]) -> None:
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(manifest))


def wait_phase(kubectl: Kubectl, namespace: str, name: str, phase: str) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        status = status_of(kubectl, namespace, "tj", name)
        return status if status.get("phase") == phase else None

    return wait_for(reached, WAIT, f"{name} {phase}")


def pods(kubectl: Kubectl, namespace: str, job: str) -> list[dict[str, Any]]:
    found = items(kubectl, namespace, "pods", f"-l=tandem.dev/trainingjob={job}")
    return [pod for pod in found if not pod["metadata"].get("deletionTimestamp")]


def refused_pod_creates(kubectl: Kubectl) -> int:
    """Pod creations the API server answered 422, cluster-wide (its own request counter)."""
    metrics = kubectl.run("get", "--raw", "/metrics")
    return int(sum(float(value) for value in REFUSED_PODS.findall(metrics)))


def stays(check: Any, seconds: float, what: str) -> None:
    """Fail as soon as `check()` is false within `seconds` (an absence can only be watched for a while)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert check(), what
        time.sleep(0.5)


def test_a_refused_gang_fails_once_with_the_field_and_is_never_retried_until_the_spec_changes(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    workers = {"replicas": 2, "tolerations": [BAD_TOLERATION]}
    apply(kubectl, namespace, job_manifest("refused", workers=workers))
    status = wait_phase(kubectl, namespace, "refused", "Failed")
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True"
    assert failed["reason"] == "CreateRefused"
    assert re.search(
        r"refused Pod refused-1-worker-\d \(Invalid, field spec.tolerations\[0\].key\)", failed["message"]
    )
    assert len(failed["message"]) <= 1024
    assert status["lastFailure"]["reason"] == "CreateRefused"
    # The head was made before its workers were refused: it is deleted, not left running alone.
    wait_for(lambda: pods(kubectl, namespace, "refused") == [], WAIT, "the half-made gang to be deleted")

    refusals = refused_pod_creates(kubectl)
    # A nudge that is not a spec change (no new generation) makes the operator look at the job again.
    kubectl.run("annotate", "tj", "refused", "-n", namespace, "nudged=yes")
    stays(
        lambda: refused_pod_creates(kubectl) == refusals and pods(kubectl, namespace, "refused") == [],
        QUIET_SECONDS,
        "the operator tried to create the refused gang again",
    )
    warnings = [e for e in events(kubectl, namespace, "refused") if e["reason"] == "CreateRefused"]
    assert len(warnings) == 1, warnings
    assert warnings[0].get("count", 1) == 1
    assert not any("pods created together" in e["message"] for e in events(kubectl, namespace, "refused"))
    assert len(re.findall(rf"{namespace}/refused failed: ", operator.log_text())) == 1

    # The fix is a new generation of the spec: a new gang, which runs.
    apply(kubectl, namespace, job_manifest("refused", workers={"replicas": 2}))
    wait_phase(kubectl, namespace, "refused", "Running")
    names = sorted(p["metadata"]["name"] for p in pods(kubectl, namespace, "refused"))
    assert names == ["refused-2-head", "refused-2-worker-0", "refused-2-worker-1"]
    conditions = {c["type"]: c for c in status_of(kubectl, namespace, "tj", "refused")["conditions"]}
    assert conditions["Failed"]["status"] == "False"
    assert operator.healthy()


REFUSED_DEPLOYMENTS = re.compile(
    r'^apiserver_request_total\{(?=[^}]*code="422")(?=[^}]*resource="deployments")[^}]*\} (\S+)$',
    re.MULTILINE,
)


def refused_deployment_writes(kubectl: Kubectl) -> int:
    metrics = kubectl.run("get", "--raw", "/metrics")
    return int(sum(float(value) for value in REFUSED_DEPLOYMENTS.findall(metrics)))


def test_a_refused_deployment_fails_the_service_once_until_its_spec_changes(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    service: dict[str, Any] = {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "refused"},
        "spec": {
            "model": {"uri": "file:///models/minilm"},
            "runtime": "embeddings",
            "replicas": {"min": 1, "max": 2, "count": 1},
            "tolerations": [BAD_TOLERATION],
        },
    }
    apply(kubectl, namespace, service)

    def failed() -> dict[str, Any] | None:
        status = status_of(kubectl, namespace, "tisvc", "refused")
        return status if status.get("phase") == "Failed" else None

    status = wait_for(failed, WAIT, "the service Failed")
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Failed"]["reason"] == "CreateRefused"
    assert conditions["Ready"]["status"] == "False"
    assert (
        "refused Deployment refused (Invalid, field spec.template.spec.tolerations[0].key)"
        in (conditions["Failed"]["message"])
    )
    refusals = refused_deployment_writes(kubectl)
    kubectl.run("annotate", "tisvc", "refused", "-n", namespace, "nudged=yes")
    # It used to be reconciled every 2 s, each time trying the Deployment again.
    stays(
        lambda: refused_deployment_writes(kubectl) == refusals,
        QUIET_SECONDS,
        "the Deployment was tried again",
    )
    warnings = [e for e in events(kubectl, namespace, "refused") if e["reason"] == "CreateRefused"]
    assert len(warnings) == 1, warnings

    del service["spec"]["tolerations"]  # the fix: a new generation
    kubectl.run("replace", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(service))
    wait_for(
        lambda: status_of(kubectl, namespace, "tisvc", "refused").get("phase") not in (None, "Failed"),
        WAIT,
        "the service to leave Failed",
    )
    wait_for(lambda: items(kubectl, namespace, "deployments") != [], WAIT, "its Deployment")
    conditions = {c["type"]: c for c in status_of(kubectl, namespace, "tisvc", "refused")["conditions"]}
    assert conditions["Failed"]["status"] == "False"
    assert operator.healthy()
