"""Install Tandem into a cluster the way the Helm chart does, without Helm.

Used by `make demo` and by the end-to-end tests: apply the generated CRDs, bind the chart's exact
RBAC rules to an operator ServiceAccount, and mint a kubeconfig for that identity. The tests then run
the operator under it, so a permission missing from the chart fails the tests.
"""

from __future__ import annotations

import base64
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tandem.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
CRD_DIR = REPO_ROOT / "manifests" / "crds"
RBAC_RULES_FILE = REPO_ROOT / "charts" / "tandem" / "files" / "clusterrole-rules.yaml"
CHART_VALUES_FILE = REPO_ROOT / "charts" / "tandem" / "values.yaml"
OPERATOR_NAMESPACE = "tandem-system"
OPERATOR_NAME = "tandem-operator"


@dataclass(frozen=True)
class Kubectl:
    """A kubectl binary bound to one kubeconfig."""

    binary: str
    kubeconfig: Path

    def run(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        command = [self.binary, f"--kubeconfig={self.kubeconfig}", *args]
        done = subprocess.run(command, input=stdin, capture_output=True, text=True, check=False, timeout=120)
        if check and done.returncode != 0:
            raise UserError(
                f"`kubectl {' '.join(args)}` failed: {done.stderr.strip() or done.stdout.strip()}"
            )
        return done.stdout

    def apply(self, documents: list[dict[str, Any]], server_side: bool = True) -> None:
        stream = yaml.safe_dump_all(documents, sort_keys=False)
        flags = (
            ["--server-side", "--force-conflicts", "--field-manager=tandem-install"] if server_side else []
        )
        self.run("apply", *flags, "-f", "-", stdin=stream)


def rbac_documents(namespace: str = OPERATOR_NAMESPACE, name: str = OPERATOR_NAME) -> list[dict[str, Any]]:
    """ServiceAccount, ClusterRole (the chart's rules file, verbatim) and ClusterRoleBinding."""
    rules = yaml.safe_load(RBAC_RULES_FILE.read_text())
    labels = {"app.kubernetes.io/name": "tandem-operator"}
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name, "labels": labels},
            "rules": rules,
        },
        flow_schema(namespace, name),
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
        },
    ]


#: The claims manifests/examples/ mount: data sets, checkpoints, served models.
EXAMPLE_CLAIMS = ("datasets", "tandem-checkpoints", "gpt-124m-checkpoints", "models")


def volume_documents(namespace: str, claim: str, root: Path) -> list[dict[str, Any]]:
    """A ReadWriteMany claim and a hostPath volume pre-bound to it.

    The dev cluster has no storage provisioner; a statically bound volume lets the real PV controller
    bind the claim, so the scheduler places pods that mount it, as on a cluster with shared storage.
    """
    volume = f"{claim}-{namespace}"[:253]
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": volume, "labels": {"tandem.dev/dev-volume": "true"}},
            "spec": {
                "capacity": {"storage": "100Gi"},
                "accessModes": ["ReadWriteMany"],
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": "",
                "hostPath": {"path": str(root / namespace / claim), "type": "DirectoryOrCreate"},
                "claimRef": {"namespace": namespace, "name": claim},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "volumeName": volume,
                "resources": {"requests": {"storage": "100Gi"}},
            },
        },
    ]


def install_example_volumes(
    kubectl: Kubectl, namespace: str, claims: tuple[str, ...] = EXAMPLE_CLAIMS
) -> None:
    """Create the claims the examples use in `namespace` and wait until they are Bound.

    The hostPath folders live in the cluster's state folder (where its kubeconfig is), so `tandem cluster
    down` removes them with it and a new cluster never finds an old run's checkpoints. They are made here,
    writable by everyone with the sticky bit (as /tmp): Tandem's images run as uid 65532, and a folder
    the kubelet creates for a hostPath volume belongs to root. The dev cluster's nodes are this machine,
    so the folders are local."""
    root = kubectl.kubeconfig.resolve().parent / "volumes"
    documents = [doc for claim in claims for doc in volume_documents(namespace, claim, root)]
    for doc in documents:
        if doc["kind"] == "PersistentVolume":
            folder = Path(doc["spec"]["hostPath"]["path"])
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o1777)
    kubectl.apply(documents)
    for claim in claims:
        kubectl.run(
            "wait", "-n", namespace, "--for=jsonpath={.status.phase}=Bound", "--timeout=60s", f"pvc/{claim}"
        )


