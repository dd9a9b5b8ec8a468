"""Every panel of the Serving latency and Cost dashboards against a real Prometheus.

A real `tandem serve` (causal-lm, a tiny GPT trained here) under a little load, streamed and not, with
some bad requests; a real Prometheus (Debian's package) scraping it every second and evaluating the
chart's rules file. The operator's series come from the operator's own collector (status_metrics) and
cost code (the InferenceService's serving_cost and replicas_rate), served over HTTP in this process
from the statuses a service of one H100 replica and a finished TrainingJob would have: the one stand-in,
because the operator needs a cluster with nodes to price. Each panel's queries are expanded as Grafana
expands them and must return series in a plausible range; each dashboard is drawn to a PNG.

Set TANDEM_DASHBOARD_PNG_DIR to keep the PNGs (docs/images/dashboards holds the ones in the docs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from operator_process import free_port, wait_for
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_process import PrometheusProcess, start_prometheus_with
from serverprocess import ServerProcess
from tiny_train import train_tiny_checkpoint

from tandem.api.inferenceservice import InferenceServiceSpec, InferenceServiceStatus, ReplicaCounts
from tandem.api.trainingjob import TrainingJobStatus
from tandem.operator import cost
from tandem.operator.config import OperatorSettings
from tandem.operator.dashboards import layout
from tandem.operator.dashboards.build import RULES_FILE
from tandem.operator.dashboards.expand import ALL, Context
from tandem.operator.dashboards.render import PanelData, draw, query_dashboard
from tandem.operator.inferenceservice.observe import ObservedReplica
from tandem.operator.inferenceservice.reconcile import replicas_rate, serving_cost
from tandem.operator.status_metrics import StatusMetrics, serving_row, training_row

NAMESPACE = "tandem-test"
SERVICE = "chat"
TRAINING_JOB = "tiny-gpt-job"
#: Serving (one H100 replica, about $4.10/h) passes this about 15 minutes after the stand-in starts: well
#: after the tests, so the crossover is still ahead of them however slow the machine.
TRAINING_USD = 1.00
TRAINING_GPU_HOURS = 0.05
SCRAPE_SECONDS = 1.0
#: Load runs at least this long before the panels are read (several rate intervals of 4 s).
WARM_SECONDS = 20.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_checkpoint(tmp_path_factory.mktemp("gpt"), job_name=TRAINING_JOB)


class OperatorStandIn:
    """The operator's status series for one service and one job, spend accruing with the clock."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.metrics = StatusMetrics()
        self.registry.register(self.metrics)
        self.port = free_port()
        self.server, self.thread = start_http_server(self.port, addr="127.0.0.1", registry=self.registry)
        self.spec = InferenceServiceSpec.model_validate(
            {
                "model": {"trainingJobRef": {"name": TRAINING_JOB}},
                "runtime": "causal-lm",
                "resources": {"gpu": 1, "cpu": "2", "memory": "8Gi"},
                "gpuProduct": "NVIDIA-H100-80GB-HBM3",
            }
        )
        requests = {"nvidia.com/gpu": "1", "cpu": "2", "memory": "8Gi"}
        replica = ObservedReplica(
            name=f"{SERVICE}-0",
            ip="10.0.0.1",
            bound=True,
            ready=True,
            deleting=False,
            fatal="",
            unschedulable="",
            on_node=True,
            containers=cost.containers_of({"spec": {"containers": [{"resources": {"requests": requests}}]}}),
        )
        self.rate = replicas_rate(self.spec, [replica], OperatorSettings().prices())
        self.status = InferenceServiceStatus.model_validate({"phase": "Ready"})
        self.stopping = threading.Event()
        self.ticker = threading.Thread(target=self._tick, daemon=True)
        job = TrainingJobStatus.model_validate(
            {
                "phase": "Succeeded",
                "restarts": 0,
                "cost": {"usd": TRAINING_USD, "gpuHours": TRAINING_GPU_HOURS},
            }
        )
        self.metrics.record(
            "TrainingJob", NAMESPACE, TRAINING_JOB, training_row(TRAINING_JOB, job, cost.Rate())
        )
        self._update(datetime.now(UTC))
        self.ticker.start()

    def _update(self, now: datetime) -> None:
        spent = serving_cost(self.status.cost, self.rate, self.status.metrics, now)
        self.status = self.status.model_copy(
            update={"cost": spent, "replicas": ReplicaCounts(desired=1, ready=1)}
        )
        self.metrics.record("InferenceService", NAMESPACE, SERVICE, serving_row(self.spec, self.status))

    def _tick(self) -> None:
        """The operator writes the spend every 30 s; here every half second, so a short test sees it move."""
        while not self.stopping.wait(0.5):
            self._accrue(datetime.now(UTC))

    def _accrue(self, now: datetime) -> None:
        previous = self.status.cost
        assert previous is not None
        assert previous.last_update_time is not None
        elapsed = (now - previous.last_update_time).total_seconds()
        spend = cost.Spend(previous.usd or 0.0, (previous.gpu_hours or 0.0) * 3600).plus(self.rate, elapsed)
        self.status = self.status.model_copy(
            update={
                "cost": previous.model_copy(
                    update={"usd": spend.usd, "gpu_hours": spend.gpu_seconds / 3600, "last_update_time": now}
                )
            }
        )
        self.metrics.record("InferenceService", NAMESPACE, SERVICE, serving_row(self.spec, self.status))

    def stop(self) -> None:
        self.stopping.set()
        self.ticker.join(5)
        self.server.shutdown()
        self.server.server_close()


