"""The dashboards as code: the committed JSON is what the code generates, and every panel is complete."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tandem.operator.dashboards import build, layout, rules

REPO = Path(__file__).resolve().parents[2]


def exported_names() -> set[str]:
    """Every metric family the exporters expose (their real /metrics text, from the TYPE lines)."""
    from datetime import UTC, datetime

    from prometheus_client import REGISTRY, generate_latest

    from tandem.api.inferenceservice import InferenceServiceSpec, InferenceServiceStatus
    from tandem.api.trainingjob import TrainingJobStatus
    from tandem.operator import cost, metrics  # noqa: F401 - registers the operator's own metrics
    from tandem.operator.status_metrics import StatusMetrics, serving_row, training_row
    from tandem.workloads.serve.metrics import ServeMetrics
    from tandem.workloads.train.progress import TrainMetrics

    status = StatusMetrics()
    checkpoint = {"step": 1, "uri": "s3://b/step-00000001", "time": datetime.now(UTC).isoformat()}
    job = TrainingJobStatus.model_validate({"phase": "Running", "restarts": 0, "lastCheckpoint": checkpoint})
    status.record("TrainingJob", "ns", "job", training_row("job", job, cost.Rate()))
    spec = InferenceServiceSpec.model_validate({"model": {"uri": "pvc://models/m"}, "runtime": "causal-lm"})
    service = InferenceServiceStatus.model_validate(
        {"phase": "Ready", "replicas": {"desired": 1, "ready": 1}}
    )
    status.record("InferenceService", "ns", "svc", serving_row(spec, service))
    texts = [
        ServeMetrics("model", 8, process_metrics=False).render().decode(),
        TrainMetrics("job").text(),
        generate_latest(REGISTRY).decode(),
        "".join(f"# TYPE {family.name} {family.type}\n" for family in status.collect()),
    ]
    return {line.split()[2] for text in texts for line in text.splitlines() if line.startswith("# TYPE ")}


SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def test_committed_files_match_the_generator() -> None:
    assert build.stale() == [], "run `python -m tandem.operator.dashboards` and commit the result"


def test_uids_are_stable_and_every_panel_has_a_unit_and_the_datasource_variable() -> None:
    boards = {
        board.file: json.loads((build.DASHBOARD_DIR / board.file).read_text()) for board in layout.DASHBOARDS
    }
    assert {b["uid"] for b in boards.values()} == {
        "tandem-serving-latency",
        "tandem-cost",
        "tandem-training",
        "tandem-operator",
    }
    for name, board in boards.items():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource", name
        assert "namespace" in variables, name
        panels = [p for p in board["panels"] if p["type"] != "row"]
        assert panels, name
        for panel in panels:
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{name}: {panel['title']} has no unit"
            assert panel["datasource"]["uid"] == "${datasource}"
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(tandem_[a-z0-9_]+|process_[a-z_]+)\b", expr))


def test_every_metric_a_panel_or_rule_reads_is_exported_by_the_code() -> None:
    exported = exported_names()
    exprs = [q.expr for board in layout.DASHBOARDS for panel in board.panels.values() for q in panel.queries]
    exprs += [r["expr"] for group in rules.rule_groups()["groups"] for r in group["rules"]]
    missing = set()
    for name in set().union(*(_metric_names(e) for e in exprs)):
        if name.startswith("process_"):
            continue  # prometheus_client's process collector, on by default in the operator
        base = name
        for suffix in SUFFIXES:
            base = base.removesuffix(suffix)
        if base not in exported and name not in exported:
            missing.add(name)
    assert not missing, f"no exporter writes {sorted(missing)}"


def test_recorded_series_the_panels_read_are_defined() -> None:
    recorded = {
        r["record"] for group in rules.rule_groups()["groups"] for r in group["rules"] if "record" in r
    }
    used = {
        name
        for board in layout.DASHBOARDS
        for panel in board.panels.values()
        for q in panel.queries
        for name in re.findall(r"\btandem:[a-z0-9_:]+", q.expr)
    }
    assert used <= recorded
