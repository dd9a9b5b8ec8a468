"""The dev cluster's Prometheus configuration is one Prometheus itself accepts."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from tandem import devprometheus


def test_promtool_accepts_the_scrape_configuration(tmp_path: Path) -> None:
    targets = tmp_path / "targets.json"
    targets.write_text("[]")
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(devprometheus.config(targets)))
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    done = subprocess.run(
        [promtool, "check", "config", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def pod(
    name: str,
    *,
    annotations: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    ports: list[dict[str, object]] | None = None,
    phase: str = "Running",
) -> dict[str, object]:
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "annotations": annotations or {},
            "labels": labels or {},
        },
        "spec": {"containers": [{"ports": ports or []}]},
        "status": {"phase": phase, "podIP": "10.244.0.9"},
    }


def test_targets_are_the_annotated_pods_and_the_training_pods_metrics_ports() -> None:
    pods = [
        pod(
            "server",
            annotations={"prometheus.io/scrape": "true", "prometheus.io/port": "8080"},
            labels={"tandem.dev/inferenceservice": "gpt"},
        ),
        pod(
            "head",
            labels={"app.kubernetes.io/name": "tandem-training"},
            ports=[{"name": "gcs", "containerPort": 6379}, {"name": "metrics", "containerPort": 8080}],
        ),
        pod(
            "pending",
            annotations={"prometheus.io/scrape": "true", "prometheus.io/port": "8080"},
            phase="Pending",
        ),
        pod("other", ports=[{"name": "metrics", "containerPort": 9000}]),
    ]
    assert devprometheus.targets(pods) == [
        {"targets": ["10.244.0.9:8080"], "labels": {"namespace": "ns", "pod": "head"}},
        {"targets": ["10.244.0.9:8080"], "labels": {"namespace": "ns", "pod": "server", "service": "gpt"}},
    ]
