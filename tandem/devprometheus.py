"""A real Prometheus (Debian's `prometheus` package) for the dev cluster: `make demo` and the lifecycle test.

A discovery loop (`discover`, a process of its own) lists the cluster's pods through the API server
and writes Prometheus' file-based discovery: pods annotated `prometheus.io/scrape: "true"` (model
servers, the operator) and the training pods' `metrics` port, labelled with the `namespace` and `pod`
that Tandem's autoscaler queries and dashboards select on. Prometheus listens on the real node's
bridge address, so the operator reaches it from its pod and a person from the host.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tandem.devcluster import processes
from tandem.errors import UserError

SCRAPE_INTERVAL = "2s"
READY_SECONDS = 60.0


#: The chart's recording and alerting rules: the dashboards and `tandem cost` read their series.
RULES_FILE = Path(__file__).resolve().parents[1] / "charts" / "tandem" / "files" / "prometheus-rules.yaml"


def config(targets_file: Path) -> dict[str, Any]:
    """The scrape configuration: the pods the discovery loop lists in `targets_file`, their own labels
    kept (`honor_labels`: the operator's series carry the namespace and name of what they describe),
    and the chart's rules."""
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": [str(RULES_FILE)],
        "scrape_configs": [
            {
                "job_name": "tandem-pods",
                "honor_labels": True,
                "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "2s"}],
            }
        ],
    }


def targets(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """File-based discovery entries for running pods annotated `prometheus.io/scrape: "true"` (their
    `prometheus.io/port`) and for training pods (their `metrics` port), labelled namespace and pod, and
    service for an InferenceService's replicas."""
    found = []
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        ip = status.get("podIP")
        if not ip or status.get("phase") != "Running":
            continue
        annotations = meta.get("annotations") or {}
        port: str | None = None
        if annotations.get("prometheus.io/scrape") == "true":
            port = annotations.get("prometheus.io/port")
        elif (meta.get("labels") or {}).get("app.kubernetes.io/name") == "tandem-training":
            ports = [p for c in pod["spec"]["containers"] for p in c.get("ports") or ()]
            port = next((str(p["containerPort"]) for p in ports if p.get("name") == "metrics"), None)
        if port:
            labels = {"namespace": meta.get("namespace", ""), "pod": meta.get("name", "")}
            service = (meta.get("labels") or {}).get("tandem.dev/inferenceservice")
            if service:
                labels["service"] = service  # the replicas' series join their InferenceService by it
            found.append({"targets": [f"{ip}:{port}"], "labels": labels})
    return sorted(found, key=lambda t: (t["labels"]["namespace"], t["labels"]["pod"]))


def discover(kubeconfig: Path, targets_file: Path, every: float = 2.0) -> None:
    """Rewrite `targets_file` from the cluster's pods every `every` seconds, until stopped.

    Why not Prometheus' own Kubernetes discovery: Debian's `prometheus` is built without it."""
    from kubernetes import client
    from kubernetes import config as kube_config

    api = client.CoreV1Api(kube_config.new_client_from_config(config_file=str(kubeconfig)))  # type: ignore[no-untyped-call]
    while True:
        try:
            reply: Any = api.list_pod_for_all_namespaces(_request_timeout=10, _preload_content=False)
            pods = json.loads(reply.data)["items"]
        except Exception:  # the API server restarting, say: keep the last targets and try again
            pods = None
        if pods is not None:
            text = json.dumps(targets(pods), indent=1)
            tmp = targets_file.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(targets_file)
        time.sleep(every)


def _record_path(state_dir: Path, name: str = "prometheus") -> Path:
    return state_dir / "run" / f"{name}.json"


def start(state_dir: Path, kubeconfig: Path, host: str, port: int) -> str:
    """Start (or find running) the cluster's Prometheus; returns its URL once it is ready."""
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(binary).exists():
        raise UserError("prometheus is not installed: run `make setup` (Debian's prometheus package)")
    url = f"http://{host}:{port}"
    folder = state_dir / "prometheus"
    folder.mkdir(parents=True, exist_ok=True)
    targets_file = folder / "targets.json"
    discovery = processes.ProcessRecord.load(_record_path(state_dir, "discovery"))
    if discovery is None or not processes.is_running(discovery):
        if not targets_file.exists():
            targets_file.write_text("[]")
        argv = [sys.executable, "-m", "tandem.devprometheus", str(kubeconfig), str(targets_file)]
        discovery = processes.spawn(
            "prometheus-discovery", argv, state_dir / "logs" / "prometheus-discovery.log"
        )
        discovery.save(_record_path(state_dir, "discovery"))
    existing = processes.ProcessRecord.load(_record_path(state_dir))
    if existing is None or not processes.is_running(existing):
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config(targets_file), sort_keys=False))
        argv = [
            binary,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address={host}:{port}",
            "--web.enable-lifecycle",
        ]
        record = processes.spawn("prometheus", argv, state_dir / "logs" / "prometheus.log")
        record.save(_record_path(state_dir))
        existing = record
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if not processes.is_running(existing):
            raise UserError(f"prometheus exited; see {existing.log}:\n{processes.log_tail(existing.log)}")
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as reply:
                if reply.status == 200:
                    return url
        except OSError:
            pass
        time.sleep(0.5)  # Prometheus opens its port after loading its data: nothing to wait on
    raise UserError(f"prometheus did not become ready in {READY_SECONDS:.0f}s; see {existing.log}")


def stop(state_dir: Path) -> bool:
    """Stop the cluster's Prometheus and its discovery loop; True when Prometheus was running."""
    records = [processes.ProcessRecord.load(_record_path(state_dir, n)) for n in ("prometheus", "discovery")]
    live = [r for r in records if r is not None and processes.is_running(r)]
    processes.stop(live)
    return any(r.name == "prometheus" for r in live)


if __name__ == "__main__":
    discover(Path(sys.argv[1]), Path(sys.argv[2]))
