"""The real node of a dev cluster (`tandem cluster up --real-node`): containerd, kubelet, simulated GPUs,
kube-proxy and CoreDNS as plain processes beside the control plane, so pods really run.

Public entry points for other parts of Tandem (the image builder): `containerd_address` and
`import_image` put images into the node's containerd, in the `k8s.io` namespace kubelet's CRI uses, so
pods with `imagePullPolicy: Never` (or IfNotPresent) find them by name.

How the node is wired (details in docs/devcluster.md, "The real node"):
- a bridge of the cluster's own (`tandem<6 hex>`) with a /24 of 10.244.0.0/16; its gateway address is
  the node's address, the kubelet's, CoreDNS's and the API server's (so pods reach the API server
  through the `kubernetes` Service);
- containerd (Debian's, with runc and the CNI plugins) with its root, state and socket in the cluster's
  folder; pods' sandboxes use Tandem's own `pause` image, imported at start with a busybox image;
- kubelet (`real-node-0`, label `tandem.dev/real-node=true`), cgroupfs under `/tandem-<cluster>` in
  every cgroup hierarchy; `tandem-gpu-plugin` advertises simulated `nvidia.com/gpu` devices through
  kubelet's device-plugin API (a development stand-in: pods run on the CPU);
- kube-proxy in iptables mode; CoreDNS as a process behind the `kube-dns` Service (10.96.0.10).

One real node per machine: kube-proxy's iptables chains are global.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tandem.devcluster import (
    hostchanges,
    kubeconfig,
    nodeconfig,
    nodeimages,
    paths,
    pki,
    processes,
    readiness,
)
from tandem.devcluster.kubeapi import KubeAPI
from tandem.devcluster.nodeconfig import RealNode
from tandem.devcluster.processes import ProcessRecord
from tandem.devcluster.state import ClusterState
from tandem.errors import UserError

Progress = Callable[[str], None]

#: containerd namespace of kubelet's images (CRI).
CRI_NAMESPACE = "k8s.io"
# Node processes in start order; they stop in reverse (kube-proxy's cleanup and the host's after).
COMPONENTS: tuple[str, ...] = ("containerd", "kubelet", "tandem-gpu-plugin", "kube-proxy", "coredns")
PROBE_POD = "devcluster-node-probe"
# Longest usable unix socket path (sun_path is 108 bytes with its NUL; containerd adds ".ttrpc").
MAX_SOCKET_PATH = 100
REQUIRED_COMMANDS = ("containerd", "containerd-shim-runc-v2", "ctr", "runc", "iptables", "ip", "umoci", "nft")
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def containerd_address(cluster_name: str) -> Path:
    """The containerd socket of cluster `cluster_name`'s real node (it may not exist yet)."""
    return nodeconfig.containerd_socket(paths.cluster_dir(cluster_name))


def _ctr(socket: Path, *args: str) -> subprocess.CompletedProcess[str]:
    ctr = shutil.which("ctr")
    if ctr is None:
        raise UserError("`ctr` (Debian's containerd package) is not on PATH; run `make system-tools`")
    argv = [ctr, "--address", str(socket), "-n", CRI_NAMESPACE, *args]
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def import_image(cluster_name: str, oci_archive: Path) -> None:
    """Import an OCI image archive (a tar of an OCI layout, or a docker-archive) into the node.

    Each image in the archive keeps the name in its `io.containerd.image.name` annotation (an
    OCI layout) or its repo tag (a docker archive). Raises UserError when the node's containerd is
    not running or `ctr` refuses the archive.
    """
    sock = containerd_address(cluster_name)
    if not sock.is_socket():
        raise UserError(
            f"cluster {cluster_name!r} has no running real node (no containerd socket at {sock}); "
            f"start it with `tandem cluster up --name {cluster_name} --real-node`"
        )
    result = _ctr(sock, "images", "import", str(oci_archive))
    if result.returncode != 0:
        raise UserError(
            f"importing {oci_archive} into cluster {cluster_name!r}'s containerd failed "
            f"(exit {result.returncode}): {(result.stderr or result.stdout).strip()}"
        )


