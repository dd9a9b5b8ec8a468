"""The per-cluster state folder: its layout and the ports chosen at the first `up`.

Layout of `<cache>/tandem/clusters/<name>/`:
  state.json        ports and the API server's address (fixed at the first `up`, reused by later ones)
  kubeconfig        the admin kubeconfig users point KUBECONFIG at
  pki/              CA, serving and client certificates, service-account key
  kubeconfigs/      one kubeconfig per component identity
  config/           scheduler configuration, kwok stages
  etcd/             etcd data
  logs/<component>.log, run/<component>.json (pid records)
  realnode.json, containerd/, kubelet/, ...   only with a real node (see realnode.py)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tandem.devcluster import paths
from tandem.devcluster.pki import Pki

# Components in start order; `down` stops them in reverse.
COMPONENTS: tuple[str, ...] = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
# Named loopback ports each cluster needs.
PORT_NAMES: tuple[str, ...] = ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok")
# Which component listens on which port, for "port taken" messages.
LOOPBACK = "127.0.0.1"
PORT_OWNERS: dict[str, str] = {
    "etcd": "etcd",
    "etcd-peer": "etcd",
    "apiserver": "kube-apiserver",
    "controller-manager": "kube-controller-manager",
    "scheduler": "kube-scheduler",
    "kwok": "kwok",
}


@dataclass
class ClusterState:
    """One cluster's folder, recorded ports and the API server's address.

    `address` is 127.0.0.1 unless the cluster has a real node: then it is the node bridge's gateway,
    an address pods can reach (the `kubernetes` Service's endpoint) that stays on this machine.
    """

    name: str
    directory: Path
    ports: dict[str, int] = field(default_factory=dict)
    address: str = LOOPBACK

    @property
    def state_file(self) -> Path:
        return self.directory / "state.json"

    @property
    def kubeconfig(self) -> Path:
        return self.directory / "kubeconfig"

    @property
    def pki(self) -> Pki:
        return Pki(self.directory / "pki")

    @property
    def kubeconfig_dir(self) -> Path:
        return self.directory / "kubeconfigs"

    @property
    def config_dir(self) -> Path:
        return self.directory / "config"

    @property
    def etcd_dir(self) -> Path:
        return self.directory / "etcd"

    @property
    def log_dir(self) -> Path:
        return self.directory / "logs"

    @property
    def run_dir(self) -> Path:
        return self.directory / "run"

    @property
    def server(self) -> str:
        return f"https://{self.address}:{self.ports['apiserver']}"

    def log(self, component: str) -> Path:
        return self.log_dir / f"{component}.log"

    def pid_file(self, component: str) -> Path:
        return self.run_dir / f"{component}.json"

    def component_kubeconfig(self, component: str) -> Path:
        return self.kubeconfig_dir / f"{component}.kubeconfig"

    def save(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        data = {"name": self.name, "ports": self.ports, "address": self.address}
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.state_file)


def load(name: str) -> ClusterState | None:
    """The recorded state of cluster `name`, or None if it was never started (or was taken down)."""
    directory = paths.cluster_dir(name)
    try:
        data = json.loads((directory / "state.json").read_text())
        ports = {key: int(value) for key, value in data["ports"].items()}
        address = str(data.get("address", LOOPBACK))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if set(ports) != set(PORT_NAMES):
        return None
    return ClusterState(name=name, directory=directory, ports=ports, address=address)
