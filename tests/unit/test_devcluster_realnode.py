"""The real node's configuration, its record of host changes and its images (no cluster, no root)."""

from __future__ import annotations

import ipaddress
import json
import tomllib
from pathlib import Path

import pytest

from tandem.devcluster import (
    build,
    components,
    hostchanges,
    nodeconfig,
    nodeimages,
    paths,
    pki,
    realnode,
    state,
)

PORTS = dict(zip(state.PORT_NAMES, range(30001, 30001 + len(state.PORT_NAMES)), strict=True))
NODE_PORTS = dict(zip(nodeconfig.PORT_NAMES, range(31001, 31001 + len(nodeconfig.PORT_NAMES)), strict=True))


@pytest.fixture
def node(tmp_path: Path) -> nodeconfig.RealNode:
    return nodeconfig.RealNode(
        cluster="unit", directory=tmp_path / "unit", subnet="10.244.3.0/24", ports=dict(NODE_PORTS)
    )


@pytest.fixture
def cluster_state(node: nodeconfig.RealNode) -> state.ClusterState:
    return state.ClusterState(name="unit", directory=node.directory, ports=dict(PORTS), address=node.gateway)


def _flags(argv: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)


# -- control plane with a real node ------------------------------------------------------------------
def test_api_server_listens_on_the_bridge_with_the_endpoint_reconciler(
    cluster_state: state.ClusterState,
) -> None:
    flags = _flags(components.command("kube-apiserver", Path("/bin"), cluster_state))
    assert flags["bind-address"] == flags["advertise-address"] == "10.244.3.1"
    assert flags["endpoint-reconciler-type"] == "lease"
    assert cluster_state.server == "https://10.244.3.1:30003"


def test_without_a_real_node_the_api_server_stays_on_loopback(tmp_path: Path) -> None:
    s = state.ClusterState(name="unit", directory=tmp_path, ports=dict(PORTS))
    flags = _flags(components.command("kube-apiserver", Path("/bin"), s))
    assert flags["bind-address"] == "127.0.0.1"
    assert flags["endpoint-reconciler-type"] == "none"


def test_state_keeps_the_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    state.ClusterState(
        name="unit", directory=paths.cluster_dir("unit"), ports=dict(PORTS), address="10.244.9.1"
    ).save()
    loaded = state.load("unit")
    assert loaded is not None
    assert loaded.address == "10.244.9.1"
    # A state file from before real nodes existed has no address: loopback.
    data = json.loads((paths.cluster_dir("unit") / "state.json").read_text())
    del data["address"]
    (paths.cluster_dir("unit") / "state.json").write_text(json.dumps(data))
    loaded = state.load("unit")
    assert loaded is not None
    assert loaded.address == "127.0.0.1"


def test_apiserver_certificate_gains_the_bridge_address(tmp_path: Path) -> None:
    p = pki.ensure_pki(tmp_path / "pki")
    assert pki.cert_ip_addresses(p.cert("apiserver")) == {"127.0.0.1", pki.SERVICE_IP}
    ca_before = p.ca_cert.read_bytes()
    pki.ensure_pki(tmp_path / "pki", apiserver_ips=["10.244.3.1"])
    assert pki.cert_ip_addresses(p.cert("apiserver")) == {"127.0.0.1", pki.SERVICE_IP, "10.244.3.1"}
    assert p.ca_cert.read_bytes() == ca_before  # same CA: existing kubeconfigs stay valid


def test_node_identities(tmp_path: Path) -> None:
    from cryptography import x509

    p = pki.ensure_pki(tmp_path / "pki")
    pki.ensure_node_pki(p, "real-node-0", "10.244.3.1")
    subject = x509.load_pem_x509_certificate(p.cert("kubelet").read_bytes()).subject.rfc4514_string()
    assert subject == "CN=system:node:real-node-0,O=system:nodes"
    proxy = x509.load_pem_x509_certificate(p.cert("kube-proxy").read_bytes()).subject.rfc4514_string()
    assert proxy == "CN=system:kube-proxy"
    assert "10.244.3.1" in pki.cert_ip_addresses(p.cert("kubelet-serving"))