# -- records ----------------------------------------------------------------------------------------
def load(directory: Path) -> RealNode | None:
    """The real node recorded in a cluster's folder, or None when the cluster has none."""
    return RealNode.load(directory)


def records(directory: Path) -> list[ProcessRecord]:
    found = []
    for component in COMPONENTS:
        record = ProcessRecord.load(directory / "run" / f"{component}.json")
        if record is not None:
            found.append(record)
    return found


def running_elsewhere(name: str) -> str | None:
    """Another cluster whose real node runs, or whose changes to the machine are still in effect (its
    bridge exists: it was not taken down since the last boot), if any."""
    root = paths.clusters_root()
    if not root.is_dir():
        return None
    for directory in sorted(root.iterdir()):
        if directory.name == name or not (directory / "realnode.json").exists():
            continue
        if any(processes.is_running(r) for r in records(directory)) or hostchanges.link_exists(
            nodeconfig.bridge_name(directory.name)
        ):
            return directory.name
    return None


# -- checks and creation ----------------------------------------------------------------------------
def check_host(cluster_dir: Path) -> None:
    """Refuse early, with the fix, when this machine cannot run a real node (in `cluster_dir`)."""
    socket = nodeconfig.containerd_socket(cluster_dir)
    if len(str(socket)) > MAX_SOCKET_PATH:
        raise UserError(
            f"the containerd socket path {socket} is too long for a unix socket; "
            "use a shorter cluster name or XDG_CACHE_HOME"
        )
    if os.geteuid() != 0:
        raise UserError(
            "a real node (containerd, kubelet, iptables) needs root; run as root, or without --real-node"
        )
    env_path = _env()["PATH"]
    missing = [c for c in REQUIRED_COMMANDS if shutil.which(c, path=env_path) is None]
    missing += [
        str(nodeconfig.CNI_BIN_DIR / p)
        for p in ("bridge", "host-local", "portmap", "loopback")
        if not (nodeconfig.CNI_BIN_DIR / p).exists()
    ]
    if not nodeimages.BUSYBOX.exists():
        missing.append(str(nodeimages.BUSYBOX))
    if missing:
        raise UserError(
            f"the real node needs {', '.join(missing)}: run `make system-tools` (Debian's containerd, runc, "
            "containernetworking-plugins, iptables, nftables, umoci and busybox-static packages)"
        )
    if not Path("/proc/sys/net/bridge").is_dir():
        subprocess.run(["modprobe", "br_netfilter"], capture_output=True, check=False)
        if not Path("/proc/sys/net/bridge").is_dir():
            raise UserError("the kernel's br_netfilter is not available (`modprobe br_netfilter` failed)")
    if not hostchanges.cgroup_hierarchies():
        raise UserError("no cgroup file system is mounted under /sys/fs/cgroup")


def create(s: ClusterState, gpus: int) -> RealNode:
    """Pick the node's subnet and ports for a new cluster and record them."""
    used = []
    for text in hostchanges.used_networks():
        with contextlib.suppress(ValueError):
            used.append(ipaddress.ip_network(text, strict=False))
    ipv4 = [net for net in used if isinstance(net, ipaddress.IPv4Network)]
    ports = processes.pick_free_ports(len(nodeconfig.PORT_NAMES), avoid=s.ports.values())
    node = RealNode(
        cluster=s.name,
        directory=s.directory,
        subnet=nodeconfig.pick_subnet(ipv4),
        gpus=gpus,
        ports=dict(zip(nodeconfig.PORT_NAMES, ports, strict=True)),
    )
    node.save()
    return node


