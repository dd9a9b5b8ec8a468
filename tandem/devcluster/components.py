"""Command lines and config files of the five components, as pure functions of the cluster state.

Everything listens on 127.0.0.1 only, except the API server of a cluster with a real node: it listens on
the node bridge's gateway address (`ClusterState.address`), which pods reach through the `kubernetes`
Service and which stays on this machine. The API server runs the production authn/authz shape
(client certificates, Node+RBAC, default admission plugins plus NodeRestriction, a service-account
issuer and signing key so TokenRequest works); the controller manager and scheduler use their own
identities. Leader election is off: one replica each, and it saves the lease wait on startup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tandem.devcluster import nodes
from tandem.devcluster.pki import FRONT_PROXY_CLIENT
from tandem.devcluster.state import LOOPBACK, ClusterState

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
KWOK_STAGE_FILES = ("node-stages.yaml", "pod-stages.yaml", "pod-crash.yaml", "pod-complete.yaml")


def etcd(bin_dir: Path, s: ClusterState) -> list[str]:
    client = f"http://127.0.0.1:{s.ports['etcd']}"
    peer = f"http://127.0.0.1:{s.ports['etcd-peer']}"
    return [
        str(bin_dir / "etcd"),
        "--name=devcluster",
        f"--data-dir={s.etcd_dir}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=devcluster={peer}",
        "--initial-cluster-state=new",
        # A throwaway dev store: skipping fsync makes writes (and so every API call) much faster.
        "--unsafe-no-fsync",
        "--auto-compaction-retention=1",
        "--quota-backend-bytes=4294967296",
        "--log-level=warn",
    ]


def _endpoint_reconciler(s: ClusterState) -> str:
    # The `kubernetes` Service cannot have a loopback endpoint (validation forbids it), and without a
    # real node nothing runs in a pod that could use it: no reconciler, instead of one that fails every
    # few seconds. With a real node the address is the bridge gateway: the default (lease) reconciler
    # keeps the Service's endpoint on it, so pods reach the API server at 10.96.0.1:443.
    return "none" if s.address == LOOPBACK else "lease"


def kube_apiserver(bin_dir: Path, s: ClusterState) -> list[str]:
    pki = s.pki
    return [
        str(bin_dir / "kube-apiserver"),
        f"--etcd-servers=http://127.0.0.1:{s.ports['etcd']}",
        f"--bind-address={s.address}",
        f"--secure-port={s.ports['apiserver']}",
        f"--advertise-address={s.address}",
        f"--endpoint-reconciler-type={_endpoint_reconciler(s)}",
        f"--tls-cert-file={pki.cert('apiserver')}",
        f"--tls-private-key-file={pki.key('apiserver')}",
        f"--client-ca-file={pki.ca_cert}",
        "--authorization-mode=Node,RBAC",
        "--enable-admission-plugins=NodeRestriction",
        "--allow-privileged=true",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
        f"--service-account-key-file={pki.service_account_public_key}",
        f"--service-account-signing-key-file={pki.service_account_key}",
        f"--kubelet-client-certificate={pki.cert('apiserver-kubelet-client')}",
        f"--kubelet-client-key={pki.key('apiserver-kubelet-client')}",
        "--kubelet-preferred-address-types=InternalIP,Hostname",
        # Aggregation layer (metrics APIs and the like): front-proxy CA and client, as kubeadm sets them.
        f"--requestheader-client-ca-file={pki.cert('front-proxy-ca')}",
        f"--requestheader-allowed-names={FRONT_PROXY_CLIENT}",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki.cert('front-proxy-client')}",
        f"--proxy-client-key-file={pki.key('front-proxy-client')}",
        "--enable-aggregator-routing=true",
        "--profiling=false",
        "--v=1",
    ]


def kube_controller_manager(bin_dir: Path, s: ClusterState) -> list[str]:
    pki = s.pki
    kubeconfig = s.component_kubeconfig("kube-controller-manager")
    return [
        str(bin_dir / "kube-controller-manager"),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={s.ports['controller-manager']}",
        f"--cert-dir={s.directory / 'controller-manager-certs'}",
        "--leader-elect=false",
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={pki.service_account_key}",
        f"--root-ca-file={pki.ca_cert}",
        f"--cluster-signing-cert-file={pki.ca_cert}",
        f"--cluster-signing-key-file={pki.ca_key}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        # Untaint new simulated nodes promptly once kwok reports them Ready.
        "--node-monitor-period=2s",
        "--kube-api-qps=200",
        "--kube-api-burst=400",
        "--profiling=false",
        "--v=1",
    ]


def scheduler_config(s: ClusterState) -> dict[str, Any]:
    """KubeSchedulerConfiguration: our kubeconfig, no leader election, faster API client."""
    return {
        "apiVersion": "kubescheduler.config.k8s.io/v1",
        "kind": "KubeSchedulerConfiguration",
        "clientConnection": {
            "kubeconfig": str(s.component_kubeconfig("kube-scheduler")),
            "qps": 200,
            "burst": 400,
        },
        "leaderElection": {"leaderElect": False},
    }


def kube_scheduler(bin_dir: Path, s: ClusterState) -> list[str]:
    kubeconfig = s.component_kubeconfig("kube-scheduler")
    return [
        str(bin_dir / "kube-scheduler"),
        f"--config={s.config_dir / 'scheduler.yaml'}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={s.ports['scheduler']}",
        f"--cert-dir={s.directory / 'scheduler-certs'}",
        "--profiling=false",
        "--v=1",
    ]


def kwok(bin_dir: Path, s: ClusterState) -> list[str]:
    pki = s.pki
    argv = [
        str(bin_dir / "kwok"),
        f"--kubeconfig={s.component_kubeconfig('kwok')}",
        "--manage-all-nodes=false",
        f"--manage-nodes-with-annotation-selector={nodes.KWOK_NODE_ANNOTATION}={nodes.KWOK_NODE_ANNOTATION_VALUE}",
        # Simulated nodes report this address; the API server reaches kwok's kubelet endpoint there.
        "--node-ip=127.0.0.1",
        f"--node-port={s.ports['kwok']}",
        f"--server-address=127.0.0.1:{s.ports['kwok']}",
        f"--tls-cert-file={pki.cert('kwok-serving')}",
        f"--tls-private-key-file={pki.key('kwok-serving')}",
        "--node-lease-duration-seconds=40",
    ]
    return argv + [f"--config={s.config_dir / name}" for name in KWOK_STAGE_FILES]


COMMANDS = {
    "etcd": etcd,
    "kube-apiserver": kube_apiserver,
    "kube-controller-manager": kube_controller_manager,
    "kube-scheduler": kube_scheduler,
    "kwok": kwok,
}


def command(component: str, bin_dir: Path, s: ClusterState) -> list[str]:
    """The argv that starts `component` of cluster `s` from the binaries in `bin_dir`."""
    return COMMANDS[component](bin_dir, s)
