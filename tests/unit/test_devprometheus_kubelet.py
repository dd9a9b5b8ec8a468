"""The dev cluster's Prometheus scrapes real kubelets' usage series (the cost model's input), never kwok's."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tandem import devprometheus


def node(name: str, ip: str | None, port: int | None, *, kwok: bool = False) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake"} if kwok else {}},
        "status": {
            "addresses": [{"type": "InternalIP", "address": ip}] if ip else [],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": port}} if port else {},
        },
    }


def test_only_nodes_with_a_real_kubelet_are_scraped() -> None:
    nodes = [
        node("real-node-0", "10.244.7.1", 10350),
        node("gpu-0", "10.0.0.5", 10250, kwok=True),
        node("no-address", None, 10250),
        node("v6", "fd00::1", 10250),
    ]
    assert devprometheus.kubelet_targets(nodes) == [
        {"targets": ["10.244.7.1:10350"], "labels": {"node": "real-node-0"}},
        {"targets": ["[fd00::1]:10250"], "labels": {"node": "v6"}},
    ]


def test_promtool_accepts_the_kubelet_jobs_over_tls(tmp_path: Path) -> None:
    files = {}
    for key in ("ca_file", "cert_file", "key_file"):
        files[key] = str(tmp_path / f"{key}.pem")
        Path(files[key]).write_text("")
    (tmp_path / "targets.json").write_text("[]")
    (tmp_path / "kubelets.json").write_text("[]")
    document = devprometheus.config(tmp_path / "targets.json", tmp_path / "kubelets.json", files)
    jobs = {job["job_name"]: job for job in document["scrape_configs"]}
    assert jobs["kubelet-cadvisor"]["metrics_path"] == "/metrics/cadvisor"
    assert jobs["kubelet-resource"]["scheme"] == "https"
    assert jobs["kubelet-resource"]["tls_config"] == files
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(document))
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    done = subprocess.run(
        [promtool, "check", "config", "--syntax-only", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
