"""The builtin autoscaler with real parts: a real `tandem serve` process under a real load generator,
scraped by a real Prometheus server, queried by the operator, which scales the Deployment.

What is simulated: the replica pods run on kwok nodes, so no container runs in them. The one real
server process plays the service's replicas for the metrics: Prometheus scrapes it with the labels a
ServiceMonitor would give the pods (`namespace`, and the server's own `model`). Scaling the Deployment
therefore does not spread the load here; the test checks that the operator reads the load, scales up
to the right count during the load step, and back down after it.
"""

from __future__ import annotations

import json
import re
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kubeobjects import events, get, status_of
from operator_process import OperatorProcess, start_operator, wait_for
from prometheus_process import PrometheusProcess, start_prometheus
from serverprocess import ServerProcess

from tandem.devinstall import Kubectl

NAME = "scaled"
CLIENTS = 8
TARGET = 2  # in-flight requests per replica: 8 clients -> 4 replicas
MODEL_JSON = {
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
}


def write_model(directory: Path) -> None:
    import torch

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still supported
        torch.jit.script(torch.nn.Linear(4, 4)).save(str(directory / "model.pt"))  # type: ignore[no-untyped-call]
    (directory / "model.json").write_text(json.dumps(MODEL_JSON))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    directory = tmp_path / "model"
    directory.mkdir()
    write_model(directory)
    args = [
        "--runtime", "torchscript", "--model-uri", f"file://{directory}", "--model-name", NAME,
        "--device", "cpu", "--max-batch-size", "64", "--max-queue-delay-ms", "200",
    ]  # fmt: skip
    with ServerProcess(args) as process:
        yield process


@pytest.fixture
def prometheus(tmp_path: Path, server: ServerProcess, namespace: str) -> Iterator[PrometheusProcess]:
    target = server.url.removeprefix("http://").rstrip("/")
    process = start_prometheus(tmp_path / "prometheus", [target], {"namespace": namespace})
    try:
        wait_for(
            lambda: process.query(f'tandem_serve_ready{{namespace="{namespace}",model="{NAME}"}}'),
            60,
            "Prometheus to scrape the model server",
        )
        yield process
    finally:
        process.stop()


@pytest.fixture
def scaling_operator(
    operator: OperatorProcess, prometheus: PrometheusProcess, tmp_path: Path
) -> Iterator[OperatorProcess]:
    """The session operator stopped for this test; one configured with the Prometheus URL instead."""
    operator.stop()
    own = start_operator(
        operator.kubeconfig,
        tmp_path / "operator.log",
        {"TANDEM_PROMETHEUS_URL": prometheus.url, "TANDEM_AUTOSCALER_TICK_SECONDS": "1"},
    )
    try:
        yield own
    finally:
        own.stop()
        log = own.log_text()
        operator.restart()
        denied = [line for line in log.splitlines() if re.search(r'forbidden: User "', line)]
        assert not denied, "\n".join(denied[:10])


class LoadGenerator:
    """`clients` closed-loop clients, each sending one inference request after the other."""

    def __init__(self, url: str, clients: int) -> None:
        self.url = f"{url}/v2/models/{NAME}/infer"
        self.clients = clients
        self.stopping = threading.Event()
        self.answered = 0
        self.failed = 0
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(clients)]

    def run(self) -> None:
        body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        with httpx.Client(timeout=30) as client:
            while not self.stopping.is_set():
                response = client.post(self.url, json=body)
                if response.status_code == 200:
                    self.answered += 1
                else:
                    self.failed += 1

    def __enter__(self) -> LoadGenerator:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(60)


def deployment_replicas(kubectl: Kubectl, namespace: str) -> int:
    return int(get(kubectl, namespace, "deployment", NAME)["spec"]["replicas"])


def test_load_step_scales_the_deployment_up_and_back_down(
    kubectl: Kubectl, namespace: str, server: ServerProcess, scaling_operator: OperatorProcess
) -> None:
    service: dict[str, Any] = {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": NAME},
        "spec": {
            "model": {"uri": "file:///models/linear"},
            "runtime": "torchscript",
            "replicas": {"min": 1, "max": 4, "count": 1},
            "autoscaling": {
                "mode": "builtin",
                "metric": "concurrency",
                "target": TARGET,
                "stableWindowSeconds": 10,
                "panicWindowSeconds": 4,
                "scaleDownDelaySeconds": 10,
                "maxScaleUpRate": 2.0,
            },
        },
    }
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(service))
    wait_for(lambda: status_of(kubectl, namespace, "tisvc", NAME).get("phase") == "Ready", 60, "Ready")
    assert deployment_replicas(kubectl, namespace) == 1

    with LoadGenerator(server.url, CLIENTS) as load:
        started = time.monotonic()
        wait_for(lambda: deployment_replicas(kubectl, namespace) == 4, 90, "scale-up to 4 replicas", 0.5)
        reaction = time.monotonic() - started
        status = wait_for(
            lambda: (
                (s := status_of(kubectl, namespace, "tisvc", NAME)).get("metrics", {}).get("rps")
                and s.get("replicasDisplay") == "4/4"
                and s
            ),
            60,
            "status.metrics from Prometheus, and 4/4 replicas ready",
        )
        row = kubectl.run("get", "tisvc", NAME, "-n", namespace, "--no-headers").split()
    print(f"scale-up 1 -> 4 took {reaction:.1f}s; {load.answered} requests answered, {load.failed} failed")
    assert load.answered > 0
    assert load.failed == 0
    assert status["metrics"]["concurrency"] >= 0
    assert status["metrics"]["latencyP99Ms"] > 0
    # NAME PHASE READY MODEL RPS P99 COST/H AGE: RPS and P99 show the observed load.
    assert row[:4] == [NAME, "Ready", "4/4", "file:///models/linear"]
    assert float(row[4]) > 0
    assert float(row[5]) > 0
    assert deployment_replicas(kubectl, namespace) == 4  # never more than max

    wait_for(lambda: deployment_replicas(kubectl, namespace) == 1, 120, "scale-down to 1 after the load", 0.5)
    scaled = [e for e in events(kubectl, namespace, NAME) if e["reason"] == "Scaled"]
    messages = " | ".join(e["message"] for e in scaled)
    assert "PanicScaleUp" in messages or "ScaleUp" in messages, messages
    assert "ScaleDown" in messages, messages
    assert re.search(r"concurrency [0-9.]+ over 10s", messages), messages
    final = status_of(kubectl, namespace, "tisvc", NAME)
    assert "lastScaleTime" in final
    conditions = {c["type"]: c for c in final["conditions"]}
    assert conditions["ScalingActive"]["status"] == "True"