# -- the node's configuration -----------------------------------------------------------------------
def test_record_round_trips(node: nodeconfig.RealNode) -> None:
    node.directory.mkdir(parents=True)
    node.save()
    assert nodeconfig.RealNode.load(node.directory) == node
    assert node.gateway == "10.244.3.1"
    assert len(node.bridge) <= 15
    assert nodeconfig.bridge_name("a") != nodeconfig.bridge_name("b")


def test_subnet_avoids_networks_in_use() -> None:
    used = [ipaddress.IPv4Network("10.244.0.0/24"), ipaddress.IPv4Network("10.244.1.0/25")]
    assert nodeconfig.pick_subnet(used) == "10.244.2.0/24"
    assert nodeconfig.pick_subnet(used, preferred=255) == "10.244.255.0/24"


def test_subnet_refuses_when_the_range_is_taken() -> None:
    with pytest.raises(ValueError, match="in use"):
        nodeconfig.pick_subnet([ipaddress.IPv4Network("10.0.0.0/8")])


def test_containerd_config_has_what_this_machine_needs(node: nodeconfig.RealNode) -> None:
    config = tomllib.loads(nodeconfig.containerd_config(node))
    assert config["version"] == 2
    assert config["root"].startswith(str(node.directory))
    assert config["state"].startswith(str(node.directory))
    assert config["grpc"]["address"] == str(node.containerd_socket)
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["restrict_oom_score_adj"] is True  # no CAP_SYS_RESOURCE here
    assert cri["sandbox_image"] == nodeimages.PAUSE_IMAGE
    assert cri["netns_mounts_under_state_dir"] is True
    assert cri["disable_apparmor"] is True
    runc = cri["containerd"]["runtimes"]["runc"]
    assert runc["runtime_type"] == "io.containerd.runc.v2"
    assert runc["options"]["SystemdCgroup"] is False
    assert cri["cni"]["bin_dir"] == "/usr/lib/cni"
    assert cri["cni"]["conf_dir"] == str(node.cni_conf_dir)
    assert config["plugins"]["io.containerd.internal.v1.opt"]["path"].startswith(str(node.directory))


def test_kubelet_config(node: nodeconfig.RealNode, cluster_state: state.ClusterState) -> None:
    config = nodeconfig.kubelet_config(node, cluster_state)
    assert config["cgroupDriver"] == "cgroupfs"
    assert config["cgroupRoot"] == "/tandem-unit"
    assert config["failSwapOn"] is False
    assert config["readOnlyPort"] == 0
    assert config["authentication"]["anonymous"]["enabled"] is False
    assert config["authorization"]["mode"] == "Webhook"
    assert config["clusterDNS"] == [nodeconfig.DNS_SERVICE_IP]
    assert config["imageGCHighThresholdPercent"] == 100  # local images are never collected
    assert config["address"] == node.gateway
    assert config["containerRuntimeEndpoint"] == f"unix://{node.containerd_socket}"
    flags = _flags(nodeconfig.kubelet(Path("/bin"), node, cluster_state))
    assert flags["hostname-override"] == nodeconfig.NODE_NAME
    assert flags["node-ip"] == node.gateway
    assert f"{nodeconfig.REAL_NODE_LABEL}=true" in flags["node-labels"].split(",")
    assert flags["root-dir"].startswith(str(node.directory))


def test_kube_proxy_leaves_the_machine_settings_alone(
    node: nodeconfig.RealNode, cluster_state: state.ClusterState
) -> None:
    config = nodeconfig.kube_proxy_config(node, cluster_state)
    assert config["mode"] == "iptables"
    assert config["conntrack"]["maxPerCore"] == 0
    assert config["iptables"]["localhostNodePorts"] is False  # would need route_localnet=1
    assert config["nodePortAddresses"] == [f"{node.gateway}/32"]
    assert config["clusterCIDR"] == node.subnet


