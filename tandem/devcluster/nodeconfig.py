"""The real node's configuration: its recorded settings, and its processes' config files and argv.

Pure functions of the recorded `RealNode` and the cluster state, like components.py for the control
plane. What each setting is for is said where it is set; the why of most of them is in
docs/devcluster.md ("The real node").
"""

from __future__ import annotations

__all__ = ["GPU_RESOURCE", "RealNode"]

import hashlib
import ipaddress
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tandem.devcluster import nodeimages
from tandem.devcluster.components import SERVICE_CIDR
from tandem.devcluster.nodes import GPU_RESOURCE
from tandem.devcluster.pki import COREDNS
from tandem.devcluster.state import ClusterState

NODE_NAME = "real-node-0"
REAL_NODE_LABEL = "tandem.dev/real-node"
SIMULATED_GPU_LABEL = "tandem.dev/simulated-gpu"
DNS_SERVICE_IP = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
DEFAULT_GPUS = 8
# Pod subnets are /24s of this range, one per real node; the first one no interface or route uses wins.
POD_RANGE = ipaddress.IPv4Network("10.244.0.0/16")
PORT_NAMES: tuple[str, ...] = (
    "kubelet",
    "kubelet-healthz",
    "kube-proxy-healthz",
    "kube-proxy-metrics",
    "coredns",
    "coredns-health",
    "coredns-ready",
)
CNI_BIN_DIR = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
RUNC = Path("/usr/sbin/runc")
DEVICE_PLUGIN_DIR = Path("/var/lib/kubelet/device-plugins")  # fixed in kubelet (pluginapi.DevicePluginPath)
COREDNS_ROLE = "tandem:coredns"
RBAC_GROUP = "rbac.authorization.k8s.io"


def containerd_socket(cluster_dir: Path) -> Path:
    """The node's containerd socket in a cluster's folder (realnode.containerd_address's answer)."""
    return cluster_dir / "containerd" / "run" / "containerd.sock"


def bridge_name(cluster: str) -> str:
    """A Linux interface name (at most 15 bytes) unique to the cluster: `tandem` + 6 hex digits."""
    return "tandem" + hashlib.sha256(cluster.encode()).hexdigest()[:6]