# -- host -------------------------------------------------------------------------------------------
def prepare_host(node: RealNode, report: Progress) -> None:
    """Record the machine's state (once), then create the bridge and cgroup root and set sysctls."""
    if hostchanges.load(node.host_record_file) is None:
        hostchanges.save(hostchanges.snapshot(), node.host_record_file)
    prefix = ipaddress.ip_network(node.subnet).prefixlen
    hostchanges.ensure_bridge(node.bridge, f"{node.gateway}/{prefix}")
    for key, value in hostchanges.NODE_SYSCTLS.items():
        if hostchanges.read_sysctl(key) != value:
            hostchanges.write_sysctl(key, value)
    hostchanges.ensure_cgroup(node.cgroup_root)
    report(f"  real node network: bridge {node.bridge}, pods {node.subnet}, node address {node.gateway}")


def write_config(s: ClusterState, node: RealNode) -> None:
    """Certificates, kubeconfigs and every config file of the node's processes."""
    for folder in (node.config_dir, node.containerd_socket.parent, node.kubelet_dir, node.pod_logs_dir):
        folder.mkdir(parents=True, exist_ok=True)
    node.cni_conf_dir.mkdir(parents=True, exist_ok=True)
    p = s.pki
    pki.ensure_node_pki(p, node.node_name, node.gateway)
    context = f"tandem-{s.name}"
    for component, identity in (
        ("kubelet", pki.kubelet_identity(node.node_name)),
        ("kube-proxy", pki.KUBE_PROXY),
        ("coredns", pki.COREDNS),
    ):
        kubeconfig.write(
            s.component_kubeconfig(component),
            context=context,
            server=s.server,
            pki=p,
            stem=identity.stem,
            user=identity.user,
        )
    node.containerd_config.write_text(nodeconfig.containerd_config(node))
    (node.cni_conf_dir / "10-tandem.conflist").write_text(
        json.dumps(nodeconfig.cni_conflist(node), indent=2) + "\n"
    )
    (node.config_dir / "kubelet.yaml").write_text(
        yaml.safe_dump(nodeconfig.kubelet_config(node, s), sort_keys=False)
    )
    (node.config_dir / "kube-proxy.yaml").write_text(
        yaml.safe_dump(nodeconfig.kube_proxy_config(node, s), sort_keys=False)
    )
    (node.config_dir / "Corefile").write_text(nodeconfig.corefile(node, s))


# -- processes --------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    """The environment of node processes: PATH must reach runc, iptables, mount and the like."""
    env = dict(os.environ)
    path = env.get("PATH", "/usr/bin:/bin").split(":")
    env["PATH"] = ":".join(path + [d for d in SBIN_PATH.split(":") if d not in path])
    return env


def _argv(component: str, bin_dir: Path, node: RealNode, s: ClusterState) -> list[str]:
    if component == "containerd":
        return nodeconfig.containerd(node)
    if component == "kubelet":
        return nodeconfig.kubelet(bin_dir, node, s)
    if component == "tandem-gpu-plugin":
        return nodeconfig.gpu_plugin(bin_dir, node)
    if component == "kube-proxy":
        return nodeconfig.kube_proxy(bin_dir, node)
    if component == "coredns":
        return nodeconfig.coredns(bin_dir, node)
    raise KeyError(component)


def _start(component: str, bin_dir: Path, node: RealNode, s: ClusterState) -> ProcessRecord:
    record = processes.spawn(component, _argv(component, bin_dir, node, s), s.log(component), env=_env())
    record.save(s.pid_file(component))
    return record


def _http_ok(url: str) -> readiness.Check:
    def check() -> str | None:
        with _NO_PROXY.open(url, timeout=2) as response:
            return None if response.status == 200 else f"{url}: HTTP {response.status}"

    return check


def _containerd_ready(node: RealNode) -> readiness.Check:
    def check() -> str | None:
        if not node.containerd_socket.is_socket():
            return "no socket yet"
        result = _ctr(node.containerd_socket, "version")
        return None if result.returncode == 0 else result.stderr.strip()[-200:]

    return check


