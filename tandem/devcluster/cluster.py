"""`up`, `down` and `status` of a named local cluster: etcd, the Kubernetes control plane and kwok, and
optionally a real node (realnode.py: containerd, kubelet, kube-proxy, CoreDNS) where pods really run,
and optionally the coscheduling scheduler for gang admission (gangscheduler.py) beside kube-scheduler.

`up` is idempotent: on a running cluster it only re-checks readiness; on a cluster whose processes
died (a reboot, a kill) it restarts them on the same ports, certificates and etcd data. It returns
only once the cluster is usable end to end: the API server is ready, every simulated node is Ready
and schedulable, the controller manager has created the `default` ServiceAccount, and a probe pod
was scheduled and reported Running.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from tandem.devcluster import (
    build,
    components,
    gangscheduler,
    kubeconfig,
    nodeconfig,
    nodes,
    paths,
    pki,
    processes,
    readiness,
    realnode,
    state,
)
from tandem.devcluster.kubeapi import ApiError, KubeAPI
from tandem.devcluster.nodeconfig import RealNode
from tandem.devcluster.processes import ProcessRecord
from tandem.devcluster.state import ClusterState
from tandem.errors import UserError

Progress = Callable[[str], None]
DEFAULT_NAME = "tandem"
UP_TIMEOUT_SECONDS = 180.0
#: The optional component: its pid record (run/gang-scheduler.json) also marks a cluster that has one.
GANG_SCHEDULER = "gang-scheduler"
PODGROUP_CRD = "podgroups.scheduling.x-k8s.io"
CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


@dataclass(frozen=True)
class ClusterInfo:
    """How to reach a running cluster."""

    name: str
    server: str
    kubeconfig: Path
    state_dir: Path
    bin_dir: Path
    #: The real node's name (`real-node-0`) when the cluster has one, else None.
    real_node: str | None = None
    #: The coscheduling scheduler's name (pods' schedulerName) when the cluster runs it, else None.
    gang_scheduler: str | None = None

    @property
    def kubectl(self) -> Path:
        """The pinned kubectl (same version as the API server)."""
        return self.bin_dir / "kubectl"


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    running: bool
    pid: int | None
    log: Path


@dataclass(frozen=True)
class ClusterStatus:
    """What `status` found; `info` is set while the cluster is running."""

    name: str
    state_dir: Path
    exists: bool
    components: tuple[ComponentStatus, ...]
    api_ready: bool
    info: ClusterInfo | None

    @property
    def running(self) -> bool:
        return self.exists and all(c.running for c in self.components) and self.api_ready


def _quiet(_message: str) -> None:
    pass


@contextlib.contextmanager
def _cluster_lock(name: str) -> Iterator[None]:
    """Serialize up/down of one cluster (e.g. two test runs starting `tandem-test` at once)."""
    root = paths.clusters_root() / ".locks"  # outside the state folder, which `down` deletes
    root.mkdir(parents=True, exist_ok=True)
    with (root / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _records(directory: Path) -> list[ProcessRecord]:
    """Pid records found in a state folder, in start order (also when state.json is unreadable)."""
    found = []
    for component in state.COMPONENTS:
        record = ProcessRecord.load(directory / "run" / f"{component}.json")
        if record is not None:
            found.append(record)
    return found


def _api(s: ClusterState, timeout: float = 5.0) -> KubeAPI:
    p = s.pki
    return KubeAPI(
        s.server, ca_file=p.ca_cert, cert_file=p.cert("admin"), key_file=p.key("admin"), timeout=timeout
    )


def _info(s: ClusterState, bin_dir: Path, node: RealNode | None = None) -> ClusterInfo:
    return ClusterInfo(
        name=s.name,
        server=s.server,
        kubeconfig=s.kubeconfig,
        state_dir=s.directory,
        bin_dir=bin_dir,
        real_node=node.node_name if node else None,
        gang_scheduler=gangscheduler.SCHEDULER_NAME if _gang_record(s.directory) else None,
    )


def _gang_record(directory: Path) -> ProcessRecord | None:
    return ProcessRecord.load(directory / "run" / f"{GANG_SCHEDULER}.json")


def _crd_established(api: KubeAPI, name: str) -> readiness.Check:
    def check() -> str | None:
        crd = api.get(f"{CRD_PATH}/{name}")
        if crd is None:
            return "not created"
        conditions = (crd.get("status") or {}).get("conditions") or []
        done = any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)
        return None if done else "not Established"

    return check


def _start_gang_scheduler(s: ClusterState, waiter: readiness.Waiter, report: Progress) -> None:
    """The PodGroup CRD of the pinned release, then the scheduler (built first if not cached) under the
    admin kubeconfig (it reads and updates PodGroups, which kube-scheduler's identity may not)."""
    binary = gangscheduler.ensure_scheduler(report)
    api = _api(s)
    api.create(CRD_PATH, yaml.safe_load(gangscheduler.podgroup_crd().read_text()))
    waiter.until(f"CRD {PODGROUP_CRD} Established", _crd_established(api, PODGROUP_CRD), "kube-apiserver")
    workdir = s.directory / GANG_SCHEDULER
    config = gangscheduler.write_config(workdir, s.kubeconfig)
    port = gangscheduler.free_port()
    argv = gangscheduler.command(binary, config, s.kubeconfig, port, workdir / "certs")
    record = processes.spawn(GANG_SCHEDULER, argv, s.log(GANG_SCHEDULER))
    record.save(s.pid_file(GANG_SCHEDULER))
    waiter.watch(record)
    waiter.until(f"{GANG_SCHEDULER} /healthz", lambda: gangscheduler.healthz(port), GANG_SCHEDULER)


def _ensure_gang_scheduler(s: ClusterState, waiter: readiness.Waiter, wanted: bool, report: Progress) -> None:
    """Start the gang scheduler when asked for or when the cluster had one (a cluster keeps it until
    `down`); a running one is left alone."""
    record = _gang_record(s.directory)
    if record is not None and processes.is_running(record):
        return
    if wanted or record is not None:
        _start_gang_scheduler(s, waiter, report)


def _new_state(name: str) -> ClusterState:
    directory = paths.cluster_dir(name)
    ports = processes.pick_free_ports(len(state.PORT_NAMES))
    s = ClusterState(name=name, directory=directory, ports=dict(zip(state.PORT_NAMES, ports, strict=True)))
    s.save()
    return s


def _check_ports(s: ClusterState, node: RealNode | None) -> None:
    wanted = dict(s.ports)
    if node is not None:
        wanted |= {f"node:{k}": v for k, v in node.ports.items()}
    for port_name, port in wanted.items():
        host = s.address if port_name == "apiserver" else "127.0.0.1"
        # The node's kubelet and CoreDNS listen on the bridge address: check it too.
        hosts = (host, s.address) if port_name.startswith("node:") else (host,)
        if not all(processes.port_is_free(port, h) for h in hosts):
            owner = state.PORT_OWNERS.get(port_name, port_name.removeprefix("node:"))
            raise UserError(
                f"port {port} on {host}, recorded for {owner} of cluster {s.name!r}, is in use by another "
                f"process (see `ss -ltnp 'sport = :{port}'`); stop that process, or run "
                f"`tandem cluster down --name {s.name}` to drop this cluster's state and pick new ports"
            )


def _write_config(s: ClusterState) -> None:
    """Certificates (once), kubeconfigs, scheduler config and kwok stages for this cluster."""
    for folder in (s.log_dir, s.run_dir, s.config_dir, s.etcd_dir):
        folder.mkdir(parents=True, exist_ok=True)
    s.etcd_dir.chmod(0o700)  # etcd refuses a data dir others can read
    extra_ips = [s.address] if s.address != state.LOOPBACK else []
    p = pki.ensure_pki(s.pki.directory, apiserver_ips=extra_ips)
    context = f"tandem-{s.name}"
    kubeconfig.write(s.kubeconfig, context=context, server=s.server, pki=p, stem="admin", user=pki.ADMIN.user)
    for component, identity in (
        ("kube-controller-manager", pki.CONTROLLER_MANAGER),
        ("kube-scheduler", pki.SCHEDULER),
        ("kwok", pki.KWOK),
    ):
        kubeconfig.write(
            s.component_kubeconfig(component),
            context=context,
            server=s.server,
            pki=p,
            stem=identity.stem,
            user=identity.user,
        )
    (s.config_dir / "scheduler.yaml").write_text(
        yaml.safe_dump(components.scheduler_config(s), sort_keys=False)
    )
    for stage_file in components.KWOK_STAGE_FILES:
        shutil.copyfile(paths.KWOK_CONFIG_DIR / stage_file, s.config_dir / stage_file)


def _start(component: str, bin_dir: Path, s: ClusterState) -> ProcessRecord:
    # kwok also reads ~/.kwok/kwok.yaml when it exists: give it a HOME of its own to stay hermetic.
    env = None
    if component == "kwok":
        env = {**os.environ, "HOME": str(s.config_dir)}
    record = processes.spawn(component, components.command(component, bin_dir, s), s.log(component), env=env)
    record.save(s.pid_file(component))
    return record


def _release_node_leases(api: KubeAPI, specs: list[nodes.NodeSpec]) -> None:
    """Drop node leases a previous kwok held: a new kwok (new holder id) would wait ~40 s for them."""
    for spec in specs:
        api.delete(f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{spec.name}")


def _register_nodes(api: KubeAPI, specs: list[nodes.NodeSpec]) -> None:
    for spec in specs:
        api.create("/api/v1/nodes", nodes.node_manifest(spec))


def _wait_usable(
    s: ClusterState, waiter: readiness.Waiter, specs: list[nodes.NodeSpec], kwok_probe: bool = True
) -> None:
    """After /readyz: register the nodes and wait until workloads can run on them."""
    api = _api(s)
    _register_nodes(api, specs)
    waiter.until(
        f"{len(specs)} simulated nodes Ready", readiness.nodes_ready(api, [n.name for n in specs]), "kwok"
    )
    waiter.until(
        "ServiceAccount default/default",
        readiness.service_account_exists(api, "default"),
        "kube-controller-manager",
    )
    waiter.until(
        "ServiceAccount kube-system/default",
        readiness.service_account_exists(api, readiness.PROBE_NAMESPACE),
        "kube-controller-manager",
    )
    if not kwok_probe:
        return
    waiter.until("probe pod scheduled and Running", readiness.probe_pod_running(api), "kube-scheduler")
    api.delete(
        f"/api/v1/namespaces/{readiness.PROBE_NAMESPACE}/pods/{readiness.PROBE_POD}", grace_period_seconds=0
    )


def _node_preflight(
    name: str, s: ClusterState | None, node: RealNode | None, real_node: bool, report: Progress
) -> Path | None:
    """For a cluster that has (or is to get) a real node: check the machine, build the node's binaries
    and return their folder; None for a cluster without one."""
    if real_node and s is not None and node is None:
        raise UserError(
            f"cluster {name!r} was created without a real node; run `tandem cluster down --name {name}` "
            "first to recreate it with --real-node"
        )
    if node is None and not (real_node and s is None):
        return None
    realnode.check_host(paths.cluster_dir(name))
    other = realnode.running_elsewhere(name)
    if other is not None:
        raise UserError(
            f"cluster {other!r} has a real node on this machine already, and a machine holds one "
            f"(kube-proxy's iptables chains are global); take it down: `tandem cluster down --name {other}`"
        )
    return build.ensure_binaries(report, build.NODE)


def _all_running(s: ClusterState | None, node: RealNode | None, records: list[ProcessRecord]) -> bool:
    expected = len(state.COMPONENTS) + (len(realnode.COMPONENTS) if node is not None else 0)
    return s is not None and len(records) == expected and all(map(processes.is_running, records))


def up(
    name: str = DEFAULT_NAME,
    *,
    progress: Progress | None = None,
    timeout: float = UP_TIMEOUT_SECONDS,
    gpu_nodes: int = 2,
    cpu_nodes: int = 1,
    real_node: bool = False,
    real_node_gpus: int = nodeconfig.DEFAULT_GPUS,
    gang_scheduler: bool = False,
) -> ClusterInfo:
    """Start cluster `name` (or confirm it runs) and return how to reach it once it is usable.

    Builds the pinned binaries first if they are not cached. Raises UserError, naming the log to
    read, if a component exits or readiness is not reached within `timeout` seconds.

    `real_node` adds a real node (see realnode.py) when the cluster is created; a cluster keeps what it
    was created with, so a later `up` without it restarts an existing real node too.
    `gang_scheduler` adds the coscheduling scheduler (gangscheduler.py), also to a running cluster; it
    too is kept (restarted by a later `up`) until `down`.
    """
    report = progress or _quiet
    paths.validate_name(name)
    bin_dir = build.ensure_binaries(report)
    specs = nodes.default_nodes(gpu_nodes, cpu_nodes)
    with _cluster_lock(name):
        directory = paths.cluster_dir(name)
        s = state.load(name)
        node = realnode.load(directory) if s is not None else None
        node_bin_dir = _node_preflight(name, s, node, real_node, report)
        # The readiness probe pod lands on a simulated CPU node; with a real node and no simulated CPU
        # node, the real node's own probe pod is the test.
        kwok_probe = node_bin_dir is None or cpu_nodes > 0
        records = _records(directory)
        node_records = realnode.records(directory) if node is not None else []
        if s is not None and _all_running(s, node, records + node_records):
            report(f"cluster {name!r} is already running; checking readiness")
            waiter = readiness.Waiter(s, timeout, report)
            for record in records + node_records:
                waiter.watch(record)
            waiter.until("kube-apiserver /readyz", readiness.api_ready(_api(s)), "kube-apiserver")
            _wait_usable(s, waiter, specs, kwok_probe)
            if node is not None:
                realnode.wait_ready(node, waiter, _api(s))
            _ensure_gang_scheduler(s, waiter, gang_scheduler, report)
            return _info(s, bin_dir, node)
        # Anything half-running is stopped and started again on the same state (pods on a real node
        # keep running: the restarted containerd and kubelet adopt them).
        realnode.stop_processes(directory)
        gang = _gang_record(directory)
        processes.stop([gang] if gang is not None else [])
        _stop_control_plane(records)
        if s is None:
            s = _new_state(name)
            if node_bin_dir is not None:
                # The API server listens on the node bridge's gateway: pods reach it there.
                node = realnode.create(s, real_node_gpus)
                s.address = node.gateway
                s.save()
        if node is not None:
            realnode.prepare_host(node, report)
        _check_ports(s, node)
        _write_config(s)
        if node is not None:
            realnode.write_config(s, node)
        report(f"starting cluster {name!r} (state in {s.directory})")
        waiter = readiness.Waiter(s, timeout, report)
        waiter.watch(_start("etcd", bin_dir, s))
        waiter.until("etcd healthy", readiness.etcd_healthy(s), "etcd")
        waiter.watch(_start("kube-apiserver", bin_dir, s))
        waiter.until("kube-apiserver /readyz", readiness.api_ready(_api(s)), "kube-apiserver")
        _release_node_leases(_api(s), specs)
        for component in ("kube-controller-manager", "kube-scheduler", "kwok"):
            waiter.watch(_start(component, bin_dir, s))
        _wait_usable(s, waiter, specs, kwok_probe)
        if node is not None and node_bin_dir is not None:
            realnode.start(s, node, node_bin_dir, waiter, _api(s), report)
        _ensure_gang_scheduler(s, waiter, gang_scheduler, report)
        return _info(s, bin_dir, node)


def _stop_control_plane(records: list[ProcessRecord]) -> list[ProcessRecord]:
    """Stop the control plane, etcd last: an API server with an endpoint lease removes it on the way out,
    and would wait out its grace period for an etcd that is already gone."""
    survivors = processes.stop([r for r in records if r.name != "etcd"])
    return survivors + processes.stop([r for r in records if r.name == "etcd"])


def down(name: str = DEFAULT_NAME, *, progress: Progress | None = None) -> bool:
    """Stop every process of cluster `name` and delete its state (not the binary cache).

    Returns False when there was nothing to take down. Idempotent.
    """
    report = progress or _quiet
    directory = paths.cluster_dir(name)
    with _cluster_lock(name):
        if not directory.exists():
            return False
        records = _records(directory)
        gang = [r for r in (_gang_record(directory),) if r is not None]
        node = realnode.load(directory)
        live = [r for r in realnode.records(directory) + gang + records if processes.is_running(r)]
        if live:
            report(f"stopping {', '.join(r.name for r in live)}")
        # The real node's processes and the gang scheduler first, then the control plane, then the
        # host's changes: the API server listens on the node's bridge, which must outlive it (else it
        # hangs in shutdown).
        left = realnode.stop(node) if node is not None else []
        survivors = processes.stop(gang) + _stop_control_plane(records)
        if survivors:
            pids = ", ".join(f"{r.name} (pid {r.pid})" for r in survivors)
            raise UserError(f"could not stop {pids} even with SIGKILL; state kept in {directory}")
        if node is not None:
            left += realnode.clean_host(node)
        if left:
            raise UserError(
                f"the real node of cluster {name!r} could not be fully cleaned up ({'; '.join(left)}); "
                f"state kept in {directory}: fix the cause and run `tandem cluster down --name {name}` again"
            )
        shutil.rmtree(directory)
        return True


def status(name: str = DEFAULT_NAME) -> ClusterStatus:
    """Which components of cluster `name` run, and whether its API server answers /readyz."""
    directory = paths.cluster_dir(name)
    s = state.load(name)
    node = realnode.load(directory)
    gang = _gang_record(directory)
    records = {
        r.name: r for r in _records(directory) + realnode.records(directory) + ([gang] if gang else [])
    }
    found = []
    optional = (realnode.COMPONENTS if node is not None else ()) + ((GANG_SCHEDULER,) if gang else ())
    for component in state.COMPONENTS + optional:
        record = records.get(component)
        running = record is not None and processes.is_running(record)
        log = directory / "logs" / f"{component}.log"
        found.append(ComponentStatus(component, running, record.pid if record else None, log))
    api_ready = False
    info = None
    if s is not None and found[1].running:
        with contextlib.suppress(OSError, ApiError):
            api_ready = readiness.api_ready(_api(s, timeout=2.0))() is None
        bin_dir = Path(records["kube-apiserver"].argv[0]).parent
        info = _info(s, bin_dir, node)
    return ClusterStatus(
        name=name,
        state_dir=directory,
        exists=s is not None,
        components=tuple(found),
        api_ready=api_ready,
        info=info,
    )