def test_cni_and_dns(node: nodeconfig.RealNode, cluster_state: state.ClusterState) -> None:
    conflist = nodeconfig.cni_conflist(node)
    bridge = conflist["plugins"][0]
    assert bridge["bridge"] == node.bridge
    assert bridge["ipam"]["ranges"] == [[{"subnet": node.subnet, "gateway": node.gateway}]]
    assert bridge["ipam"]["dataDir"].startswith(str(node.directory))
    corefile = nodeconfig.corefile(node, cluster_state)
    assert "forward" not in corefile  # no DNS query leaves the machine
    assert f"bind {node.gateway}" in corefile
    objects = {obj["kind"]: obj for _path, obj in nodeconfig.coredns_objects(node)}
    assert objects["Service"]["spec"]["clusterIP"] == nodeconfig.DNS_SERVICE_IP
    assert objects["EndpointSlice"]["endpoints"][0]["addresses"] == [node.gateway]
    assert objects["ClusterRoleBinding"]["subjects"][0]["name"] == pki.COREDNS.user


def test_gpu_plugin_advertises_the_extended_resource(node: nodeconfig.RealNode) -> None:
    argv = nodeconfig.gpu_plugin(Path("/bin"), node)
    assert "-resource=nvidia.com/gpu" in argv
    assert f"-count={node.gpus}" in argv
    assert f"-socket-name={node.device_plugin_socket.name}" in argv


def test_containerd_address_is_in_the_cluster_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    node = nodeconfig.RealNode(cluster="demo", directory=paths.cluster_dir("demo"), subnet="10.244.0.0/24")
    assert realnode.containerd_address("demo") == node.containerd_socket
    assert node.containerd_socket.is_relative_to(paths.cluster_dir("demo"))


def test_import_image_without_a_node_says_how_to_start_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tandem.errors import UserError

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(UserError, match="--real-node"):
        realnode.import_image("demo", tmp_path / "image.tar")


