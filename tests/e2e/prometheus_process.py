"""A real Prometheus server (Debian's `prometheus` package) scraping given targets, for end-to-end tests."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from operator_process import free_port, wait_for

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


@dataclass
class PrometheusProcess:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def query(self, expression: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        with urllib.request.urlopen(url, timeout=5) as response:
            reply = json.loads(response.read())
        return list(reply["data"]["result"])

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_prometheus(
    workdir: Path, targets: Sequence[str], labels: Mapping[str, str], scrape_interval: str = "1s"
) -> PrometheusProcess:
    """Start Prometheus scraping `targets` (host:port) every `scrape_interval`, with `labels` added."""
    job = {"job_name": "tandem-serve", "static_configs": [{"targets": list(targets), "labels": dict(labels)}]}
    return start_prometheus_with(workdir, [job], scrape_interval=scrape_interval)


def start_prometheus_with(
    workdir: Path,
    scrape_configs: Sequence[Mapping[str, Any]],
    rule_files: Sequence[Path] = (),
    scrape_interval: str = "1s",
) -> PrometheusProcess:
    """Start Prometheus with these scrape jobs, evaluating `rule_files` every `scrape_interval`."""
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [dict(job) for job in scrape_configs],
    }
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    prometheus = PrometheusProcess(process, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_for(prometheus.ready, 60, "Prometheus /-/ready")
    except BaseException:
        prometheus.stop()
        raise
    return prometheus
