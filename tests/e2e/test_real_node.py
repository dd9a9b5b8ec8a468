"""The real node (`tandem cluster up --real-node`): pods really run, and `down` leaves nothing behind.

One cluster of its own for the module (`tandem-realnode-test`, or TANDEM_REAL_NODE_TEST_CLUSTER), with
one simulated GPU node and one simulated CPU node beside the real one. The last test takes it down and
checks that no process, mount, interface, iptables rule, nftables table, cgroup, sysctl change or
outside folder of it is left. Warm (binaries and images cached): about a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tandem.devcluster import cluster as devcluster
from tandem.devcluster import hostchanges, nodeconfig, nodeimages, realnode

CLUSTER = os.environ.get("TANDEM_REAL_NODE_TEST_CLUSTER", "tandem-realnode-test")
BUSYBOX = nodeimages.BUSYBOX_IMAGE
POD_READY_SECONDS = 60.0

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the real node needs root")


def _host_state() -> dict[str, Any]:
    """What the real node may change on this machine (compared before `up` and after `down`)."""
    return {
        "iptables": {
            family: sorted(
                line
                for line in hostchanges.iptables_save(family).splitlines()
                if line and not line.startswith("#")
            )
            for family in hostchanges.IPTABLES_FAMILIES
        },
        "nft_tables": hostchanges.nft_tables(),
        "links": sorted(p.name for p in Path("/sys/class/net").iterdir()),
        "sysctls": {key: hostchanges.read_sysctl(key) for key in hostchanges.SYSCTLS},
        "outside_paths": [p for p in hostchanges.OUTSIDE_PATHS if os.path.lexists(p)],
    }


def _iptables_rule_lines(state: dict[str, Any]) -> dict[str, list[str]]:
    # Packet counters ("[0:0]") change with traffic; rules and chain names must match exactly.
    return {family: [line.split(" [")[0] for line in lines] for family, lines in state["iptables"].items()}


class Kube:
    """kubectl against the test cluster."""

    def __init__(self, info: devcluster.ClusterInfo) -> None:
        self.info = info
        self.env = {**os.environ, "KUBECONFIG": str(info.kubeconfig)}

    def run(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.info.kubectl), *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr or result.stdout}")
        return result

    def apply(self, *documents: dict[str, Any]) -> None:
        self.run("apply", "-f", "-", stdin="\n---\n".join(json.dumps(d) for d in documents))

    def get(self, *args: str) -> Any:
        return json.loads(self.run("get", "-o", "json", *args).stdout)

    def wait_running(self, namespace: str, name: str, seconds: float = POD_READY_SECONDS) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        pod: dict[str, Any] = {}
        while time.monotonic() < deadline:
            pod = self.get("pod", "-n", namespace, name)
            statuses = pod.get("status", {}).get("containerStatuses", [])
            if pod["status"].get("phase") == "Running" and statuses and all(s.get("ready") for s in statuses):
                return pod
            time.sleep(0.25)
        raise AssertionError(f"pod {namespace}/{name} not Running+Ready in {seconds}s: {pod.get('status')}")


@pytest.fixture(scope="module")
def host_before() -> dict[str, Any]:
    devcluster.down(CLUSTER)  # a run that was killed may have left one
    return _host_state()


@pytest.fixture(scope="module")
def info(host_before: dict[str, Any]) -> Iterator[devcluster.ClusterInfo]:
    started = devcluster.up(CLUSTER, real_node=True, gpu_nodes=1, cpu_nodes=1, timeout=180)
    try:
        yield started
    finally:
        devcluster.down(CLUSTER)


@pytest.fixture(scope="module")
def kube(info: devcluster.ClusterInfo) -> Kube:
    return Kube(info)


@pytest.fixture
def namespace(kube: Kube) -> Iterator[str]:
    name = f"rn-{uuid.uuid4().hex[:8]}"
    kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    deadline = time.monotonic() + 30
    while kube.run("get", "serviceaccount", "-n", name, "default", check=False).returncode != 0:
        assert time.monotonic() < deadline, f"no default ServiceAccount in {name}"
        time.sleep(0.1)
    yield name
    kube.run("delete", "namespace", name, "--wait=false", check=False)


def _pod(name: str, command: str, **spec: Any) -> dict[str, Any]:
    """A busybox pod on the real node whose shell exits at once on SIGTERM."""
    container: dict[str, Any] = {
        "name": "main",
        "image": BUSYBOX,
        "imagePullPolicy": "Never",
        "command": ["sh", "-c", f"trap 'exit 0' TERM; {command} & wait"],
    }
    container |= spec.pop("container", {})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "nodeSelector": {nodeconfig.REAL_NODE_LABEL: "true"},
            "terminationGracePeriodSeconds": 30,
            "containers": [container],
            **spec,
        },
    }


def test_real_node_is_ready_with_simulated_gpus_beside_kwok(kube: Kube, info: devcluster.ClusterInfo) -> None:
    assert info.real_node == nodeconfig.NODE_NAME
    node = kube.get("node", nodeconfig.NODE_NAME)
    assert node["metadata"]["labels"][nodeconfig.REAL_NODE_LABEL] == "true"
    assert "kwok.x-k8s.io/node" not in node["metadata"].get("annotations", {})
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
    assert node["status"]["nodeInfo"]["kubeletVersion"] == "v1.33.13"
    assert node["status"]["capacity"][nodeconfig.GPU_RESOURCE] == str(nodeconfig.DEFAULT_GPUS)
    assert node["status"]["allocatable"][nodeconfig.GPU_RESOURCE] == str(nodeconfig.DEFAULT_GPUS)
    names = {n["metadata"]["name"] for n in kube.get("nodes")["items"]}
    assert names == {nodeconfig.NODE_NAME, "gpu-node-0", "cpu-node-0"}
    # The pod network and the API server's address are the node's bridge, reachable from this machine.
    assert info.server.startswith(f"https://{node['status']['addresses'][0]['address']}:")


def test_pod_runs_with_logs_exec_service_dns_and_the_api(kube: Kube, namespace: str) -> None:
    web = _pod("web", "mkdir -p /www && echo served-by-web > /www/index.html && httpd -f -p 8080 -h /www")
    client = _pod("client", "echo hello from the real node; sleep 100000")
    # The client reads pods in its namespace with its ServiceAccount token, through the `kubernetes`
    # Service (10.96.0.1:443 -> the API server on the bridge address).
    view = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "default-view", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
        "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": namespace}],
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    for pod in (web, client):
        pod["metadata"]["namespace"] = namespace
    kube.apply(view, service, web, client)
    kube.wait_running(namespace, "web")
    found = kube.wait_running(namespace, "client")
    assert found["spec"]["nodeName"] == nodeconfig.NODE_NAME
    assert found["status"]["podIP"].startswith("10.244.")

    assert "hello from the real node" in kube.run("logs", "-n", namespace, "client").stdout

    def sh(script: str) -> str:
        return kube.run("exec", "-n", namespace, "client", "--", "sh", "-c", script).stdout

    # CoreDNS answers for Service names (the pod's resolv.conf points at the kube-dns Service).
    lookup = sh(f"nslookup web.{namespace}.svc.cluster.local")
    web_ip = kube.get("service", "-n", namespace, "web")["spec"]["clusterIP"]
    assert web_ip in lookup
    # kube-proxy routes the ClusterIP to the other pod (short name through the search path). (Not
    # wget's -T: Debian's static busybox 1.35 crashes on it.)
    deadline = time.monotonic() + 20
    while "served-by-web" not in (page := sh("timeout 5 wget -qO- http://web/ || true")):
        assert time.monotonic() < deadline, f"no answer from the web Service: {page!r}"
        time.sleep(0.5)
    # The API server through the `kubernetes` Service, anonymous and with the pod's token.
    version = json.loads(sh("wget -qO- --no-check-certificate https://kubernetes.default.svc/version"))
    assert version["gitVersion"] == "v1.33.13"
    token = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    pods = json.loads(
        sh(
            f'wget -qO- --no-check-certificate --header "Authorization: Bearer $(cat {token})" '
            f"https://kubernetes.default.svc/api/v1/namespaces/{namespace}/pods"
        )
    )
    assert {p["metadata"]["name"] for p in pods["items"]} == {"web", "client"}

    # A command that handles SIGTERM ends at once: deletion does not wait out the 30 s grace period.
    start = time.monotonic()
    kube.run("delete", "pod", "-n", namespace, "client", "web", "--wait=true", "--timeout=60s")
    assert time.monotonic() - start < 15


def test_gpu_pod_lands_on_the_real_node(kube: Kube, namespace: str) -> None:
    # No node selector and no toleration: the simulated GPU node is tainted, so only the real node fits.
    pod = _pod(
        "gpu",
        "env; sleep 100000",
        container={"resources": {"limits": {nodeconfig.GPU_RESOURCE: "2"}}},
    )
    del pod["spec"]["nodeSelector"]
    pod["metadata"]["namespace"] = namespace
    kube.apply(pod)
    found = kube.wait_running(namespace, "gpu")
    assert found["spec"]["nodeName"] == nodeconfig.NODE_NAME
    env = kube.run("logs", "-n", namespace, "gpu").stdout
    assert "TANDEM_SIMULATED_GPU=true" in env
    devices = next(line for line in env.splitlines() if line.startswith("NVIDIA_VISIBLE_DEVICES="))
    assert len(devices.split("=", 1)[1].split(",")) == 2
    kube.run("delete", "pod", "-n", namespace, "gpu", "--wait=false")


def test_down_leaves_nothing_behind(info: devcluster.ClusterInfo, host_before: dict[str, Any]) -> None:
    node = realnode.load(info.state_dir)
    assert node is not None
    socket = str(node.containerd_socket)
    # A pod still running when `down` comes must go too.
    kube = Kube(info)
    kube.apply(_pod("leftover", "sleep 100000") | {"metadata": {"name": "leftover", "namespace": "default"}})
    kube.wait_running("default", "leftover")
    cgroups = hostchanges.cgroup_dirs(node.cgroup_root)
    assert cgroups, "the node's cgroup subtree should exist while it runs"

    assert devcluster.down(CLUSTER)

    leftovers = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(info.state_dir) in cmdline or socket in cmdline:
                leftovers.append(f"process {proc.name}: {cmdline.replace(chr(0), ' ')[:120]}")
    leftovers += [f"mount {m}" for m in hostchanges.mounts_under([info.state_dir])]
    leftovers += [f"cgroup {c}" for c in hostchanges.cgroup_dirs(node.cgroup_root)]
    assert leftovers == []
    assert not info.state_dir.exists()
    after = _host_state()
    assert not hostchanges.link_exists(node.bridge)
    assert after["links"] == host_before["links"]
    assert _iptables_rule_lines(after) == _iptables_rule_lines(host_before)
    assert after["nft_tables"] == host_before["nft_tables"]
    assert after["sysctls"] == host_before["sysctls"]
    assert after["outside_paths"] == host_before["outside_paths"]
