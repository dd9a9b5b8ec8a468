"""`make demo`: a local control plane, the operator, the example resources, and `kubectl get`.

The operator runs detached under the ServiceAccount the chart's RBAC rules describe, with its log in
the cluster's state folder; `make demo-down` (`python -m tandem.demo --down`) stops it and the cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tandem.devcluster import cluster as devcluster
from tandem.devcluster import processes
from tandem.devinstall import (
    REPO_ROOT,
    Kubectl,
    install_crds,
    install_example_volumes,
    operator_kubeconfig,
)
from tandem.errors import UserError

DEMO_CLUSTER = "tandem"
EXAMPLES = REPO_ROOT / "manifests" / "examples"
STATUS_TIMEOUT_SECONDS = 60


def _say(message: str) -> None:
    print(f"==> {message}", flush=True)


def _operator_record(state_dir: Path) -> Path:
    return state_dir / "run" / "demo-operator.json"


def _start_operator(info: devcluster.ClusterInfo, kubectl: Kubectl) -> Path:
    record_path = _operator_record(info.state_dir)
    log = info.state_dir / "logs" / "operator.log"
    existing = processes.ProcessRecord.load(record_path)
    if existing is not None and processes.is_running(existing):
        _say(f"operator already running (pid {existing.pid}), log {log}")
        return log
    kubeconfig = operator_kubeconfig(kubectl, info.state_dir / "operator.kubeconfig")
    metrics_port, health_port = processes.pick_free_ports(2)
    env = dict(os.environ)
    env.update(
        {
            "KUBECONFIG": str(kubeconfig),
            "TANDEM_METRICS_PORT": str(metrics_port),
            "TANDEM_HEALTH_PORT": str(health_port),
            "PYTHONUNBUFFERED": "1",
        }
    )
    record = processes.spawn("demo-operator", [sys.executable, "-m", "tandem.operator"], log, env=env)
    record.save(record_path)
    deadline = time.monotonic() + STATUS_TIMEOUT_SECONDS
    while True:
        if not processes.is_running(record):
            raise UserError(f"the operator exited; see {log}:\n{processes.log_tail(log)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=2) as reply:
                if reply.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise UserError(f"the operator did not become healthy in {STATUS_TIMEOUT_SECONDS}s; see {log}")
        time.sleep(0.5)
    _say(f"operator running (pid {record.pid}), metrics on :{metrics_port}/metrics, log {log}")
    return log


SETTLED = {"TrainingJob": "Running", "InferenceService": "Ready"}


def _settled(item: dict[str, Any]) -> bool:
    """A gang Running, a service Ready, or a service waiting for its TrainingJob's first checkpoint:
    kwok's pods run no training, so in the demo that checkpoint never comes."""
    status = item.get("status") or {}
    if status.get("phase") == SETTLED[item["kind"]]:
        return True
    waiting = {(c.get("type"), c.get("reason")) for c in status.get("conditions") or ()}
    return item["kind"] == "InferenceService" and ("ModelResolved", "NoCheckpoint") in waiting


def _wait_until_settled(kubectl: Kubectl) -> None:
    """Wait until every example's gang runs and every service is ready or waits for a checkpoint (the
    kwok nodes make that quick); after a minute, show whatever state they are in."""
    deadline = time.monotonic() + STATUS_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        items = json.loads(kubectl.run("get", "tj,tisvc", "-o", "json"))["items"]
        if items and all(_settled(item) for item in items):
            waiting = [
                i["metadata"]["name"]
                for i in items
                if i["kind"] == "InferenceService" and (i.get("status") or {}).get("phase") != "Ready"
            ]
            for name in waiting:
                _say(
                    f"InferenceService {name} waits for its TrainingJob's first checkpoint "
                    "(kwok's pods run no training: see docs/inferenceservice.md, lineage)"
                )
            return
        time.sleep(0.5)
    _say("not everything settled within a minute; `kubectl describe` says why")


def up() -> int:
    info = devcluster.up(DEMO_CLUSTER, progress=_say)
    kubectl = Kubectl(str(info.bin_dir / "kubectl"), info.kubeconfig)
    _say("installing the CRDs (manifests/crds)")
    install_crds(kubectl)
    _start_operator(info, kubectl)
    _say("creating the volumes the examples mount (data sets, checkpoints, models)")
    install_example_volumes(kubectl, "default")
    _say("applying manifests/examples/")
    print(kubectl.run("apply", "-f", str(EXAMPLES)), end="")
    _say("waiting for the gangs to run and the services to be ready")
    _wait_until_settled(kubectl)
    _say("kubectl get nodes,tj,tisvc")
    print(kubectl.run("get", "nodes", "-L", "nvidia.com/gpu.product"))
    print(kubectl.run("get", "tj,tisvc"))
    print(
        "Try it yourself:\n"
        f"  export KUBECONFIG={info.kubeconfig}\n"
        f"  export PATH={info.bin_dir}:$PATH   # the pinned kubectl\n"
        "  kubectl get tj,tisvc\n"
        "  kubectl describe tj gpt-tiny\n"
        "Stop everything with `make demo-down`."
    )
    return 0


def operators_of(state_dir: Path) -> list[processes.ProcessRecord]:
    """Every operator process bound to the cluster whose state is in `state_dir`: the one the demo
    started, and any a person started by hand (`tandem operator run`, `python -m tandem.operator`)
    with a KUBECONFIG from that folder, as docs/devcluster.md shows."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if not _is_operator(argv):
            continue
        kubeconfig = next((v[len(b"KUBECONFIG=") :] for v in environ if v.startswith(b"KUBECONFIG=")), b"")
        path = Path(kubeconfig.decode(errors="replace"))
        if kubeconfig and path.resolve().is_relative_to(state_dir.resolve()):
            found.append(processes.ProcessRecord("operator", int(entry.name), argv, ""))
    return found


def _is_operator(argv: list[str]) -> bool:
    """`python -m tandem.operator ...` or `tandem operator run ...` (any interpreter, any path)."""
    if "-m" in argv and "tandem.operator" in argv:
        return True
    words = [Path(a).name for a in argv[:4]]
    return "tandem" in words and words[words.index("tandem") + 1 : words.index("tandem") + 3] == [
        "operator",
        "run",
    ]


def _stop(found: list[processes.ProcessRecord], grace: float = 10.0) -> list[processes.ProcessRecord]:
    """SIGTERM each process (not its group: one started by hand may share its shell's), SIGKILL after
    `grace` seconds; returns those still alive."""
    for record in found:
        with contextlib.suppress(OSError):
            os.kill(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (alive := [r for r in found if processes.is_running(r)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for record in alive:
        with contextlib.suppress(OSError):
            os.kill(record.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while (alive := [r for r in alive if processes.is_running(r)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def down() -> int:
    state_dir = devcluster.status(DEMO_CLUSTER).state_dir
    operators = operators_of(state_dir)
    if operators:
        left = _stop(operators)
        pids = ", ".join(str(r.pid) for r in operators)
        _say(f"operator stopped (pid {pids})" if not left else f"could not stop operator pid {left[0].pid}")
    else:
        _say("no operator was running for the demo cluster")
    stopped = devcluster.down(DEMO_CLUSTER, progress=_say)
    _say("cluster stopped" if stopped else "no demo cluster was running")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tandem.demo", description=__doc__)
    parser.add_argument("--down", action="store_true", help="stop the demo operator and cluster")
    args = parser.parse_args(argv)
    try:
        return down() if args.down else up()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