def start_prometheus(workdir: Path, serve: str, operator: str) -> PrometheusProcess:
    """Prometheus scraping the replica (labelled as a ServiceMonitor labels it) and the operator
    (honor_labels: its series name their own namespace), evaluating the chart's rules every second."""
    replica = {"namespace": NAMESPACE, "service": SERVICE, "pod": f"{SERVICE}-0"}
    jobs: list[dict[str, Any]] = [
        {"job_name": "tandem-serve", "static_configs": [{"targets": [serve], "labels": replica}]},
        {"job_name": "tandem-operator", "honor_labels": True, "static_configs": [{"targets": [operator]}]},
    ]
    return start_prometheus_with(workdir, jobs, [RULES_FILE])


class Load:
    """Four clients: completions, streamed completions (time to first token), and a few bad requests."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stopping = threading.Event()
        self.sent = 0
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(4)]
        for thread in self.threads:
            thread.start()

    def _run(self, index: int) -> None:
        body = {"model": "tiny-gpt", "prompt": "The platform", "max_tokens": 8, "temperature": 0}
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stopping.is_set():
                try:
                    if index == 0 and self.sent % 5 == 0:
                        client.post("/v1/completions", json={**body, "model": "no-such-model"})  # 404
                        client.post("/v1/completions", json={**body, "max_tokens": -1})  # 400
                    if index % 2:
                        with client.stream(
                            "POST", "/v1/completions", json={**body, "stream": True}
                        ) as response:
                            for _ in response.iter_lines():
                                pass
                    else:
                        client.post("/v1/completions", json=body).raise_for_status()
                    self.sent += 1
                except httpx.HTTPError as error:
                    self.errors.append(repr(error))
                    if len(self.errors) > 20:
                        return

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(60)


@dataclass
class Stack:
    prometheus: PrometheusProcess
    load: Load
    started: float


@pytest.fixture(scope="module")
def stack(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    args = [
        "--runtime", "causal-lm", "--model-uri", f"file://{checkpoint}", "--model-name", "tiny-gpt",
        "--device", "cpu", "--max-batch-size", "8", "--max-queue-delay-ms", "20",
    ]  # fmt: skip
    with ServerProcess(args) as server:
        operator = OperatorStandIn()
        try:
            serve_target = server.url.removeprefix("http://")
            prometheus = start_prometheus(
                tmp_path_factory.mktemp("prometheus"), serve_target, f"127.0.0.1:{operator.port}"
            )
            try:
                started = time.time()
                load = Load(server.url)
                try:
                    wait_for(lambda: load.sent >= 10, 120, "ten answered requests")
                    # The recorded request rate exists once two scrapes saw load.
                    wait_for(
                        lambda: prometheus.query("tandem:serve_requests:rate5m > 0"),
                        120,
                        "a recorded request rate",
                    )
                    deadline = started + WARM_SECONDS
                    wait_for(lambda: time.time() >= deadline, WARM_SECONDS + 5, "the warm-up")
                    assert not load.errors, load.errors[:3]
                    yield Stack(prometheus, load, started)
                finally:
                    load.stop()
            finally:
                prometheus.stop()
        finally:
            operator.stop()


def context(stack: Stack) -> Context:
    return Context(
        start=stack.started,
        end=time.time(),
        scrape_interval=SCRAPE_SECONDS,
        max_data_points=200,
        variables={"namespace": NAMESPACE, "service": SERVICE, "model": ALL},
    )


def values(data: PanelData, legend_prefix: str = "") -> list[float]:
    return [v for line in data.lines if line.legend.startswith(legend_prefix) for _, v in line.points]


def within(data: PanelData, low: float, high: float, legend_prefix: str = "") -> None:
    found = values(data, legend_prefix)
    assert found, f"{data.panel.title}: no {legend_prefix or 'series'} from {data.exprs}"
    assert all(low <= v <= high for v in found), (
        f"{data.panel.title}: {min(found)}..{max(found)} not in [{low}, {high}]"
    )


def keep_png(board: layout.Dashboard, data: dict[str, PanelData], tmp_path: Path) -> Path:
    target = Path(os.environ.get("TANDEM_DASHBOARD_PNG_DIR") or tmp_path)
    target.mkdir(parents=True, exist_ok=True)
    path = target / board.file.replace(".json", ".png")
    draw(board, data, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size < 400_000  # small enough for the docs
    return path


def test_every_serving_panel_answers_in_a_plausible_range(stack: Stack, tmp_path: Path) -> None:
    data = query_dashboard(stack.prometheus.url, layout.SERVING, context(stack))
    within(data["requests"], 0, 1000, "200")
    assert max(values(data["requests"], "200")) > 0
    within(data["tokens"], 0, 1e6)
    assert max(values(data["tokens"], f"{SERVICE} generated")) > 0
    assert max(values(data["tokens"], f"{SERVICE} prompt")) > 0  # causal-lm counts the prompts it reads
    within(data["errors"], 0, 1000, "4")  # the 400s and 404s the load sends
    assert {line.legend for line in data["errors"].lines} >= {"400", "404"}
    within(data["latency"], 0.0001, 30, "p")
    assert values(data["latency"], "p99 SLO")
    assert set(values(data["latency"], "p99 SLO")) == {1.0}
    within(data["ttft"], 0.0001, 30, "p")
    assert set(values(data["ttft"], "p99 SLO")) == {0.5}
    within(data["itl"], 0.00001, 30)
    within(data["queue_wait"], 0, 30)
    within(data["queue_depth"], 0, 100)
    within(data["batch_size"], 1, 8)
    within(data["replicas"], 1, 1)
    within(data["autoscaler"], 1, 1, f"{SERVICE}: fixed")  # the stand-in's spec has no autoscaling
    within(data["idle"], 0, 1)
    within(data["kv_cache"], 0, 1)
    assert max(values(data["kv_cache"])) > 0  # the load's sequences were cached
    assert set(data) == set(layout.SERVING.panels)  # every panel checked above
    keep_png(layout.SERVING, data, tmp_path)


def test_every_cost_panel_answers_in_a_plausible_range(stack: Stack, tmp_path: Path) -> None:
    data = query_dashboard(stack.prometheus.url, layout.COST, context(stack))
    hourly = 4.0 + 2 * 0.031611 + 8 * 0.004237  # one H100, 2 vCPU, 8 GiB at the chart's prices
    within(data["hourly"], hourly * 0.999, hourly * 1.001, "InferenceService")
    within(data["hourly"], 0, 0, "TrainingJob")  # finished: nothing on a node
    within(data["per_million_requests"], 0.01, 1e6)
    within(data["per_million_tokens"], 0.001, 1e6)
    within(data["training_spend"], TRAINING_USD, TRAINING_USD)
    within(data["training_gpu_hours"], TRAINING_GPU_HOURS, TRAINING_GPU_HOURS)
    within(data["cumulative"], TRAINING_USD, TRAINING_USD, f"{TRAINING_JOB} training")
    within(
        data["cumulative"], 0, hourly * (time.time() - stack.started + 60) / 3600, f"{TRAINING_JOB} serving"
    )
    # At the cost per hour now: the finished job adds nothing, so serving passes training once it has
    # spent the rest of the job's dollars at its hourly rate (the recorded value is a few seconds old).
    now_ms = time.time() * 1000
    within(data["crossover"], now_ms - 10_000, now_ms + TRAINING_USD / hourly * 3_600_000 + 5000)
    within(data["idle_cost"], 0, hourly * 1.001)
    assert set(data) == set(layout.COST.panels)
    keep_png(layout.COST, data, tmp_path)


def test_tandem_cost_reads_the_same_prometheus(stack: Stack, tmp_path: Path) -> None:
    plot = Path(os.environ.get("TANDEM_DASHBOARD_PNG_DIR") or tmp_path) / "tandem-cost.png"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tandem",
            "cost",
            "--prometheus-url",
            stack.prometheus.url,
            "-o",
            "json",
            "--window",
            "1m",
            "--plot",
            str(plot),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["source"] == "prometheus"
    (row,) = [m for m in report["models"] if m["model"] == TRAINING_JOB]
    assert row["trainingUSD"] == TRAINING_USD
    assert 0 < row["servingUSD"] < TRAINING_USD
    assert 3.5 < row["servingUSDPerHour"] < 5  # ~$4.10/h measured over the last minute of scrapes
    assert row["usdPerMillionRequests"] > 0
    assert row["usdPerMillionTokens"] > 0
    assert row["trainingUSDPerHour"] == 0  # Succeeded: its spend is fixed
    assert row["crossover"] is not None
    assert not row["crossed"]
    # The projection: the rest of the job's dollars at serving's rate, from the report's time.
    crossover = datetime.fromisoformat(row["crossover"]).timestamp()
    left = (row["trainingUSD"] - row["servingUSD"]) / row["servingUSDPerHour"] * 3600
    assert crossover - datetime.fromisoformat(report["time"]).timestamp() == pytest.approx(left, abs=2)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