def flow_schema(namespace: str = OPERATOR_NAMESPACE, name: str = OPERATOR_NAME) -> dict[str, Any]:
    """API Priority and Fairness: the operator's requests share the `workload-high` level with the
    built-in controllers, instead of the `workload-low` level every other ServiceAccount falls into,
    where a burst of gangs is answered with 429s (the chart ships the same object)."""
    return {
        "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
        "kind": "FlowSchema",
        "metadata": {"name": name},
        "spec": {
            "priorityLevelConfiguration": {"name": "workload-high"},
            "matchingPrecedence": 1000,
            "distinguisherMethod": {"type": "ByUser"},
            "rules": [
                {
                    "subjects": [
                        {"kind": "ServiceAccount", "serviceAccount": {"name": name, "namespace": namespace}}
                    ],
                    "resourceRules": [
                        {
                            "verbs": ["*"],
                            "apiGroups": ["*"],
                            "resources": ["*"],
                            "namespaces": ["*"],
                            "clusterScope": True,
                        }
                    ],
                }
            ],
        },
    }


def install_crds(kubectl: Kubectl) -> None:
    """Apply manifests/crds and wait until the API server serves them."""
    kubectl.run("apply", "--server-side", "--force-conflicts", "-f", str(CRD_DIR))
    kubectl.run("wait", "--for=condition=Established", "--timeout=60s", "-f", str(CRD_DIR))


def operator_kubeconfig(
    kubectl: Kubectl,
    output: Path,
    namespace: str = OPERATOR_NAMESPACE,
    name: str = OPERATOR_NAME,
    duration: str = "24h",
) -> Path:
    """Apply the RBAC objects and write a kubeconfig that authenticates as the operator's ServiceAccount."""
    kubectl.apply(rbac_documents(namespace, name))
    token = kubectl.run("create", "token", name, "-n", namespace, f"--duration={duration}").strip()
    admin = json.loads(kubectl.run("config", "view", "--raw", "--minify", "-o", "json"))
    cluster = admin["clusters"][0]["cluster"]
    ca_data = cluster.get("certificate-authority-data")
    if ca_data is None and "certificate-authority" in cluster:
        ca_data = base64.b64encode(Path(cluster["certificate-authority"]).read_bytes()).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "tandem",
                "cluster": {"server": cluster["server"], "certificate-authority-data": ca_data},
            }
        ],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": "tandem", "user": name}}],
        "current-context": name,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(yaml.safe_dump(config, sort_keys=False))
    output.chmod(0o600)
    return output


def operator_documents(
    image: str, config: dict[str, Any], namespace: str = OPERATOR_NAMESPACE, name: str = OPERATOR_NAME
) -> list[dict[str, Any]]:
    """The operator as the chart runs it: its settings ConfigMap (the chart's `config:` values with
    `config` over them) and a one-replica Deployment under the operator's ServiceAccount, with the
    chart's security contexts and resources (values.yaml, read as it is)."""
    values = yaml.safe_load(CHART_VALUES_FILE.read_text())
    settings = {**values["config"], **config}
    labels = {"app.kubernetes.io/name": "tandem-operator"}
    container = {
        "name": "operator",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["tandem", "operator", "run"],
        "env": [{"name": "TANDEM_CONFIG_FILE", "value": "/etc/tandem/config.yaml"}],
        "ports": [
            {"name": "metrics", "containerPort": settings["metricsPort"]},
            {"name": "health", "containerPort": settings["healthPort"]},
        ],
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "health"}, "periodSeconds": 20},
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "health"}, "periodSeconds": 2},
        "resources": values["resources"],
        "securityContext": values["securityContext"],
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/tandem", "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{name}-config", "namespace": namespace, "labels": labels},
            "data": {"config.yaml": yaml.safe_dump(settings, sort_keys=False)},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {
                "replicas": 1,
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {
                        "labels": labels,
                        "annotations": {
                            "prometheus.io/scrape": "true",
                            "prometheus.io/port": str(settings["metricsPort"]),
                        },
                    },
                    "spec": {
                        "serviceAccountName": name,
                        "securityContext": values["podSecurityContext"],
                        "containers": [container],
                        "volumes": [
                            {"name": "config", "configMap": {"name": f"{name}-config"}},
                            {"name": "tmp", "emptyDir": {}},
                        ],
                    },
                },
            },
        },
    ]


def install_operator_pod(kubectl: Kubectl, image: str, config: dict[str, Any], timeout: str = "180s") -> None:
    """Apply the operator's RBAC, settings and Deployment, and wait until its pod is ready."""
    kubectl.apply(rbac_documents())
    kubectl.apply(operator_documents(image, config))
    kubectl.run(
        "rollout", "status", "-n", OPERATOR_NAMESPACE, f"deployment/{OPERATOR_NAME}", f"--timeout={timeout}"
    )
