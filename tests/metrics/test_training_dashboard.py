"""The Training dashboard's driver panels against a real Prometheus scraping a real training run.

`tandem train --local --metrics-port` (real Ray, real PyTorch: the tiny GPT on CPU) serves the head's
metrics; Prometheus scrapes them with honor_labels (their `job` label names the TrainingJob) and the
`namespace` a pod's scrape would add. The operator's panels of this dashboard (checkpoint age,
restarts, GPU-hours) are checked against the real operator in tests/e2e/operator.

Set TANDEM_DASHBOARD_PNG_DIR to keep the PNG.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from operator_process import free_port, wait_for
from promcheck import check_metrics
from prometheus_process import start_prometheus_with

from tandem.operator.dashboards import layout
from tandem.operator.dashboards.build import RULES_FILE
from tandem.operator.dashboards.expand import Context
from tandem.operator.dashboards.render import PanelData, draw, query_dashboard

NAMESPACE = "tandem-test"
JOB = "tiny-dash"
#: Driver panels; the operator's (checkpoint_age, gpu_hours, the gang restarts) need the operator.
DRIVER_PANELS = {
    "loss",
    "grad_norm",
    "progress",
    "tokens",
    "step_time",
    "data_wait",
    "checkpoint_duration",
    "restarts",
}
#: What means nothing on a CPU, and must be absent rather than 0.
GPU_PANELS = {"mfu", "gpu_utilization", "gpu_memory"}


def within(data: PanelData, low: float, high: float) -> None:
    found = [v for line in data.lines for _, v in line.points]
    assert found, f"{data.panel.title}: no series from {data.exprs}"
    assert all(low <= v <= high for v in found), (
        f"{data.panel.title}: {min(found)}..{max(found)} not in [{low}, {high}]"
    )


def check_driver_panels(data: dict[str, PanelData]) -> None:
    """The driver's panels answer in range; what a CPU run has no use for is absent."""
    within(data["loss"], 0.01, 20)
    within(data["progress"], 0, 0.01)  # of 100,000 steps
    within(data["tokens"], 1, 1e7)
    within(data["step_time"], 0.0001, 30)
    within(data["checkpoint_duration"], 0.0001, 120)
    within(data["grad_norm"], 0.001, 1e4)
    within(data["data_wait"], 0, 1)  # reading windows of an in-memory corpus: far below the step
    assert max(v for line in data["data_wait"].lines for _, v in line.points) > 0
    within(data["restarts"], 0, 0)  # the driver's worker-group restarts: none
    assert {line.legend for line in data["restarts"].lines} == {f"{JOB} worker group"}
    for panel in GPU_PANELS:  # a CPU run: no MFU, no GPU series, not zeros
        assert not [v for line in data[panel].lines for _, v in line.points], panel
    assert DRIVER_PANELS | GPU_PANELS | {"checkpoint_age", "gpu_hours"} == set(layout.TRAINING.panels)


def test_training_panels_answer_from_a_real_run(tmp_path: Path) -> None:
    job = {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": JOB},
        "spec": {
            "trainer": {
                "builtin": {"size": "tiny", "dataset": {"uri": "tandem://corpus-small"}, "maxSteps": 100000}
            },
            "workers": {"replicas": 1, "resources": {"cpu": "1"}},
            "precision": "fp32",
            "batch": {"perDevice": 4, "global": 4},
            "checkpoint": {"storage": {"pvc": "unused-locally"}, "everySteps": 20, "keep": 2},
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    port = free_port()
    log = (tmp_path / "train.log").open("wb")
    command = [sys.executable, "-m", "tandem", "train", str(path), "--local", "--no-progress"]
    command += ["--checkpoint-dir", str(tmp_path / "ckpt"), "--seq-len", "32", "--metrics-port", str(port)]
    training = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    scrape = {
        "job_name": "tandem-train",
        "honor_labels": True,
        "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": {"namespace": NAMESPACE}}],
    }
    prometheus = None
    try:
        prometheus = start_prometheus_with(tmp_path / "prometheus", [scrape], [RULES_FILE])

        def scraped(expr: str) -> bool:
            if training.poll() is not None:
                raise AssertionError(f"training exited: {(tmp_path / 'train.log').read_text()[-3000:]}")
            assert prometheus is not None
            return bool(prometheus.query(expr))

        # The driver's gauges exist (at 0) before its first step: the panels are read from then on.
        wait_for(lambda: scraped(f'tandem_train_step{{job="{JOB}"}} > 0'), 300, "a first step scraped")
        started = time.time()
        wait_for(
            lambda: scraped(f'tandem_train_checkpoints_total{{job="{JOB}"}} >= 2'), 300, "two checkpoints"
        )
        history = f'count_over_time((tandem_train_step{{job="{JOB}"}} > 0)[1m:1s]) >= 20'
        wait_for(lambda: scraped(history), 120, "twenty seconds of steps, for the picture")
        context = Context(
            start=started,
            end=time.time(),
            scrape_interval=1,
            max_data_points=200,
            variables={"namespace": NAMESPACE, "job": JOB},
        )
        data = query_dashboard(prometheus.url, layout.TRAINING, context)
        check_driver_panels(data)
        check_metrics(f"http://127.0.0.1:{port}/metrics")
        png = Path(os.environ.get("TANDEM_DASHBOARD_PNG_DIR") or tmp_path) / "training.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        draw(layout.TRAINING, data, png)
        assert png.stat().st_size < 400_000
    finally:
        if prometheus is not None:
            prometheus.stop()
        if training.poll() is None:
            training.send_signal(signal.SIGTERM)  # checkpoint and stop, as a pod's head does
            try:
                training.wait(120)
            except subprocess.TimeoutExpired:
                training.kill()
                training.wait(30)
        log.close()
