"""`helm install` of charts/tandem into the local cluster, then upgrade and uninstall, with the pinned helm.

What an operator of a real cluster relies on: the install creates the CRDs (from the chart's crds/),
the operator Deployment with two replicas whose pods Pod Security `restricted` admits, and RBAC that
grants the operator's ServiceAccount what it needs and nothing cluster-wide it does not; an upgrade
that changes a setting rewrites the settings ConfigMap and rolls the pods; an uninstall removes all of
it except the CRDs (Helm never deletes CRDs, so custom resources survive an uninstall).

The operator image cannot run here: the dev cluster's nodes are kwok's simulated nodes, where a
pod's containers never start (kwok only reports them Running). So this test checks what the API
server made of the release, not a running operator; the rest of the e2e suite runs the same operator
code as a local process under exactly the chart's RBAC rules (tandem.devinstall).
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from operator_process import wait_for

from tandem.devcluster import helm as devhelm
from tandem.devcluster.cluster import ClusterInfo
from tandem.devinstall import Kubectl

RULES_FILE = devhelm.CHART_DIR / "files" / "clusterrole-rules.yaml"
CRDS = ("trainingjobs.tandem.dev", "inferenceservices.tandem.dev")
WAIT_SECONDS = 120.0


def _progress(message: str) -> None:
    print(f"[helm] {message}", file=sys.__stderr__, flush=True)


@pytest.fixture(scope="module")
def helm() -> Path:
    return devhelm.ensure_helm(_progress)


@pytest.fixture
def kubectl(cluster: ClusterInfo) -> Kubectl:
    return Kubectl(str(cluster.bin_dir / "kubectl"), cluster.kubeconfig)


@pytest.fixture
def release(kubectl: Kubectl, helm: Path, cluster: ClusterInfo) -> Iterator[tuple[str, str]]:
    """A release name and its namespace, which enforces Pod Security `restricted`; both removed after."""
    suffix = uuid.uuid4().hex[:6]
    name, namespace = f"tandem-e2e-{suffix}", f"t-helm-{suffix}"
    kubectl.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": namespace,
                    "labels": {
                        "tandem.dev/e2e": "true",
                        "pod-security.kubernetes.io/enforce": "restricted",
                        "pod-security.kubernetes.io/enforce-version": "latest",
                    },
                },
            }
        ]
    )
    try:
        yield name, namespace
    finally:
        devhelm.run_helm(
            helm, "uninstall", name, "--namespace", namespace, "--ignore-not-found", *_kube(cluster)
        )
        kubectl.run("delete", "namespace", namespace, "--wait=false")


def _kube(cluster: ClusterInfo) -> list[str]:
    return ["--kubeconfig", str(cluster.kubeconfig)]


def _get(kubectl: Kubectl, *args: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(kubectl.run("get", *args, "-o", "json"))
    return result


def _can(kubectl: Kubectl, account: str, verb: str, resource: str, namespace: str = "default") -> bool:
    out = kubectl.run("auth", "can-i", verb, resource, "--as", account, "-n", namespace, check=False)
    return out.strip() == "yes"


def test_helm_install_upgrade_uninstall(
    helm: Path, kubectl: Kubectl, cluster: ClusterInfo, release: tuple[str, str]
) -> None:
    name, namespace = release
    fullname = f"{name}-operator"
    # --take-ownership: other tests of the session apply the chart's ValidatingAdmissionPolicy (a
    # cluster-wide object with a fixed name) straight from files/, as a kubectl install would.
    devhelm.run_helm(
        helm, "install", name, str(devhelm.CHART_DIR), "--namespace", namespace, "--take-ownership",
        *_kube(cluster),
    )  # fmt: skip

    # CRDs from crds/, served.
    for crd in CRDS:
        kubectl.run("wait", "--for=condition=Established", "--timeout=60s", f"crd/{crd}")

    # The Deployment's two replicas are created and admitted under `restricted`.
    deployment = _get(kubectl, "deployment", fullname, "-n", namespace)
    assert deployment["spec"]["replicas"] == 2
    wait_for(
        lambda: _get(kubectl, "deployment", fullname, "-n", namespace).get("status", {}).get("replicas") == 2,
        WAIT_SECONDS,
        "both operator pods to be created (Pod Security `restricted` admitting them)",
    )
    pods = _get(kubectl, "pods", "-n", namespace, "-l", "app.kubernetes.io/name=tandem-operator")["items"]
    assert len(pods) == 2
    for pod in pods:
        assert pod["spec"]["serviceAccountName"] == fullname
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

    # RBAC: the ClusterRole holds the chart's rules file, bound to the release's ServiceAccount.
    role = _get(kubectl, "clusterrole", fullname)
    assert role["rules"] == yaml.safe_load(RULES_FILE.read_text())
    account = f"system:serviceaccount:{namespace}:{fullname}"
    assert _can(kubectl, account, "create", "pods")
    assert _can(kubectl, account, "patch", "trainingjobs.tandem.dev/status")
    assert _can(kubectl, account, "create", "leases.coordination.k8s.io", namespace)
    assert not _can(kubectl, account, "get", "secrets")
    assert not _can(kubectl, account, "delete", "nodes")
    assert not _can(kubectl, account, "create", "clusterrolebindings")

    # Upgrade: a changed setting reaches the ConfigMap and rolls the pods (the checksum annotation).
    before = deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    devhelm.run_helm(
        helm, "upgrade", name, str(devhelm.CHART_DIR), "--namespace", namespace,
        "--set", "config.prometheusUrl=http://prometheus.monitoring:9090", *_kube(cluster),
    )  # fmt: skip
    config = _get(kubectl, "configmap", f"{fullname}-config", "-n", namespace)
    assert (
        yaml.safe_load(config["data"]["config.yaml"])["prometheusUrl"] == "http://prometheus.monitoring:9090"
    )
    after = _get(kubectl, "deployment", fullname, "-n", namespace)
    assert after["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != before

    # Uninstall: everything the release made goes, the CRDs stay (custom resources survive).
    devhelm.run_helm(helm, "uninstall", name, "--namespace", namespace, "--wait", *_kube(cluster))
    assert kubectl.run("get", "deployment", fullname, "-n", namespace, "--ignore-not-found").strip() == ""
    assert kubectl.run("get", "clusterrole", fullname, "--ignore-not-found").strip() == ""
    assert kubectl.run("get", "clusterrolebinding", fullname, "--ignore-not-found").strip() == ""
    for crd in CRDS:
        assert (
            kubectl.run("get", "crd", crd, "-o", "name").strip()
            == f"customresourcedefinition.apiextensions.k8s.io/{crd}"
        )