@dataclass
class RealNode:
    """The recorded settings of one cluster's real node (`realnode.json` in the cluster's folder)."""

    cluster: str
    directory: Path
    subnet: str
    gpus: int = DEFAULT_GPUS
    node_name: str = NODE_NAME
    ports: dict[str, int] = field(default_factory=dict)

    # -- network --------------------------------------------------------------------------------
    @property
    def gateway(self) -> str:
        """The bridge's address: the pods' gateway, and the node's (and API server's) address."""
        return str(next(ipaddress.ip_network(self.subnet).hosts()))

    @property
    def bridge(self) -> str:
        return bridge_name(self.cluster)

    @property
    def network_name(self) -> str:
        return f"tandem-{self.cluster}"

    # -- files ----------------------------------------------------------------------------------
    @property
    def record_file(self) -> Path:
        return self.directory / "realnode.json"

    @property
    def host_record_file(self) -> Path:
        return self.directory / "host-changes.json"

    @property
    def containerd_dir(self) -> Path:
        return self.directory / "containerd"

    @property
    def containerd_socket(self) -> Path:
        return containerd_socket(self.directory)

    @property
    def containerd_config(self) -> Path:
        return self.containerd_dir / "config.toml"

    @property
    def runc_root(self) -> Path:
        return self.containerd_dir / "runc"

    @property
    def kubelet_dir(self) -> Path:
        return self.directory / "kubelet"

    @property
    def pod_logs_dir(self) -> Path:
        return self.directory / "pod-logs"

    @property
    def cni_conf_dir(self) -> Path:
        return self.directory / "cni" / "net.d"

    @property
    def cni_ipam_dir(self) -> Path:
        return self.directory / "cni" / "ipam"

    @property
    def config_dir(self) -> Path:
        return self.directory / "config"

    @property
    def cgroup_root(self) -> str:
        """kubelet's cgroupRoot: pods live under `<hierarchy>/tandem-<cluster>/kubepods/...`."""
        return f"/tandem-{self.cluster}"

    @property
    def device_plugin_socket(self) -> Path:
        return DEVICE_PLUGIN_DIR / f"tandem-{self.cluster}-gpu.sock"

    # -- record ---------------------------------------------------------------------------------
    def save(self) -> None:
        data = asdict(self)
        data["directory"] = str(self.directory)
        tmp = self.record_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.record_file)

    @classmethod
    def load(cls, directory: Path) -> RealNode | None:
        try:
            data = json.loads((directory / "realnode.json").read_text())
            node = cls(
                cluster=str(data["cluster"]),
                directory=directory,
                subnet=str(data["subnet"]),
                gpus=int(data["gpus"]),
                node_name=str(data["node_name"]),
                ports={key: int(value) for key, value in data["ports"].items()},
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return node if set(node.ports) == set(PORT_NAMES) else None


def pick_subnet(used: list[ipaddress.IPv4Network], preferred: int = 0) -> str:
    """The first /24 of POD_RANGE, from `preferred` on, that overlaps none of the `used` networks."""
    subnets = list(POD_RANGE.subnets(new_prefix=24))
    for offset in range(len(subnets)):
        candidate = subnets[(preferred + offset) % len(subnets)]
        if not any(candidate.overlaps(net) for net in used):
            return str(candidate)
    raise ValueError(f"every /24 of {POD_RANGE} is in use on this machine")


# -- containerd -------------------------------------------------------------------------------------
def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string is a JSON string for our (ASCII) values


def _toml(tables: dict[str, dict[str, object]]) -> str:
    lines: list[str] = []
    for table, values in tables.items():
        if table:
            lines.append(f"\n[{table}]")
        lines += [f"  {key} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines).lstrip("\n") + "\n"


def containerd_config(node: RealNode) -> str:
    """containerd 1.6's config (version 2): own root, state and socket; CRI set up for this machine."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return _toml(
        {
            "": {
                "version": 2,
                "root": str(node.containerd_dir / "root"),
                "state": str(node.containerd_dir / "state"),
                "oom_score": 0,
                # Plugins that probe for things this machine lacks, and only log errors.
                "disabled_plugins": [
                    "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.tracing.processor.v1.otlp",
                    "io.containerd.internal.v1.tracing",
                ],
            },
            "grpc": {"address": str(node.containerd_socket)},
            "ttrpc": {"address": str(node.containerd_socket) + ".ttrpc"},
            "debug": {"address": "", "level": "warn"},
            "metrics": {"address": ""},
            # Where containerd would otherwise install "opt" plugins (/opt/containerd).
            'plugins."io.containerd.internal.v1.opt"': {"path": str(node.containerd_dir / "opt")},
            cri: {
                "sandbox_image": nodeimages.PAUSE_IMAGE,
                # The sandbox asks for oom_score_adj -998; this machine lacks CAP_SYS_RESOURCE, so
                # without this every pod fails ("can't get final child's PID from pipe: EOF").
                "restrict_oom_score_adj": True,
                "disable_apparmor": True,
                "enable_selinux": False,
                # Pod network namespaces under our state dir, not /var/run/netns.
                "netns_mounts_under_state_dir": True,
                # Exec/attach/port-forward streams: loopback, a free port (kubelet proxies to it).
                "stream_server_address": "127.0.0.1",
                "stream_server_port": "0",
                "max_container_log_line_size": 16384,
            },
            f"{cri}.containerd": {"snapshotter": "overlayfs", "default_runtime_name": "runc"},
            f"{cri}.containerd.runtimes.runc": {"runtime_type": "io.containerd.runc.v2"},
            f"{cri}.containerd.runtimes.runc.options": {
                "SystemdCgroup": False,  # cgroupfs, as kubelet's cgroupDriver (no systemd here)
                "BinaryName": str(RUNC),
                "Root": str(node.runc_root),
            },
            f"{cri}.cni": {
                "bin_dir": str(CNI_BIN_DIR),
                "conf_dir": str(node.cni_conf_dir),
                "max_conf_num": 1,
            },
        }
    )


def containerd(node: RealNode) -> list[str]:
    return ["/usr/bin/containerd", f"--config={node.containerd_config}"]


# -- CNI --------------------------------------------------------------------------------------------
def cni_conflist(node: RealNode) -> dict[str, Any]:
    """bridge (own bridge, gateway = node address, masquerade out, hairpin for self-Service traffic),
    host-local addresses recorded under the state dir, portmap for hostPort."""
    return {
        "cniVersion": "1.0.0",
        "name": node.network_name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": node.bridge,
                "isGateway": True,
                "ipMasq": True,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": node.subnet, "gateway": node.gateway}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(node.cni_ipam_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


# -- kubelet ----------------------------------------------------------------------------------------
def kubelet_config(node: RealNode, s: ClusterState) -> dict[str, Any]:
    pki = s.pki
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": node.gateway,
        "port": node.ports["kubelet"],
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": node.ports["kubelet-healthz"],
        "tlsCertFile": str(pki.cert("kubelet-serving")),
        "tlsPrivateKeyFile": str(pki.key("kubelet-serving")),
        # The API server's kubelet client certificate is signed by the cluster CA; everything else is
        # asked of the API server (SubjectAccessReview), as on a production node.
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki.ca_cert)},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": f"unix://{node.containerd_socket}",
        "imageServiceEndpoint": f"unix://{node.containerd_socket}",
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": node.cgroup_root,
        "failSwapOn": False,
        "clusterDNS": [DNS_SERVICE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "podLogsDir": str(node.pod_logs_dir),
        # Local images cannot be pulled again: image garbage collection must never remove them
        # (100 turns it off).
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        # Small absolute floors instead of the percentages made for dedicated node disks (15% free of
        # a shared development disk is tens of GB, and would evict the demo's pods).
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1Gi",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1Gi",
            "imagefs.inodesFree": "1%",
        },
        "maxPods": 110,
        "serializeImagePulls": False,
        # Status is computed every 2 s and posted only when it changed (or every minute): the GPUs
        # the device plugin registers show in allocatable within seconds, not 10.
        "nodeStatusUpdateFrequency": "2s",
        "nodeStatusReportFrequency": "1m",
        "shutdownGracePeriod": "0s",
    }


def kubelet(bin_dir: Path, node: RealNode, s: ClusterState) -> list[str]:
    labels = {REAL_NODE_LABEL: "true"}
    if node.gpus:
        labels |= {SIMULATED_GPU_LABEL: "true", "nvidia.com/gpu.present": "true"}
    return [
        str(bin_dir / "kubelet"),
        f"--config={node.config_dir / 'kubelet.yaml'}",
        f"--kubeconfig={s.component_kubeconfig('kubelet')}",
        f"--root-dir={node.kubelet_dir}",
        f"--cert-dir={node.kubelet_dir / 'pki'}",
        f"--hostname-override={node.node_name}",
        f"--node-ip={node.gateway}",
        "--node-labels=" + ",".join(f"{k}={v}" for k, v in labels.items()),
        # cAdvisor's containerd stats (deprecated flag, still read): else it dials /run/containerd.
        f"--containerd={node.containerd_socket}",
        "--v=1",
    ]


# -- kube-proxy -------------------------------------------------------------------------------------
def kube_proxy_config(node: RealNode, s: ClusterState) -> dict[str, Any]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(s.component_kubeconfig("kube-proxy"))},
        "mode": "iptables",
        "hostnameOverride": node.node_name,
        "bindAddress": node.gateway,
        "clusterCIDR": node.subnet,
        "healthzBindAddress": f"127.0.0.1:{node.ports['kube-proxy-healthz']}",
        "metricsBindAddress": f"127.0.0.1:{node.ports['kube-proxy-metrics']}",
        # NodePorts only on the node's own (bridge) address, and not on 127.0.0.1, which would need
        # route_localnet=1 on the whole machine.
        "nodePortAddresses": [f"{node.gateway}/32"],
        "iptables": {"localhostNodePorts": False},
        # 0 = leave the machine's conntrack table size and timeouts as they are.
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
            "udpTimeout": "0s",
            "udpStreamTimeout": "0s",
        },
    }


def kube_proxy(bin_dir: Path, node: RealNode) -> list[str]:
    return [str(bin_dir / "kube-proxy"), f"--config={node.config_dir / 'kube-proxy.yaml'}", "--v=1"]


def kube_proxy_cleanup(bin_dir: Path) -> list[str]:
    """kube-proxy's own removal of the rules and chains it made (run after it stopped)."""
    return [str(bin_dir / "kube-proxy"), "--cleanup", "--v=1"]


# -- CoreDNS ----------------------------------------------------------------------------------------
def corefile(node: RealNode, s: ClusterState) -> str:
    """Cluster names only: no `forward`, so no DNS query leaves the machine."""
    return f""".:{node.ports["coredns"]} {{
    bind {node.gateway}
    errors
    health 127.0.0.1:{node.ports["coredns-health"]}
    ready 127.0.0.1:{node.ports["coredns-ready"]}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {s.component_kubeconfig("coredns")} tandem-{s.name}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 30
    }}
    cache 30
    loadbalance
}}
"""


def coredns(bin_dir: Path, node: RealNode) -> list[str]:
    return [str(bin_dir / "coredns"), "-conf", str(node.config_dir / "Corefile")]


def coredns_objects(node: RealNode) -> list[tuple[str, dict[str, Any]]]:
    """(collection path, object) to create: CoreDNS's read-only role, and the `kube-dns` Service with a
    hand-kept EndpointSlice pointing at the CoreDNS process on the node's address."""
    dns_port = node.ports["coredns"]
    service_name = "kube-dns"
    managed_by = "tandem-devcluster"
    return [
        (
            "/apis/rbac.authorization.k8s.io/v1/clusterroles",
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": COREDNS_ROLE},
                "rules": [
                    {
                        "apiGroups": [""],
                        "resources": ["services", "namespaces", "pods"],
                        "verbs": ["list", "watch"],
                    },
                    {
                        "apiGroups": ["discovery.k8s.io"],
                        "resources": ["endpointslices"],
                        "verbs": ["list", "watch"],
                    },
                ],
            },
        ),
        (
            "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": COREDNS_ROLE},
                "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": COREDNS_ROLE},
                "subjects": [{"apiGroup": RBAC_GROUP, "kind": "User", "name": COREDNS.user}],
            },
        ),
        (
            "/api/v1/namespaces/kube-system/services",
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": service_name,
                    "namespace": "kube-system",
                    "labels": {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS"},
                },
                "spec": {
                    "clusterIP": DNS_SERVICE_IP,
                    "ports": [
                        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": dns_port},
                        {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": dns_port},
                    ],
                },
            },
        ),
        (
            "/apis/discovery.k8s.io/v1/namespaces/kube-system/endpointslices",
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{service_name}-{node.node_name}",
                    "namespace": "kube-system",
                    "labels": {
                        "kubernetes.io/service-name": service_name,
                        "endpointslice.kubernetes.io/managed-by": managed_by,
                    },
                },
                "addressType": "IPv4",
                "endpoints": [
                    {
                        "addresses": [node.gateway],
                        "conditions": {"ready": True},
                        "nodeName": node.node_name,
                    }
                ],
                "ports": [
                    {"name": "dns", "port": dns_port, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": dns_port, "protocol": "TCP"},
                ],
            },
        ),
    ]


def _service_cidr_check() -> None:
    # DNS_SERVICE_IP must be inside the service range the API server allocates from.
    assert ipaddress.ip_address(DNS_SERVICE_IP) in ipaddress.ip_network(SERVICE_CIDR)


_service_cidr_check()


# -- simulated GPUs ---------------------------------------------------------------------------------
def gpu_plugin(bin_dir: Path, node: RealNode) -> list[str]:
    return [
        str(bin_dir / "tandem-gpu-plugin"),
        f"-resource={GPU_RESOURCE}",
        f"-count={node.gpus}",
        f"-socket-dir={DEVICE_PLUGIN_DIR}",
        f"-socket-name={node.device_plugin_socket.name}",
    ]
