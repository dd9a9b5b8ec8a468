"""Least privilege for training pods: admitted under Pod Security "restricted", and, with real requests
under a job's own token, the head may patch its own pod (its progress annotation) and nothing else;
workers mount no token at all. Serving replicas are admitted under "restricted" too, with a read-only
root file system.

Before, every job of a namespace shared one account allowed to get and patch every pod there: any
training container could relabel another workload's pods or forge another job's progress.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubeobjects import get, items, status_of
from operator_process import wait_for

from tandem.devinstall import Kubectl

pytestmark = pytest.mark.usefixtures("operator")
WAIT = 60
POLICY = Path(__file__).resolve().parents[3] / "charts/tandem/files/trainer-admission-policy.yaml"


def job(name: str) -> dict[str, Any]:
    spec = {
        "trainer": {"builtin": {"size": "tiny", "dataset": {"uri": "file:///data/corpus.txt"}}},
        "workers": {"replicas": 1},
    }
    return {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def api_as(kubectl: Kubectl, namespace: str, account: str, workdir: Path) -> Any:
    """A CoreV1Api that authenticates with `account`'s token only (what a pod mounts)."""
    from kubernetes import client

    token = kubectl.run("create", "token", account, "-n", namespace, "--duration=10m").strip()
    admin = json.loads(kubectl.run("config", "view", "--raw", "--minify", "-o", "json"))
    cluster = admin["clusters"][0]["cluster"]
    ca = workdir / "ca.crt"
    if "certificate-authority-data" in cluster:
        ca.write_bytes(base64.b64decode(cluster["certificate-authority-data"]))
    else:
        ca.write_bytes(Path(cluster["certificate-authority"]).read_bytes())
    config = client.Configuration()
    config.host = cluster["server"]
    config.ssl_ca_cert = str(ca)
    config.api_key = {"authorization": f"Bearer {token}"}
    return client.CoreV1Api(client.ApiClient(config))


def status_code(call: Any) -> int:
    from kubernetes.client.exceptions import ApiException

    try:
        call()
    except ApiException as error:
        return int(error.status)
    return 200


def test_pods_pass_pod_security_restricted_and_a_heads_token_patches_its_own_pod_only(
    kubectl: Kubectl, namespace: str, tmp_path: Path
) -> None:
    # Pod Security "restricted" is enforced: every pod the operator makes must be admitted.
    kubectl.run("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump_all([job("a"), job("b")]))

    def running() -> bool:
        return all(status_of(kubectl, namespace, "tj", n).get("phase") == "Running" for n in ("a", "b"))

    wait_for(running, WAIT, "both jobs Running")
    api = api_as(kubectl, namespace, "a-trainer", tmp_path)
    progress = {"metadata": {"annotations": {"tandem.dev/progress": json.dumps({"step": 7})}}}

    # The chart's admission policy: the head may change only its progress annotation on its own pod.
    kubectl.run("apply", "-f", str(POLICY))
    attempt = iter(range(10_000))

    def probe_denied() -> bool:  # the API server loads a new policy within seconds; until then this passes
        probe = {"metadata": {"annotations": {"tandem.dev/probe": str(next(attempt))}}}
        return status_code(lambda: api.patch_namespaced_pod("a-1-head", namespace, probe)) == 403

    wait_for(probe_denied, WAIT, "the admission policy to be in force")
    relabel = {"metadata": {"labels": {"app.kubernetes.io/name": "someone-elses-service"}}}
    assert status_code(lambda: api.patch_namespaced_pod("a-1-head", namespace, relabel)) == 403
    assert get(kubectl, namespace, "pod", "a-1-head")["metadata"]["labels"]["app.kubernetes.io/name"] == (
        "tandem-training"
    )

    # What the training driver does, exactly: patch its own pod's annotation.
    assert status_code(lambda: api.patch_namespaced_pod("a-1-head", namespace, progress)) == 200
    wait_for(
        lambda: status_of(kubectl, namespace, "tj", "a").get("progress", {}).get("step") == 7,
        WAIT,
        "a's progress",
    )
    # Nothing else: not another job's head (forged progress), not its own workers, no reads at all.
    assert status_code(lambda: api.patch_namespaced_pod("b-1-head", namespace, progress)) == 403
    assert status_code(lambda: api.patch_namespaced_pod("a-1-worker-0", namespace, progress)) == 403
    assert status_code(lambda: api.read_namespaced_pod("a-1-head", namespace)) == 403
    assert status_code(lambda: api.list_namespaced_pod(namespace)) == 403
    assert status_of(kubectl, namespace, "tj", "b").get("progress", {}).get("step", 0) == 0

    # Workers mount no token; the head mounts its job's.
    pods = {p["metadata"]["name"]: p for p in items(kubectl, namespace, "pods")}

    def mounts_token(pod: dict[str, Any]) -> bool:
        return any(v["name"].startswith("kube-api-access") for v in pod["spec"].get("volumes") or ())

    assert mounts_token(pods["a-1-head"])
    assert pods["a-1-head"]["spec"]["serviceAccountName"] == "a-trainer"
    assert not mounts_token(pods["a-1-worker-0"])
    # The identity is the job's: deleting the job takes it away.
    role = get(kubectl, namespace, "role", "a-trainer")
    assert role["rules"][0]["resourceNames"] == ["a-1-head"]
    kubectl.run("delete", "tj", "a", "-n", namespace)

    def identity_of_a() -> list[str]:
        found = kubectl.run("get", "serviceaccounts,roles,rolebindings", "-n", namespace, "-o", "name")
        return [line for line in found.split() if line.endswith("/a-trainer")]

    wait_for(lambda: identity_of_a() == [], WAIT, "a's identity garbage-collected")


def test_serving_replicas_pass_pod_security_restricted_with_a_read_only_root(
    kubectl: Kubectl, namespace: str
) -> None:
    """A refused replica would leave the Deployment's ReplicaSet with FailedCreate and no pod."""
    kubectl.run("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    service = {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "embed"},
        "spec": {
            "model": {"uri": "file:///models/minilm"},
            "runtime": "embeddings",
            "replicas": {"min": 1, "max": 2, "count": 2},
        },
    }
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(service))

    def replicas() -> list[dict[str, Any]] | None:
        found = items(kubectl, namespace, "pods", "-l=tandem.dev/inferenceservice=embed")
        return found if len(found) == 2 else None

    for pod in wait_for(replicas, WAIT, "both serving replicas admitted"):
        (container,) = pod["spec"]["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        writable = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        assert "emptyDir" in writable["/tmp"]
        assert "emptyDir" in writable["/home/tandem"]
