"""Usage-based cost allocation read from a real Prometheus, through the dev cluster's own kubelet jobs.

A real kubelet cannot run in these tests (the machine's one real node belongs to the lifecycle run), so
a stand-in (tests/support/kubelet_standin.py) serves what a kubelet's `/metrics/cadvisor` and
`/metrics/resource` serve, in their format, and what NVIDIA's DCGM exporter serves for a GPU.
Prometheus scrapes it with `tandem.devprometheus.kubelet_jobs` (the same jobs as the dev cluster, over
HTTP instead of the kubelet's TLS); `tandem.operator.cost_usage` reads it back the way the operator
does. The real node's check is the lead's: docs/dashboards.md says which query answers there.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubelet_standin import ContainerUsage, KubeletStandIn
from operator_process import wait_for
from prometheus_process import start_prometheus_with

from tandem import devprometheus
from tandem.operator import cost, cost_usage, kubehttp

NAMESPACE, POD = "ml", "gpt-head-0"
#: What the stand-in's containers use: vCPUs (the CPU seconds counter's slope) and working set.
SERVER_CPU, SERVER_MEMORY = 1.5, 6 * cost.GIB
SIDECAR_CPU, SIDECAR_MEMORY = 0.05, 64 * 1024**2
GPU_UTIL_PERCENT = 40.0
WINDOW_SECONDS = 20


@pytest.fixture
def exporter() -> Iterator[str]:
    stand_in = KubeletStandIn()
    stand_in.set(NAMESPACE, POD, "server", ContainerUsage(SERVER_CPU, SERVER_MEMORY, GPU_UTIL_PERCENT))
    stand_in.set(NAMESPACE, POD, "sidecar", ContainerUsage(SIDECAR_CPU, SIDECAR_MEMORY))
    try:
        yield stand_in.address
    finally:
        stand_in.stop()


def manifest() -> dict[str, object]:
    """The pod as the cost model reads it: server 1 vCPU, 8 GiB, 1 GPU; sidecar 0.1 vCPU, 32 MiB."""
    return {
        "spec": {
            "nodeName": "real-node-0",
            "containers": [
                {
                    "name": "server",
                    "resources": {
                        "requests": {"cpu": "1", "memory": "8Gi"},
                        "limits": {"nvidia.com/gpu": "1"},
                    },
                },
                {"name": "sidecar", "resources": {"requests": {"cpu": "100m", "memory": "32Mi"}}},
            ],
        }
    }


def test_the_operator_charges_max_of_request_and_usage_read_from_prometheus(
    tmp_path: Path, exporter: str
) -> None:
    kubelets = tmp_path / "kubelets.json"
    kubelets.write_text(json.dumps([{"targets": [exporter], "labels": {"node": "real-node-0"}}]))
    dcgm = {"job_name": "dcgm", "honor_labels": True, "static_configs": [{"targets": [exporter]}]}
    prometheus = start_prometheus_with(
        tmp_path / "prometheus", [*devprometheus.kubelet_jobs(kubelets, None), dcgm]
    )
    # An operator watching two namespaces; the pod is in one of them.
    watched = (NAMESPACE, "elsewhere")
    source = cost_usage.UsageSource(
        prometheus.url, window=f"{WINDOW_SECONDS}s", refresh_seconds=0, namespaces=watched
    )
    prices = cost.Prices({"H100": 4.0})
    try:
        # Until the series reach back past the window's start, rate() reads low (a counter that starts
        # at 0 is not extrapolated before it): wait for a few seconds more than a window of 1 s scrapes.
        covered = (
            "min(count_over_time(container_cpu_usage_seconds_total"
            f'{{container=~"server|sidecar",pod="{POD}"}}[{2 * WINDOW_SECONDS}s])) >= {WINDOW_SECONDS + 4}'
        )
        wait_for(
            lambda: prometheus.query(covered), 180, f"{WINDOW_SECONDS}s of kubelet scrapes", interval=1.0
        )
        snapshot = kubehttp.run(source.wait(60))
        assert snapshot.problem is None
        usage = snapshot.for_pod(NAMESPACE, POD)
        assert usage is not None
        assert set(usage) == {"server", "sidecar"}  # the pod cgroup and the POD sandbox are not containers
        server, sidecar = usage["server"], usage["sidecar"]
        assert server.cpu == pytest.approx(SERVER_CPU, rel=0.1)
        assert sidecar.cpu == pytest.approx(SIDECAR_CPU, rel=0.1)
        # Both kubelet endpoints were scraped: one value per container, not their sum.
        assert server.memory_bytes == pytest.approx(SERVER_MEMORY)
        assert sidecar.memory_bytes == pytest.approx(SIDECAR_MEMORY)
        assert server.gpu_busy == pytest.approx(GPU_UTIL_PERCENT / 100)
        assert (
            len(prometheus.query(f'container_memory_working_set_bytes{{container="server",pod="{POD}"}}'))
            == 2
        )
        assert not prometheus.query("container_fs_usage_bytes")  # dropped at scrape time

        rate = cost.pod_rate(cost.containers_of(manifest()), "H100", prices, usage)
        measured_cpu = server.cpu
        assert measured_cpu is not None
        cpu, ram = prices.cpu_per_vcpu_hour, prices.ram_per_gib_hour
        # server: CPU above its request (as used), memory below it (as requested); sidecar: memory above.
        expected = 4.0 + measured_cpu * cpu + 8 * ram + 0.1 * cpu + SIDECAR_MEMORY / cost.GIB * ram
        assert rate.usd_per_hour == pytest.approx(expected)
        assert rate.usd_per_hour > cost.pod_rate(cost.containers_of(manifest()), "H100", prices).usd_per_hour
        assert (rate.basis, rate.gpus) == ("usage", 1)
        assert rate.idle_gpu_usd_per_hour == pytest.approx(4.0 * (1 - GPU_UTIL_PERCENT / 100))

        # A pod on a kwok node has no series: requests, and the snapshot is still good for the others.
        assert snapshot.for_pod(NAMESPACE, "on-a-kwok-node") is None
    finally:
        kubehttp.run(source.close())
        prometheus.stop()
    # Prometheus gone: the next read says so instead of failing, and allocation falls back to requests.
    down = cost_usage.UsageSource(prometheus.url, refresh_seconds=0)
    try:
        snapshot = kubehttp.run(down.wait(60))
    finally:
        kubehttp.run(down.close())
    assert snapshot.problem is not None
    assert "did not answer" in snapshot.problem
    fallback = cost.pod_rate(cost.containers_of(manifest()), "H100", prices, snapshot.for_pod(NAMESPACE, POD))
    assert fallback.basis == "requests"