def _node_ready(api: KubeAPI, node: RealNode) -> readiness.Check:
    def check() -> str | None:
        found = api.get(f"/api/v1/nodes/{node.node_name}")
        if found is None:
            return f"{node.node_name} not registered"
        conditions = found.get("status", {}).get("conditions", [])
        if not any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
            return f"{node.node_name} not Ready"
        if any(t.get("key", "").startswith("node.kubernetes.io/") for t in found["spec"].get("taints", [])):
            return f"{node.node_name} still tainted not-ready"
        if node.gpus:
            have = found.get("status", {}).get("allocatable", {}).get(nodeconfig.GPU_RESOURCE, "0")
            if have != str(node.gpus):
                return f"{node.node_name} allocatable {nodeconfig.GPU_RESOURCE}={have}, want {node.gpus}"
        return None

    return check


def probe_pod_manifest(node: RealNode) -> dict[str, Any]:
    """A pod on the real node (its own network namespace: it proves containerd, runc and CNI)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": PROBE_POD, "namespace": readiness.PROBE_NAMESPACE, "labels": {"app": PROBE_POD}},
        "spec": {
            "nodeSelector": {nodeconfig.REAL_NODE_LABEL: "true"},
            "containers": [{"name": "probe", "image": nodeimages.PAUSE_IMAGE, "imagePullPolicy": "Never"}],
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 0,
        },
    }


def _probe_running(api: KubeAPI, node: RealNode) -> readiness.Check:
    path = f"/api/v1/namespaces/{readiness.PROBE_NAMESPACE}/pods"

    def check() -> str | None:
        pod = api.get(f"{path}/{PROBE_POD}")
        if pod is None:
            api.create(path, probe_pod_manifest(node))
            return "probe pod created"
        status = pod.get("status", {})
        if status.get("phase") == "Running" and status.get("podIP"):
            return None
        waiting = [
            c["state"]["waiting"].get("reason", "")
            for c in status.get("containerStatuses", [])
            if "waiting" in c.get("state", {})
        ]
        return f"probe pod {status.get('phase')} {' '.join(waiting)}".strip()

    return check


def import_node_images(node: RealNode, bin_dir: Path) -> None:
    for spec in (nodeimages.pause_spec(bin_dir / "pause"), nodeimages.busybox_spec()):
        result = _ctr(node.containerd_socket, "images", "import", str(nodeimages.build_archive(spec)))
        if result.returncode != 0:
            raise UserError(f"importing {spec.name} into the real node failed: {result.stderr.strip()}")


def start(
    s: ClusterState, node: RealNode, bin_dir: Path, waiter: readiness.Waiter, api: KubeAPI, report: Progress
) -> None:
    """Start the node's processes on a running control plane and wait until pods run on it."""
    waiter.watch(_start("containerd", bin_dir, node, s))
    waiter.until("containerd", _containerd_ready(node), "containerd")
    import_node_images(node, bin_dir)
    for path, obj in nodeconfig.coredns_objects(node):
        # GET first: creating a Service that exists fails on its taken cluster IP, not with 409.
        if api.get(f"{path}/{obj['metadata']['name']}") is None:
            api.create(path, obj)
    for component in COMPONENTS[1:]:
        waiter.watch(_start(component, bin_dir, node, s))
    wait_ready(node, waiter, api)


def wait_ready(node: RealNode, waiter: readiness.Waiter, api: KubeAPI) -> None:
    gpus = f" with {node.gpus} {nodeconfig.GPU_RESOURCE}" if node.gpus else ""
    waiter.until(f"real node {node.node_name} Ready{gpus}", _node_ready(api, node), "kubelet")
    waiter.until(
        "kube-proxy synced",
        _http_ok(f"http://127.0.0.1:{node.ports['kube-proxy-healthz']}/healthz"),
        "kube-proxy",
    )
    coredns_ready = f"http://127.0.0.1:{node.ports['coredns-ready']}/ready"
    waiter.until("CoreDNS ready", _http_ok(coredns_ready), "coredns")
    waiter.until("probe pod Running on the real node", _probe_running(api, node), "kubelet")
    api.delete(f"/api/v1/namespaces/{readiness.PROBE_NAMESPACE}/pods/{PROBE_POD}", grace_period_seconds=0)


