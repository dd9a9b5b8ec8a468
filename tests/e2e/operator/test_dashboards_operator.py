"""The Operator dashboard, and the panels of the others that read the operator, against the real operator.

A real Prometheus scrapes the session's operator (honor_labels, as the chart's ServiceMonitor does) and
evaluates the chart's rules while the operator runs a TrainingJob on simulated GPU nodes, with a
checkpoint reported by its head pod. Set TANDEM_DASHBOARD_PNG_DIR to keep the Operator dashboard's PNG.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubeobjects import status_of
from operator_process import OperatorProcess, wait_for
from prometheus_process import start_prometheus_with

from tandem.devinstall import Kubectl
from tandem.operator.dashboards import layout
from tandem.operator.dashboards.build import RULES_FILE
from tandem.operator.dashboards.expand import ALL, Context
from tandem.operator.dashboards.render import PanelData, draw, query_dashboard

WAIT = 60
SCRAPE = "tandem-operator"

pytestmark = pytest.mark.usefixtures("operator")


def within(data: PanelData, low: float, high: float, legend_prefix: str = "") -> None:
    found = [v for line in data.lines if line.legend.startswith(legend_prefix) for _, v in line.points]
    assert found, f"{data.panel.title}: no {legend_prefix or 'series'} from {data.exprs}"
    assert all(low <= v <= high for v in found), (
        f"{data.panel.title}: {min(found)}..{max(found)} not in [{low}, {high}]"
    )


def test_operator_dashboard_and_the_operators_panels(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess, tmp_path: Path
) -> None:
    job = {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "watched"},
        "spec": {
            "trainer": {
                "builtin": {"size": "tiny", "dataset": {"uri": "file:///data/c.txt"}, "maxSteps": 100}
            },
            "workers": {"replicas": 1, "resources": {"gpu": 1}, "gpuProduct": "NVIDIA-H100-80GB-HBM3"},
            "checkpoint": {"storage": {"uri": "file:///checkpoints/watched"}},
        },
    }
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(job))
    scrape = {
        "job_name": SCRAPE,
        "honor_labels": True,
        "static_configs": [{"targets": [f"127.0.0.1:{operator.metrics_port}"]}],
    }
    prometheus = start_prometheus_with(tmp_path / "prometheus", [scrape], [RULES_FILE])
    try:
        started = time.time()
        wait_for(
            lambda: status_of(kubectl, namespace, "tj", "watched").get("phase") == "Running", WAIT, "Running"
        )
        checkpoint: dict[str, Any] = {"step": 10, "uri": "file:///checkpoints/watched/step-00000010"}
        checkpoint["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 120))

        def report(step: int) -> None:
            record = json.dumps({"step": step, "totalSteps": 100, "checkpoint": checkpoint})
            head = "watched-1-head"
            kubectl.run(
                "annotate", "--overwrite", "pod", head, "-n", namespace, f"tandem.dev/progress={record}"
            )

        report(12)
        wait_for(
            lambda: prometheus.query(
                f'tandem_trainingjob_last_checkpoint_timestamp_seconds{{namespace="{namespace}",name="watched"}}'
            ),
            WAIT,
            "the checkpoint time scraped",
        )
        report(13)  # one more reconcile, now that Prometheus scrapes (the first may have come before)
        seen = 'increase(tandem_operator_reconcile_total{kind="TrainingJob",result="ok"}[1m]) > 0'
        wait_for(lambda: prometheus.query(seen), WAIT, "a reconcile seen by Prometheus")
        wait_for(lambda: time.time() > started + 30, 40, "some history to draw")
        context = Context(
            start=started,
            end=time.time(),
            scrape_interval=1,
            max_data_points=200,
            variables={"operator": SCRAPE, "namespace": namespace, "job": "watched", "model": ALL},
        )
        ops = query_dashboard(prometheus.url, layout.OPERATOR, context)
        within(ops["reconciles"], 0, 1000, "TrainingJob ok")
        assert max(v for line in ops["reconciles"].lines for _, v in line.points) > 0
        within(ops["latency"], 0.0001, 10)
        within(ops["errors"], 0, 100)
        within(ops["phases"], 1, 1, "TrainingJob Running")
        within(ops["queue"], 0, 1000, "TrainingJob")
        within(ops["api_latency"], 0.00001, 10)
        within(ops["watch_age"], 0, 300, "trainingjobs")
        within(ops["cpu"], 0, 16)
        within(ops["memory"], 10e6, 10e9)
        assert set(ops) == set(layout.OPERATOR.panels)
        png = Path(os.environ.get("TANDEM_DASHBOARD_PNG_DIR") or tmp_path) / "operator.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        draw(layout.OPERATOR, ops, png)
        assert png.stat().st_size < 400_000

        training = query_dashboard(prometheus.url, layout.TRAINING, context)
        within(training["checkpoint_age"], 110, 600)  # written two minutes before the report
        within(training["restarts"], 0, 0)
        within(training["gpu_hours"], 0, 1)

        cost = query_dashboard(prometheus.url, layout.COST, context)
        within(cost["hourly"], 4.0, 5.0, "TrainingJob watched")  # one H100 at $4/h, plus CPU and memory
        within(cost["training_spend"], 0, 1)
        within(cost["training_gpu_hours"], 0, 1)
        within(cost["cumulative"], 0, 1, "watched training")
    finally:
        prometheus.stop()
