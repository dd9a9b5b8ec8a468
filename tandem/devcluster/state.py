"""The per-cluster state folder: its layout and the ports chosen at the first `up`.

Layout of `<cache>/tandem/clusters/<name>/`:
  state.json        ports (fixed at the first `up`, reused by later ones)
  kubeconfig        the admin kubeconfig users point KUBECONFIG at
  pki/              CA, serving and client certificates, service-account key
  kubeconfigs/      one kubeconfig per component identity
  config/           scheduler configuration, kwok stages
  etcd/             etcd data
  logs/<component>.log, run/<component>.json (pid records)
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
    """One cluster's folder and recorded ports."""

    name: str
    directory: Path
    ports: dict[str, int] = field(default_factory=dict)

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
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    def log(self, component: str) -> Path:
        return self.log_dir / f"{component}.log"

    def pid_file(self, component: str) -> Path:
        return self.run_dir / f"{component}.json"

    def component_kubeconfig(self, component: str) -> Path:
        return self.kubeconfig_dir / f"{component}.kubeconfig"

    def save(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"name": self.name, "ports": self.ports}, indent=2) + "\n")
        tmp.replace(self.state_file)


def load(name: str) -> ClusterState | None:
    """The recorded state of cluster `name`, or None if it was never started (or was taken down)."""
    directory = paths.cluster_dir(name)
    try:
        data = json.loads((directory / "state.json").read_text())
        ports = {key: int(value) for key, value in data["ports"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if set(ports) != set(PORT_NAMES):
        return None
    return ClusterState(name=name, directory=directory, ports=ports)
