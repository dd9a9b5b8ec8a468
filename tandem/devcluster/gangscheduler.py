"""Gang admission in the dev cluster: the coscheduling plugin of sigs.k8s.io/scheduler-plugins.

Its scheduler is built from the pinned Go module (gomod/scheduler, Apache-2.0; the release line that
matches the pinned Kubernetes) like the other binaries, cached under its own key, and runs beside
kube-scheduler as a second scheduler whose one profile, SCHEDULER_NAME, enables Coscheduling: pods
that name it wait at Permit until their whole PodGroup (minMember pods) can be placed, so two gangs
contending for the same GPUs never each hold a part of them. The PodGroup CRD comes from the same
module (its manifests/coscheduling/crd.yaml), so CRD and scheduler never disagree.

`tandem cluster up --gang-scheduler` runs it as a component of the dev cluster (cluster.py, stopped
by `down`); `GangScheduler` runs it for a test, against any cluster whose kubeconfig it is given.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from tandem.devcluster import build, paths
from tandem.errors import UserError

#: The profile's name; the operator's gangSchedulerName defaults to it (the scheduler-plugins chart's
#: name for its second scheduler), so the dev cluster and a real install agree.
SCHEDULER_NAME = "scheduler-plugins-scheduler"
MODULE = "sigs.k8s.io/scheduler-plugins"
#: How long a gang's first pods wait at Permit for the rest before the group is rejected and retried.
PERMIT_WAITING_SECONDS = 10
READY_SECONDS = 120.0
#: Longest a gang rejected for lack of room waits before it is tried again (see `command`).
UNSCHEDULABLE_RETRY_SECONDS = 10

GANG_SCHEDULER = build.Bundle(
    "gang scheduler",
    (build.Binary("gang-scheduler", "scheduler", f"{MODULE}/cmd/scheduler"),),
    ("scheduler",),
    "kubernetes",
)


def ensure_scheduler(progress: build.Progress | None = None) -> Path:
    """Path of the pinned scheduler binary, compiling it first when its pin changed (cold: minutes)."""
    return build.ensure_binaries(progress, GANG_SCHEDULER) / "gang-scheduler"


def podgroup_crd() -> Path:
    """The PodGroup CRD of the pinned scheduler-plugins release, from the Go module cache."""
    module_dir = paths.GOMOD_DIR / "scheduler"
    listed = subprocess.run(
        ["go", "list", "-mod=readonly", "-m", "-f", "{{.Dir}}", MODULE],
        cwd=module_dir,
        capture_output=True,
        text=True,
        check=False,
    )
    crd = Path(listed.stdout.strip()) / "manifests" / "coscheduling" / "crd.yaml"
    if listed.returncode != 0 or not crd.is_file():
        raise UserError(
            f"cannot find {MODULE}'s PodGroup CRD in the Go module cache ({listed.stderr.strip() or crd}); "
            f"run `go mod download` in {module_dir}"
        )
    return crd


def scheduler_config(kubeconfig: Path) -> dict[str, Any]:
    """KubeSchedulerConfiguration: one profile, Coscheduling at every extension point it implements
    (multiPoint) and as the queue's sort (a gang's pods are tried one after another)."""
    return {
        "apiVersion": "kubescheduler.config.k8s.io/v1",
        "kind": "KubeSchedulerConfiguration",
        "leaderElection": {"leaderElect": False},
        "clientConnection": {"kubeconfig": str(kubeconfig), "qps": 200, "burst": 400},
        "profiles": [
            {
                "schedulerName": SCHEDULER_NAME,
                "plugins": {
                    "multiPoint": {"enabled": [{"name": "Coscheduling"}]},
                    "queueSort": {"enabled": [{"name": "Coscheduling"}], "disabled": [{"name": "*"}]},
                },
                "pluginConfig": [
                    {"name": "Coscheduling", "args": {"permitWaitingTimeSeconds": PERMIT_WAITING_SECONDS}}
                ],
            }
        ],
    }


def command(binary: Path, config: Path, kubeconfig: Path, port: int, cert_dir: Path) -> list[str]:
    return [
        str(binary),
        f"--config={config}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        f"--cert-dir={cert_dir}",
        # Coscheduling rejects a gang that does not fit at PreFilter and registers no event for a pod
        # deletion, so the gang waiting for another one's GPUs is retried only when this expires (5 min
        # by default): with 10 s it starts within seconds of the GPUs coming free. Deprecated, still
        # honoured by the pinned 1.33 (it has no ComponentConfig field).
        f"--pod-max-in-unschedulable-pods-duration={UNSCHEDULABLE_RETRY_SECONDS}s",
        "--v=2",
    ]


def write_config(workdir: Path, kubeconfig: Path) -> Path:
    """The scheduler's configuration file in `workdir` (its one Coscheduling profile)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "gang-scheduler.yaml"
    config.write_text(yaml.safe_dump(scheduler_config(kubeconfig), sort_keys=False))
    return config


def healthz(port: int) -> str | None:
    """None once the scheduler on `port` answers /healthz with 200, else what it answered."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # its own self-signed serving certificate, on loopback
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=context, timeout=2) as answer:
        return None if answer.status == 200 else f"/healthz: HTTP {answer.status}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class GangScheduler:
    """The coscheduling scheduler as a child process (its own session), stopped on exit."""

    def __init__(self, binary: Path, kubeconfig: Path, workdir: Path) -> None:
        self.binary, self.kubeconfig, self.workdir = binary, kubeconfig, workdir
        self.log_path = workdir / "gang-scheduler.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    def __enter__(self) -> GangScheduler:
        config = write_config(self.workdir, self.kubeconfig)
        self.port = free_port()
        argv = command(self.binary, config, self.kubeconfig, self.port, self.workdir / "certs")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise UserError(f"the gang scheduler exited ({self.process.returncode}); see {self.log_path}")
            try:
                if healthz(self.port) is None:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise UserError(
            f"the gang scheduler was not healthy within {READY_SECONDS:.0f}s; see {self.log_path}"
        )

    def stop(self) -> None:
        """SIGTERM its session, SIGKILL after 10 s."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tandem.devcluster.gangscheduler",
        description="Build the pinned scheduler-plugins scheduler (cached; cold: minutes) and print its path"
        " and the PodGroup CRD of the same release.",
    )
    parser.add_argument("command", choices=["build"], help="build it (once per pin)")
    parser.parse_args(argv)
    try:
        print(ensure_scheduler(lambda message: print(message, file=sys.stderr, flush=True)))
        print(podgroup_crd())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
