"""Operator fixtures: CRDs installed from manifests/crds, and the real operator as a separate process
running under a ServiceAccount bound to exactly the chart's RBAC rules (never as cluster admin)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from operator_process import OperatorProcess, start_operator, wait_for

from tandem.devcluster.cluster import ClusterInfo
from tandem.devinstall import Kubectl, install_crds, operator_kubeconfig

#: What the API server says when RBAC denies a request (not e.g. a namespace being terminated).
FORBIDDEN = re.compile(r"forbidden: User \"", re.IGNORECASE)


@pytest.fixture(scope="session")
def kubectl(cluster: ClusterInfo) -> Kubectl:
    """The pinned kubectl, as the cluster admin."""
    return Kubectl(str(cluster.bin_dir / "kubectl"), cluster.kubeconfig)


GC_PROBE_NAMESPACE = "tandem-gc-probe"
GC_DISCOVERY_SECONDS = 90


def _wait_until_garbage_collector_knows_trainingjobs(kubectl: Kubectl) -> None:
    """The controller-manager's garbage collector finds new CRDs on a 30 s discovery resync; until
    then, children of a deleted TrainingJob linger. Delete an owner with one dependent and wait."""
    kubectl.run("create", "namespace", GC_PROBE_NAMESPACE)
    try:
        owner = {
            "apiVersion": "tandem.dev/v1alpha1",
            "kind": "TrainingJob",
            "metadata": {"name": "probe", "namespace": GC_PROBE_NAMESPACE},
            "spec": {"trainer": {"entrypoint": "probe:main"}, "suspend": True},
        }
        kubectl.apply([owner])
        uid = kubectl.run("get", "tj", "probe", "-n", GC_PROBE_NAMESPACE, "-o", "jsonpath={.metadata.uid}")
        ref = {"apiVersion": "tandem.dev/v1alpha1", "kind": "TrainingJob", "name": "probe", "uid": uid}
        dependent = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "dependent", "namespace": GC_PROBE_NAMESPACE, "ownerReferences": [ref]},
        }
        kubectl.apply([dependent])
        kubectl.run("delete", "tj", "probe", "-n", GC_PROBE_NAMESPACE)
        wait_for(
            lambda: (
                "dependent" not in kubectl.run("get", "configmaps", "-n", GC_PROBE_NAMESPACE, "-o", "name")
            ),
            GC_DISCOVERY_SECONDS,
            "the garbage collector to collect a TrainingJob's dependent",
        )
    finally:
        kubectl.run("delete", "namespace", GC_PROBE_NAMESPACE, "--wait=false")


@pytest.fixture(scope="session")
def crds(kubectl: Kubectl) -> None:
    install_crds(kubectl)
    _wait_until_garbage_collector_knows_trainingjobs(kubectl)


@pytest.fixture(scope="session")
def operator(
    kubectl: Kubectl, crds: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The operator for the whole session; its log must hold no RBAC "forbidden" error at the end."""
    workdir = tmp_path_factory.mktemp("operator")
    kubeconfig = operator_kubeconfig(kubectl, workdir / "operator.kubeconfig")
    process = start_operator(kubeconfig, workdir / "operator.log")
    try:
        yield process
    finally:
        process.stop()
        log = process.log_text()
        kept = Path(str(tmp_path_factory.getbasetemp())) / "operator.log"
        shutil.copyfile(process.log_path, kept)
        denied = [line for line in log.splitlines() if FORBIDDEN.search(line)]
        assert not denied, "operator hit RBAC denials (fix charts/tandem/files/clusterrole-rules.yaml):\n" + (
            "\n".join(denied[:10])
        )


@pytest.fixture
def second_operator(operator: OperatorProcess, tmp_path: Path) -> Iterator[Path]:
    """Stop the session operator for one test (the test runs its own), then start it again."""
    operator.stop()
    try:
        yield tmp_path
    finally:
        operator.restart()
