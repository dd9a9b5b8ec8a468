"""The lifecycle suite: one dev cluster whose only node is real (kubelet, containerd, runc), with the
images built from images/*.Dockerfile, the operator as a pod and a real Prometheus; taken down after.

It runs apart from tests/e2e (whose kwok-only cluster checks where simulated pods land), as its own
`make test` step, with a cluster name of its own.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from processlist import processes

from tandem import lifecycle
from tandem.devcluster import cluster as devcluster
from tandem.devcluster import hostchanges, nodeconfig

CLUSTER = os.environ.get("TANDEM_LIFECYCLE_CLUSTER", "tandem-life")


@pytest.fixture(scope="session")
def say(pytestconfig: pytest.Config) -> lifecycle.Say:
    """Progress straight to the terminal, past pytest's capture of file descriptors 1 and 2: image builds
    and training take minutes and must not look like a hang."""
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")

    def _say(message: str) -> None:
        with capture.global_and_fixture_disabled():
            print(f"[lifecycle] {message}", file=sys.stderr, flush=True)

    return _say


def keep_evidence(stack: lifecycle.Stack, say: lifecycle.Say) -> None:
    """After a failure, before the cluster goes: the resources, events and every pod's logs (previous
    containers too) in a folder of their own, so a failure seen once can be understood afterwards."""
    folder = Path(tempfile.mkdtemp(prefix=f"tandem-lifecycle-{time.strftime('%Y%m%d-%H%M%S')}-"))
    kubectl = stack.kubectl

    def keep(name: str, *args: str) -> None:
        try:
            (folder / name).write_text(kubectl.run(*args, check=False))
        except Exception as error:  # evidence is best-effort: the failure itself is what matters
            (folder / name).write_text(f"could not run kubectl {' '.join(args)}: {error}\n")

    keep("resources.yaml", "get", "trainingjobs,inferenceservices,pods,services,leases", "-A", "-o", "yaml")
    keep("events.txt", "get", "events", "-A", "--sort-by=.lastTimestamp")
    pods = json.loads(kubectl.run("get", "pods", "-A", "-o", "json", check=False) or '{"items": []}')
    for pod in pods["items"]:
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        keep(f"{ns}.{name}.log", "logs", "-n", ns, name, "--all-containers", "--timestamps")
        keep(f"{ns}.{name}.previous.log", "logs", "-n", ns, name, "--all-containers", "--previous")
    say(f"a step failed: resources, events and pod logs kept in {folder}")


@pytest.fixture(scope="session")
def stack(request: pytest.FixtureRequest, say: lifecycle.Say) -> Iterator[lifecycle.Stack]:
    """The real-node cluster with everything the story needs, before anything is applied."""
    firewall = {family: hostchanges.iptables_save(family) for family in hostchanges.IPTABLES_FAMILIES}
    info = devcluster.up(CLUSTER, progress=say, real_node=True, gpu_nodes=0, cpu_nodes=0)
    bridge = Path("/sys/class/net") / nodeconfig.bridge_name(CLUSTER)
    try:
        prepared = lifecycle.prepare(info, say)
        yield prepared
        if request.session.testsfailed:
            keep_evidence(prepared, say)
    finally:
        lifecycle.stop_everything(info)
        devcluster.down(CLUSTER, progress=say)
    # Nothing of the story is left: no process started from the cluster's folder, no mount, no bridge, no
    # iptables rule or chain that was not there before (kube-proxy's, CNI's, the node's), and the folder
    # itself (state, volumes, checkpoints) is gone.
    left = [f"process {pid}: {cmd[:120]}" for pid, cmd in processes().items() if str(info.state_dir) in cmd]
    left += [f"mount {m}" for m in hostchanges.mounts_under([info.state_dir])]
    left += [f"interface {bridge.name}"] if bridge.exists() else []
    left += [f"folder {info.state_dir}"] if info.state_dir.exists() else []
    for family, before in firewall.items():
        binary = hostchanges.IPTABLES_FAMILIES[family][0]
        now = hostchanges.iptables_save(family)
        undo = hostchanges.iptables_undo_commands(before, now, binary)
        left += [f"{family} rule: {' '.join(command[3:])}" for command in undo]
    assert left == [], left
