"""The real operator charges max(request, usage) read from a real Prometheus, and requests when usage goes.

kwok's nodes have no kubelet, so a stand-in (tests/support/kubelet_standin.py) serves the usage series
a kubelet's `/metrics/cadvisor` would serve for the job's pods, by their real names; a real Prometheus
scrapes it with the dev cluster's kubelet jobs (tandem.devprometheus) and the operator reads it as in
production (`prometheusUrl`). The real node's check (a real kubelet) is the lead's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubelet_standin import ContainerUsage, KubeletStandIn
from kubeobjects import priced_job, status_of
from operator_process import OperatorProcess, start_operator, wait_for
from prometheus_process import PrometheusProcess, start_prometheus_with

from tandem import devprometheus
from tandem.devinstall import Kubectl
from tandem.operator import cost

WAIT = 180  # the operator refreshes usage every 30 s, and writes cost at least every 30 s
H100 = 4.0
CPU, RAM = cost.OPENCOST_CPU_USD_PER_VCPU_HOUR, cost.OPENCOST_RAM_USD_PER_GIB_HOUR
#: The worker's memory use: far above its 16 GiB request. A working set is averaged over the window,
#: so it counts in full at once (CPU seconds, a rate, read low until the 5-minute window has filled).
WORKER_MEMORY_GIB = 200


def bound_pods(kubectl: Kubectl, namespace: str) -> list[dict[str, Any]] | None:
    pods = json.loads(kubectl.run("get", "pods", "-n", namespace, "-o", "json"))["items"]
    return pods if len(pods) == 2 and all(p["spec"].get("nodeName") for p in pods) else None


def tandem_cost_once_scraped(prometheus: PrometheusProcess, namespace: str) -> str:
    """`tandem cost`'s report, once Prometheus has scraped the usage allocation of the operator (it
    is up to a scrape interval behind the operator's /metrics and the status)."""
    scraped = f'tandem_cost_containers{{namespace="{namespace}",name="used",basis="usage"}} == 2'
    wait_for(lambda: prometheus.query(scraped), WAIT, "Prometheus to scrape the usage allocation")
    report = subprocess.run(
        [sys.executable, "-m", "tandem", "cost", "-n", namespace, "--prometheus-url", prometheus.url],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    return report.stdout


def test_usage_above_the_request_is_charged_until_prometheus_goes(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess, second_operator: Path
) -> None:
    stand_in = KubeletStandIn()
    kubelets = second_operator / "kubelets.json"
    kubelets.write_text(json.dumps([{"targets": [stand_in.address], "labels": {"node": "stand-in"}}]))
    # The operator's own series too (its port is known once it runs): `tandem cost` reads them.
    operators = second_operator / "operator-targets.json"
    operators.write_text("[]")
    scrape_operator = {
        "job_name": "tandem-operator",
        "honor_labels": True,
        "file_sd_configs": [{"files": [str(operators)], "refresh_interval": "1s"}],
    }
    jobs = [*devprometheus.kubelet_jobs(kubelets, None), scrape_operator]
    prometheus = start_prometheus_with(second_operator / "prometheus", jobs)
    ours: OperatorProcess | None = None
    try:
        env = {"TANDEM_PROMETHEUS_URL": prometheus.url}
        ours = start_operator(operator.kubeconfig, second_operator / "operator.log", env)
        operators.write_text(json.dumps([{"targets": [f"127.0.0.1:{ours.metrics_port}"]}]))
        kubectl.run("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(priced_job("used")))
        pods = wait_for(lambda: bound_pods(kubectl, namespace), 120, "the job's two pods bound")
        labels = {"namespace": namespace, "name": "used", "kind": "TrainingJob", "phase": "training"}

        def priced_by_requests() -> float | None:
            both = ours.sample("tandem_cost_containers", basis="requests", **labels) == 2
            return ours.sample("tandem_cost_usd_per_hour", **labels) if both else None

        requested = wait_for(priced_by_requests, WAIT, "both pods priced by their requests (no usage yet)")
        assert ours.sample("tandem_cost_containers", basis="usage", **labels) == 0

        # Usage appears: the head's containers stay under their requests, the worker's memory goes far over.
        for pod in pods:
            worker = pod["metadata"]["labels"].get("tandem.dev/role") == "worker"
            for container in pod["spec"]["containers"]:
                memory = WORKER_MEMORY_GIB * cost.GIB if worker else 1024**2
                stand_in.set(
                    namespace, pod["metadata"]["name"], container["name"], ContainerUsage(0.01, memory)
                )
        expected = requested + (WORKER_MEMORY_GIB - 16) * RAM

        def charged_by_usage() -> float | None:
            hourly = ours.sample("tandem_cost_usd_per_hour", **labels)
            measured = ours.sample("tandem_cost_containers", basis="usage", **labels)
            return hourly if measured == 2 and hourly and hourly > requested else None

        hourly = wait_for(charged_by_usage, WAIT, "the worker's memory use charged above its request")
        assert hourly == pytest.approx(expected, rel=1e-3)

        def allocation() -> str | None:
            return (status_of(kubectl, namespace, "tj", "used").get("cost") or {}).get("allocation")

        wait_for(lambda: allocation() == "usage", WAIT, "status.cost.allocation: usage")
        # `tandem cost` says which allocation it was.
        report = tandem_cost_once_scraped(prometheus, namespace)
        assert "allocation: max(request, usage) per container" in report
        header, row = report.splitlines()[:2]
        assert header.split()[0] == "MODEL"
        assert header.split()[-1] == "ALLOCATION"
        assert row.split()[0] == "used"
        assert row.split()[-1] == "usage"

        # Prometheus goes: the operator keeps reconciling and charges the requests again.
        prometheus.stop()
        wait_for(
            lambda: ours.sample("tandem_cost_containers", basis="requests", **labels) == 2,
            WAIT,
            "requests again once Prometheus is gone",
        )
        assert ours.sample("tandem_cost_usd_per_hour", **labels) == pytest.approx(requested)
        wait_for(lambda: allocation() == "requests", WAIT, "status.cost.allocation: requests again")
        assert "reading container usage from Prometheus failed" not in ours.log_text()
    finally:
        if ours is not None:
            ours.stop()
        prometheus.stop()
        stand_in.stop()