# -- host changes -----------------------------------------------------------------------------------
BEFORE = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
-A INPUT -s 192.0.2.9/32 -j DROP
COMMIT
"""
AFTER = """*filter
:INPUT ACCEPT [10:100]
:FORWARD ACCEPT [0:0]
:KUBE-FORWARD - [0:0]
-A INPUT -s 192.0.2.9/32 -j DROP
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
COMMIT
*nat
:POSTROUTING ACCEPT [0:0]
:CNI-abc - [0:0]
-A POSTROUTING -s 10.244.0.2/32 -j CNI-abc
COMMIT
"""


def test_iptables_undo_removes_only_what_was_added() -> None:
    commands = hostchanges.iptables_undo_commands(BEFORE, AFTER, "iptables")
    assert commands == [
        ["iptables", "-w", "-t", "filter", "-D", "FORWARD", "-m", "comment", "--comment",
         "kubernetes forwarding rules", "-j", "KUBE-FORWARD"],
        ["iptables", "-w", "-t", "filter", "-F", "KUBE-FORWARD"],
        ["iptables", "-w", "-t", "filter", "-X", "KUBE-FORWARD"],
        ["iptables", "-w", "-t", "nat", "-D", "POSTROUTING", "-s", "10.244.0.2/32", "-j", "CNI-abc"],
        ["iptables", "-w", "-t", "nat", "-F", "CNI-abc"],
        ["iptables", "-w", "-t", "nat", "-X", "CNI-abc"],
    ]  # fmt: skip
    assert hostchanges.iptables_undo_commands(BEFORE, BEFORE, "iptables") == []


MOUNTINFO = """\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 22 0:26 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
31 22 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
40 22 0:50 / /c/x/kubelet/pods/u/volumes/kubernetes.io~projected/kube-api-access rw - tmpfs tmpfs rw
41 22 0:51 / /c/x/containerd/state/netns/cni-1 rw - nsfs nsfs rw
42 22 0:52 / /c/x/kubelet rw - ext4 /dev/vda rw
43 22 0:53 / /c/xy/other rw - tmpfs tmpfs rw
44 22 0:54 / /c/x/with\\040space rw - tmpfs tmpfs rw
"""


def test_mounts_under_a_folder_deepest_first() -> None:
    found = hostchanges.mounts_under([Path("/c/x")], MOUNTINFO)
    assert found[0] == "/c/x/kubelet/pods/u/volumes/kubernetes.io~projected/kube-api-access"
    assert found[-1] in ("/c/x/kubelet", "/c/x/with space")
    assert set(found) == {
        "/c/x/kubelet/pods/u/volumes/kubernetes.io~projected/kube-api-access",
        "/c/x/containerd/state/netns/cni-1",
        "/c/x/kubelet",
        "/c/x/with space",
    }
    assert hostchanges.cgroup_hierarchies(MOUNTINFO) == [
        Path("/sys/fs/cgroup/memory"),
        Path("/sys/fs/cgroup/unified"),
    ]


def test_sysctls_are_restored_only_where_they_differ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "sys"
    for key, value in (("kernel/panic", "10"), ("vm/overcommit_memory", "0")):
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_text(value + "\n")
    monkeypatch.setattr(hostchanges, "SYSCTL_ROOT", root)
    before = (root / "vm/overcommit_memory").stat().st_mtime_ns
    record: dict[str, object] = {"sysctls": {"kernel/panic": "1", "vm/overcommit_memory": "0"}}
    assert hostchanges.restore_sysctls(record) == []
    assert hostchanges.read_sysctl("kernel/panic") == "1"
    assert (root / "vm/overcommit_memory").stat().st_mtime_ns == before  # equal: not written


# -- images and binaries ----------------------------------------------------------------------------
def test_oci_index_gets_the_containerd_name(tmp_path: Path) -> None:
    index = {
        "schemaVersion": 2,
        "manifests": [
            {"digest": "sha256:a", "annotations": {nodeimages.OCI_REF_ANNOTATION: "1.35"}},
            {"digest": "sha256:b", "annotations": {nodeimages.OCI_REF_ANNOTATION: "other"}},
        ],
    }
    (tmp_path / "index.json").write_text(json.dumps(index))
    nodeimages.annotate_index(tmp_path, "1.35", "tandem.dev/busybox:1.35")
    manifests = json.loads((tmp_path / "index.json").read_text())["manifests"]
    assert manifests[0]["annotations"][nodeimages.CONTAINERD_NAME_ANNOTATION] == "tandem.dev/busybox:1.35"
    assert nodeimages.CONTAINERD_NAME_ANNOTATION not in manifests[1]["annotations"]


def test_image_key_follows_its_inputs(tmp_path: Path) -> None:
    binary = tmp_path / "pause"
    binary.write_bytes(b"one")
    first = nodeimages.spec_key(nodeimages.pause_spec(binary), "umoci 0.4.7")
    binary.write_bytes(b"two")
    assert nodeimages.spec_key(nodeimages.pause_spec(binary), "umoci 0.4.7") != first


def test_node_bundle_has_its_own_modules_and_key_inputs() -> None:
    control = build._module_files(build.CONTROL_PLANE.modules)
    node_files = build._module_files(build.NODE.modules)
    # The control plane's key reads only go.mod/go.sum of its own modules: node pins never change it.
    assert set(control) == {f"{m}/{n}" for m in build.MODULES for n in ("go.mod", "go.sum")}
    assert "node/cmd/tandem-gpu-plugin/main.go" in node_files
    assert "node/cmd/pause/main.go" in node_files
    assert not set(control) & set(node_files)
    node_gomod = (paths.GOMOD_DIR / "node" / "go.mod").read_text()
    kube_gomod = (paths.GOMOD_DIR / "kubernetes" / "go.mod").read_text()
    assert build.module_version(node_gomod, "k8s.io/kubernetes") == build.module_version(
        kube_gomod, "k8s.io/kubernetes"
    )
    assert {b.name for b in build.NODE_BINARIES} == {
        "kubelet",
        "kube-proxy",
        "coredns",
        "pause",
        "tandem-gpu-plugin",
    }
