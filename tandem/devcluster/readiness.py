"""Readiness conditions `cluster up` polls, and the poller that fails fast when a component dies.

Each check returns None when satisfied, else a short note of what it still waits for; the note ends
up in the timeout message together with the log file most likely to explain it.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable

from tandem.devcluster import processes
from tandem.devcluster.kubeapi import ApiError, KubeAPI
from tandem.devcluster.nodes import SIMULATED_LABEL
from tandem.devcluster.processes import ProcessRecord
from tandem.devcluster.state import ClusterState
from tandem.errors import UserError

Progress = Callable[[str], None]
Check = Callable[[], str | None]
POLL_SECONDS = 0.25
PROBE_POD = "devcluster-probe"
PROBE_NAMESPACE = "kube-system"
# Loopback never goes through an HTTP(S)_PROXY from the environment.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Waiter:
    """Polls conditions against one deadline, failing fast when a started component exits."""

    def __init__(self, s: ClusterState, timeout: float, progress: Progress) -> None:
        self.s = s
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.started = time.monotonic()
        self.progress = progress
        self.watched: list[ProcessRecord] = []

    def watch(self, record: ProcessRecord) -> None:
        self.watched.append(record)

    def _check_alive(self) -> None:
        for record in self.watched:
            if not processes.is_running(record):
                raise UserError(
                    f"{record.name} of cluster {self.s.name!r} exited during startup; "
                    f"last lines of {record.log}:\n"
                    f"{processes.log_tail(record.log)}\n"
                    f"fix the cause, or run `tandem cluster down --name {self.s.name}` and try again"
                )

    def until(self, what: str, check: Check, log_hint: str) -> None:
        pending: str | None = "not checked yet"
        while True:
            self._check_alive()
            try:
                pending = check()
            except (OSError, ApiError, ValueError) as exc:
                pending = f"{type(exc).__name__}: {exc}"
            if pending is None:
                self.progress(f"  {what}: ok ({time.monotonic() - self.started:.1f}s)")
                return
            if time.monotonic() > self.deadline:
                raise UserError(
                    f"cluster {self.s.name!r} was not ready after {self.timeout:.0f}s: waiting for {what} "
                    f"({pending}); see {self.s.log(log_hint)} (all logs in {self.s.log_dir}); "
                    f"`tandem cluster down --name {self.s.name}` stops what is running"
                )
            time.sleep(POLL_SECONDS)


def etcd_healthy(s: ClusterState) -> Check:
    def check() -> str | None:
        url = f"http://127.0.0.1:{s.ports['etcd']}/health"
        with _NO_PROXY.open(url, timeout=2) as response:
            body = response.read().decode()
        return None if '"health":"true"' in body.replace(" ", "") else body

    return check


def api_ready(api: KubeAPI) -> Check:
    def check() -> str | None:
        response = api.request("GET", "/readyz")
        return None if response.status == 200 else f"/readyz: HTTP {response.status}"

    return check


def nodes_ready(api: KubeAPI, names: list[str]) -> Check:
    """Every node Ready, and free of the not-ready taint the node controller adds at registration."""

    def check() -> str | None:
        waiting = []
        for name in names:
            node = api.get(f"/api/v1/nodes/{name}")
            if node is None:
                waiting.append(f"{name} missing")
                continue
            ready = any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in node.get("status", {}).get("conditions", [])
            )
            tainted = any(
                t.get("key", "").startswith("node.kubernetes.io/") for t in node["spec"].get("taints", [])
            )
            if not ready or tainted:
                waiting.append(f"{name} {'not Ready' if not ready else 'still tainted not-ready'}")
        return ", ".join(waiting) or None

    return check


def service_account_exists(api: KubeAPI, namespace: str) -> Check:
    def check() -> str | None:
        found = api.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/default")
        return None if found else f"no ServiceAccount {namespace}/default yet"

    return check


def probe_pod_manifest() -> dict[str, object]:
    """A pod that only proves scheduling and kwok work; it tolerates nothing and selects simulated
    nodes, so it lands on a simulated CPU node (never on a real node, which would have to run it)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": PROBE_POD, "namespace": PROBE_NAMESPACE, "labels": {"app": PROBE_POD}},
        "spec": {
            "nodeSelector": {SIMULATED_LABEL: "true"},
            "containers": [{"name": "probe", "image": "registry.k8s.io/pause:3.10"}],
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 0,
        },
    }


def probe_pod_running(api: KubeAPI) -> Check:
    path = f"/api/v1/namespaces/{PROBE_NAMESPACE}/pods"

    def check() -> str | None:
        pod = api.get(f"{path}/{PROBE_POD}")
        if pod is None:
            api.create(path, probe_pod_manifest())
            return "probe pod created"
        if not pod["spec"].get("nodeName"):
            return "probe pod not scheduled"
        phase = pod.get("status", {}).get("phase")
        return None if phase == "Running" else f"probe pod {phase}"

    return check
