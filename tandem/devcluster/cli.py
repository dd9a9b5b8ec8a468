"""`tandem cluster build|up|down|status|kubeconfig`: the local control plane from the command line.

Modules that need `cryptography` (the `cluster` extra) are imported inside the handlers, so
`tandem --help` works in images without it.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from typing import Any

from tandem.devcluster import build, nodes
from tandem.errors import UserError

CLUSTER_HELP = """\
A real Kubernetes control plane on this machine, for the demo and the end-to-end tests:
etcd, kube-apiserver, kube-controller-manager and kube-scheduler built from the official Go
modules (pinned in tandem/devcluster/gomod/), plus kwok simulating the nodes -- GPU nodes advertising
nvidia.com/gpu, and pods that become Running (or crash on request) without containers.

With --real-node, `up` also starts a real node (containerd, runc, kubelet, kube-proxy, CoreDNS, and
simulated nvidia.com/gpu devices through kubelet's device-plugin API) where pods really run; it needs
root and Debian's containerd, runc, CNI plugins, iptables, nftables, umoci and busybox-static
(`make system-tools`), and changes this machine until `down` (docs/devcluster.md says how).

Everything listens on 127.0.0.1 (with a real node, the API server, kubelet and CoreDNS listen on the
node bridge's address instead). State (certificates, etcd data, logs) lives in
${XDG_CACHE_HOME:-~/.cache}/tandem/clusters/<name>/; binaries in .../tandem/devcluster/.
"""

UP_HELP = """\
Start the cluster (building the pinned binaries first if they are not cached), register
the simulated nodes, and wait until it is usable: API server ready, nodes Ready, the default
ServiceAccount created, a probe pod scheduled and Running. On a running cluster it only
re-checks readiness; on one whose processes died it restarts them with the same state.

--real-node (when the cluster is created) adds `real-node-0`, a kubelet node with containerd where pods
really run, after the control plane; a cluster keeps it until `down`. One real node per machine.

--gang-scheduler (also on a running cluster) adds gang admission: the PodGroup CRD and the coscheduling
scheduler of sigs.k8s.io/scheduler-plugins (built from its pinned Go module on first use: minutes),
beside kube-scheduler, as the second scheduler `scheduler-plugins-scheduler`. Run the operator with
TANDEM_GANG_SCHEDULER=coscheduling to send each TrainingJob's gang there. Kept until `down`.

Prints the kubeconfig path; `eval "$(tandem cluster up)"` also sets KUBECONFIG.
"""


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _require_cluster_extra() -> None:
    if importlib.util.find_spec("cryptography") is None:
        raise UserError(
            "the local cluster needs the `cluster` extra (cryptography); "
            "install it with `pip install 'tandem[cluster]'` or `make setup`"
        )


def _add_name(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--name",
        default="tandem",
        help="cluster name; clusters with different names run side by side (default: %(default)s)",
    )


def _build(args: argparse.Namespace) -> int:
    start = time.monotonic()
    bin_dir = build.ensure_binaries(_progress)
    print(f"binaries ready in {bin_dir} ({time.monotonic() - start:.0f}s)")
    if args.real_node:
        node_bin_dir = build.ensure_binaries(_progress, build.NODE)
        print(f"real node binaries ready in {node_bin_dir} ({time.monotonic() - start:.0f}s)")
    return 0


def _up(args: argparse.Namespace) -> int:
    _require_cluster_extra()
    from tandem.devcluster import cluster

    start = time.monotonic()
    info = cluster.up(
        args.name,
        progress=_progress,
        timeout=args.timeout,
        gpu_nodes=args.gpu_nodes,
        cpu_nodes=args.cpu_nodes,
        real_node=args.real_node,
        real_node_gpus=args.real_node_gpus,
        gang_scheduler=args.gang_scheduler,
    )
    real = ""
    if info.real_node:
        real = (
            f"# real node: {info.real_node} (containerd, kubelet; label tandem.dev/real-node=true; "
            f"simulated {nodes.GPU_RESOURCE}); local images tandem.dev/busybox:1.35, tandem.dev/pause:3.10\n"
        )
    if info.gang_scheduler:
        real += (
            f"# gang scheduler: {info.gang_scheduler} (coscheduling; PodGroup CRD installed); run the "
            "operator with TANDEM_GANG_SCHEDULER=coscheduling\n"
        )
    # Comments on stdout keep `eval "$(tandem cluster up)"` working.
    print(
        f"# cluster {info.name!r} is ready ({time.monotonic() - start:.1f}s): {args.gpu_nodes} GPU nodes "
        f"({nodes.GPUS_PER_NODE}x {nodes.GPU_PRODUCT}, tainted {nodes.GPU_RESOURCE}=present:NoSchedule), "
        f"{args.cpu_nodes} CPU node(s)\n"
        f"{real}"
        f"# API server: {info.server}\n"
        f"# kubeconfig: {info.kubeconfig}\n"
        f"# kubectl:    {info.kubectl} (same version as the API server)\n"
        f"# logs:       {info.state_dir / 'logs'}\n"
        f"export KUBECONFIG={info.kubeconfig}"
    )
    return 0


def _down(args: argparse.Namespace) -> int:
    _require_cluster_extra()
    from tandem.devcluster import cluster

    if cluster.down(args.name, progress=_progress):
        print(f"cluster {args.name!r} stopped and its state removed (the binary cache is kept)")
    else:
        print(f"cluster {args.name!r} is not running; nothing to do")
    return 0


def _status(args: argparse.Namespace) -> int:
    _require_cluster_extra()
    from tandem.devcluster import cluster

    found = cluster.status(args.name)
    if not found.exists:
        print(f"cluster {args.name!r} does not exist; start it with `tandem cluster up --name {args.name}`")
        return 1
    print(
        f"cluster {args.name!r}: {'running' if found.running else 'NOT running'} (state in {found.state_dir})"
    )
    for component in found.components:
        state = f"running, pid {component.pid}" if component.running else "stopped"
        print(f"  {component.name:<24} {state:<20} log {component.log}")
    print(f"  API server /readyz: {'ok' if found.api_ready else 'not ready'}")
    if found.info is not None:
        print(f"  kubeconfig: {found.info.kubeconfig}")
    if not found.running:
        print(f"restart it with `tandem cluster up --name {args.name}` (same state), or reset with `down`")
    return 0 if found.running else 1


def _kubeconfig(args: argparse.Namespace) -> int:
    _require_cluster_extra()
    from tandem.devcluster import state

    found = state.load(args.name)
    if found is None or not found.kubeconfig.exists():
        raise UserError(
            f"cluster {args.name!r} has no kubeconfig; start it with `tandem cluster up --name {args.name}`"
        )
    print(found.kubeconfig)
    return 0


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add `tandem cluster ...` to the `tandem` command."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = subparsers.add_parser(
        "cluster",
        help="local control plane with simulated GPU nodes",
        description=CLUSTER_HELP,
        formatter_class=raw,
    )
    commands = parser.add_subparsers(dest="cluster_command", metavar="COMMAND")
    parser.set_defaults(handler=lambda _args: parser.print_help() or 2)

    build_cmd = commands.add_parser(
        "build",
        help="build (or find cached) the pinned etcd, Kubernetes and kwok binaries",
        description="Build the pinned binaries into the cache; a no-op when they are already built for the "
        "current pins. A cold build compiles Kubernetes from source and takes many minutes.",
    )
    build_cmd.add_argument(
        "--real-node", action="store_true", help="also build the real node's kubelet, kube-proxy and CoreDNS"
    )
    build_cmd.set_defaults(handler=_build)

    up = commands.add_parser(
        "up", help="start the cluster and wait until it is usable", description=UP_HELP, formatter_class=raw
    )
    _add_name(up)
    up.add_argument(
        "--gpu-nodes", type=int, default=2, help="simulated 8-GPU H100 nodes (default: %(default)s)"
    )
    up.add_argument(
        "--cpu-nodes", type=int, default=1, help="simulated CPU-only nodes (default: %(default)s)"
    )
    up.add_argument(
        "--real-node",
        action="store_true",
        help="also run a real kubelet node where pods really run (root; see docs/devcluster.md)",
    )
    up.add_argument(
        "--real-node-gpus",
        type=int,
        default=8,
        help="simulated nvidia.com/gpu devices the real node advertises (default: %(default)s)",
    )
    up.add_argument(
        "--gang-scheduler",
        action="store_true",
        help="also run scheduler-plugins' coscheduling scheduler for gang admission (PodGroups), beside "
        "kube-scheduler; kept until `down`",
    )
    up.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        help="seconds to wait for readiness, excluding any build (default: %(default)s)",
    )
    up.set_defaults(handler=_up)

    down = commands.add_parser(
        "down",
        help="stop the cluster and delete its state",
        description="Stop every process of the cluster (SIGTERM, then SIGKILL after a grace period), the "
        "gang scheduler included, and delete its state folder: certificates, etcd data, logs. A real "
        "node is stopped first and what it changed on this machine undone (iptables, bridge, mounts, "
        "cgroups, sysctls). The binary cache stays. Safe to repeat.",
    )
    _add_name(down)
    down.set_defaults(handler=_down)

    status = commands.add_parser(
        "status",
        help="show which components run (exit 1 unless all do)",
        description="Show each component's pid and log file and whether the API server is ready. "
        "Exits 0 when the cluster runs, 1 otherwise.",
    )
    _add_name(status)
    status.set_defaults(handler=_status)

    kubeconfig = commands.add_parser(
        "kubeconfig",
        help="print the admin kubeconfig path",
        description="Print the path of the cluster's admin kubeconfig, "
        "e.g. `export KUBECONFIG=$(tandem cluster kubeconfig)`.",
    )
    _add_name(kubeconfig)
    kubeconfig.set_defaults(handler=_kubeconfig)
