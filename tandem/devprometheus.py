"""A real Prometheus (Debian's `prometheus` package) for the dev cluster: `make demo` and the lifecycle test.

A discovery loop (`discover`, a process of its own) lists the cluster's pods through the API server
and writes Prometheus' file-based discovery: pods annotated `prometheus.io/scrape: "true"` (model
servers, the operator) and the training pods' `metrics` port, labelled with the `namespace` and `pod`
that Tandem's autoscaler queries and dashboards select on. It also lists the nodes run by a real
kubelet (not kwok's) and Prometheus scrapes their kubelet's `/metrics/cadvisor` and `/metrics/resource`
over TLS with the cluster admin's client certificate: the per-container CPU and memory usage that the
cost model charges above the requests (tandem.operator.cost_usage; the chart documents the same jobs).
Prometheus listens on the real node's bridge address, so the operator reaches it from its pod and a
person from the host.
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
from tandem.devcluster.pki import ADMIN, Pki
from tandem.errors import UserError

SCRAPE_INTERVAL = "2s"
READY_SECONDS = 60.0
#: kwok marks the nodes it simulates with this annotation; they have no kubelet to scrape.
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
#: The kubelet's endpoints with per-container usage, and the series the cost model reads of them (the
#: rest of cAdvisor's hundreds of series per container are dropped at scrape time).
KUBELET_PATHS = {"kubelet-cadvisor": "/metrics/cadvisor", "kubelet-resource": "/metrics/resource"}
KUBELET_SERIES = "container_cpu_usage_seconds_total|container_memory_working_set_bytes"


#: The chart's recording and alerting rules: the dashboards and `tandem cost` read their series.
RULES_FILE = Path(__file__).resolve().parents[1] / "charts" / "tandem" / "files" / "prometheus-rules.yaml"


def kubelet_jobs(targets_file: Path, tls: dict[str, str] | None) -> list[dict[str, Any]]:
    """Scrape jobs for the kubelets listed in `targets_file`: cAdvisor's and the resource endpoint's
    CPU and memory series, over HTTPS with `tls` (Prometheus' tls_config: ca_file, cert_file,
    key_file), plain HTTP without (a test's stand-in exporter). Both endpoints carry the same two
    series; the cost model takes one value per container of either."""
    return [
        {
            "job_name": job,
            "metrics_path": path,
            "scheme": "https" if tls else "http",
            **({"tls_config": dict(tls)} if tls else {}),
            "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "2s"}],
            "metric_relabel_configs": [
                {"source_labels": ["__name__"], "regex": KUBELET_SERIES, "action": "keep"}
            ],
        }
        for job, path in KUBELET_PATHS.items()
    ]


def config(
    targets_file: Path, kubelet_targets: Path | None = None, kubelet_tls: dict[str, str] | None = None
) -> dict[str, Any]:
    """The scrape configuration: the pods the discovery loop lists in `targets_file`, their own labels
    kept (`honor_labels`: the operator's series carry the namespace and name of what they describe),
    the kubelets listed in `kubelet_targets` (when given), and the chart's rules."""
    pods = {
        "job_name": "tandem-pods",
        "honor_labels": True,
        "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "2s"}],
    }
    kubelets = kubelet_jobs(kubelet_targets, kubelet_tls) if kubelet_targets else []
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": [str(RULES_FILE)],
        "scrape_configs": [pods, *kubelets],
    }


def kubelet_targets(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """File-based discovery entries for the kubelets of nodes that kwok does not simulate: the node's
    InternalIP and the kubelet port it reports (`status.daemonEndpoints`), labelled `node`."""
    found = []
    for node in nodes:
        meta, status = node.get("metadata") or {}, node.get("status") or {}
        if KWOK_NODE_ANNOTATION in (meta.get("annotations") or {}):
            continue
        ip = next(
            (a["address"] for a in status.get("addresses") or () if a.get("type") == "InternalIP"), None
        )
        port = ((status.get("daemonEndpoints") or {}).get("kubeletEndpoint") or {}).get("Port")
        if ip and port:
            host = f"[{ip}]" if ":" in ip else ip
            found.append({"targets": [f"{host}:{port}"], "labels": {"node": meta.get("name", "")}})
    return sorted(found, key=lambda t: t["labels"]["node"])


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


def _write(path: Path, entries: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries, indent=1))
    tmp.replace(path)


def discover(
    kubeconfig: Path, targets_file: Path, kubelet_file: Path | None = None, every: float = 2.0
) -> None:
    """Rewrite `targets_file` from the cluster's pods (and `kubelet_file` from its nodes) every
    `every` seconds, until stopped.

    Why not Prometheus' own Kubernetes discovery: Debian's `prometheus` is built without it."""
    from kubernetes import client
    from kubernetes import config as kube_config

    api = client.CoreV1Api(kube_config.new_client_from_config(config_file=str(kubeconfig)))  # type: ignore[no-untyped-call]
    while True:
        try:
            reply: Any = api.list_pod_for_all_namespaces(_request_timeout=10, _preload_content=False)
            _write(targets_file, targets(json.loads(reply.data)["items"]))
            if kubelet_file is not None:
                reply = api.list_node(_request_timeout=10, _preload_content=False)
                _write(kubelet_file, kubelet_targets(json.loads(reply.data)["items"]))
        except Exception:  # the API server restarting, say: keep the last targets and try again
            pass
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
    kubelet_file = folder / "kubelets.json"
    discovery = processes.ProcessRecord.load(_record_path(state_dir, "discovery"))
    if discovery is None or not processes.is_running(discovery):
        for path in (targets_file, kubelet_file):
            if not path.exists():
                path.write_text("[]")
        argv = [
            sys.executable,
            "-m",
            "tandem.devprometheus",
            str(kubeconfig),
            str(targets_file),
            str(kubelet_file),
        ]
        discovery = processes.spawn(
            "prometheus-discovery", argv, state_dir / "logs" / "prometheus-discovery.log"
        )
        discovery.save(_record_path(state_dir, "discovery"))
    existing = processes.ProcessRecord.load(_record_path(state_dir))
    if existing is None or not processes.is_running(existing):
        # The kubelet's serving certificate is signed by the cluster CA; the admin's client pair passes
        # its authentication (x509) and authorization (webhook: system:masters may get nodes/metrics).
        pki = Pki(state_dir / "pki")
        tls = {
            "ca_file": str(pki.ca_cert),
            "cert_file": str(pki.cert(ADMIN.stem)),
            "key_file": str(pki.key(ADMIN.stem)),
        }
        document = config(targets_file, kubelet_file, tls)
        (folder / "prometheus.yml").write_text(yaml.safe_dump(document, sort_keys=False))
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
    discover(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