def stop_processes(directory: Path) -> list[ProcessRecord]:
    """Stop the node's processes (newest first); pods keep running (a restarted node adopts them)."""
    return processes.stop(list(reversed(records(directory))))


# -- teardown ---------------------------------------------------------------------------------------
def _shim_pids(node: RealNode) -> list[int]:
    """containerd shims serving this node's containerd (they run in sessions of their own)."""
    found = []
    wanted = str(node.containerd_socket).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"containerd-shim-runc-v2") and wanted in argv:
            found.append(int(entry.name))
    return found


def _kill_shims(node: RealNode, wait: float = 5.0) -> list[str]:
    deadline = time.monotonic() + wait
    while pids := _shim_pids(node):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        if time.monotonic() > deadline:
            return [f"containerd shim {pid} survived SIGKILL" for pid in pids]
        time.sleep(0.05)
    return []


def _own_outside_entry(node: RealNode) -> Callable[[Path], bool]:
    """Which entries of outside folders that existed before belong to this node."""

    def own(entry: Path) -> bool:
        if entry == node.device_plugin_socket:
            return True
        if entry.parent == Path("/var/log/containers") and entry.is_symlink():
            return os.readlink(entry).startswith(str(node.pod_logs_dir))
        return False

    return own


def _remove_cni_state(node: RealNode) -> None:
    """Results the CNI library cached for our network in /var/lib/cni (a folder other tools share)."""
    results = Path("/var/lib/cni/results")
    if results.is_dir():
        for entry in results.glob(f"{node.network_name}-*"):
            with contextlib.suppress(OSError):
                entry.unlink()
    with contextlib.suppress(OSError):
        shutil.rmtree(Path("/var/lib/cni/networks") / node.network_name)


def stop(node: RealNode) -> list[str]:
    """Stop the node's processes and its pods for good; returns what could not be stopped.

    Order: kube-proxy (then its own cleanup of its rules), CoreDNS, the GPU plugin, kubelet; the
    pods' processes (SIGKILL to the node's cgroup subtree); containerd, then its shims.
    """
    failed: list[str] = []
    found = {r.name: r for r in records(node.directory)}
    for name in ("kube-proxy", "coredns", "tandem-gpu-plugin", "kubelet"):
        if name in found:
            failed += [f"{r.name} (pid {r.pid}) survived SIGKILL" for r in processes.stop([found[name]])]
    proxy = found.get("kube-proxy")
    if proxy is not None and Path(proxy.argv[0]).exists():
        subprocess.run(
            nodeconfig.kube_proxy_cleanup(Path(proxy.argv[0]).parent),
            capture_output=True,
            env=_env(),
            check=False,
        )
    failed += hostchanges.kill_cgroup(node.cgroup_root)
    if "containerd" in found:
        failed += [f"{r.name} (pid {r.pid}) survived SIGKILL" for r in processes.stop([found["containerd"]])]
    return failed + _kill_shims(node)


def clean_host(node: RealNode) -> list[str]:
    """Undo what the node changed on this machine, once its processes (and the API server, which
    listens on the bridge) are gone; returns what could not be undone.

    Mounts under the cluster's folder; the bridge and its veths; iptables and nftables; the cgroup
    subtree; sysctls; folders outside the cluster's own.
    """
    failed = hostchanges.unmount_all([node.directory])
    failed += hostchanges.remove_bridge(node.bridge)
    record = hostchanges.load(node.host_record_file)
    if record is not None:
        failed += hostchanges.restore_firewall(record)
    failed += hostchanges.remove_cgroup(node.cgroup_root)
    if record is not None:
        failed += hostchanges.restore_sysctls(record)
        _remove_cni_state(node)
        failed += hostchanges.remove_outside_paths(record, _own_outside_entry(node))
    elif node.device_plugin_socket.exists():
        node.device_plugin_socket.unlink()
    return failed
