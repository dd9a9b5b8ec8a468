"""How cost was allocated (usage or requests) reaches the operator's series and `tandem cost`."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tandem.api.inferenceservice import InferenceServiceSpec, InferenceServiceStatus
from tandem.api.trainingjob import TrainingJobStatus
from tandem.operator import cost, cost_cli, cost_report, cost_sources, kubehttp
from tandem.operator.cost_report import Allocation, ModelHistory, Series
from tandem.operator.status_metrics import StatusMetrics, serving_row, training_row

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


T = TypeVar("T")


def coroutine_of(function: Callable[..., T]) -> Callable[..., Coroutine[Any, Any, T]]:
    """A plain function as the coroutine function it stands in for."""

    async def call(*args: Any) -> T:
        return function(*args)

    return call


def series(text: str) -> dict[tuple[str, str, str], float]:
    """(name, resource name, basis) -> value."""
    return {
        (s.name, s.labels["name"], s.labels.get("basis", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("tandem_cost_containers") or s.name.startswith("tandem_cost_idle")
    }


def allocation_exposition() -> str:
    metrics = StatusMetrics()
    job = TrainingJobStatus.model_validate({"phase": "Running", "cost": {"usd": 1.0, "gpuHours": 0.5}})
    measured = cost.Rate(9.0, 2, containers=3, measured=2, idle_gpu_usd_per_hour=1.5, gpu_measured=1)
    metrics.record("TrainingJob", "ml", "gpt", training_row("gpt", job, measured))
    spec = InferenceServiceSpec.model_validate({"model": {"trainingJobRef": {"name": "gpt"}}})
    status = InferenceServiceStatus.model_validate({"cost": {"hourlyUSD": 1.0, "usd": 0.1}})
    metrics.record("InferenceService", "ml", "chat", serving_row(spec, status, cost.Rate(1.0, 0, 1, 0)))
    metrics.record("InferenceService", "ml", "old", serving_row(spec, status))
    registry = CollectorRegistry()
    registry.register(metrics)
    return generate_latest(registry).decode()


def test_the_operator_exports_how_many_containers_were_charged_by_usage() -> None:
    found = series(allocation_exposition())
    assert found == {
        ("tandem_cost_containers", "gpt", "usage"): 2,
        ("tandem_cost_containers", "gpt", "requests"): 1,
        ("tandem_cost_idle_gpu_usd_per_hour", "gpt", ""): 1.5,
        ("tandem_cost_containers", "chat", "usage"): 0,
        ("tandem_cost_containers", "chat", "requests"): 1,
        # No rate given (a caller that does not report allocation): no series rather than a wrong one.
    }


def test_the_allocation_series_pass_promtool_check_metrics() -> None:
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=allocation_exposition(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_allocation_is_described_per_model() -> None:
    assert Allocation(3, 3).describe() == "usage"
    assert Allocation(3, 0).describe() == "requests"
    assert Allocation(3, 1).describe() == "usage 1/3"
    assert Allocation(0, 0).describe() == "-"


def test_the_table_and_json_carry_the_allocation() -> None:
    at = NOW.timestamp()
    history = ModelHistory(
        "gpt",
        Series.line(at, 10.0, 0.0),
        Series.line(at, 1.0, 1 / 3600),
        Series(),
        Series(),
        allocation=Allocation(4, 0),
    )
    rows = cost_report.report([history, ModelHistory("bert", Series(), Series(), Series(), Series())], NOW)
    assert [r.to_dict()["allocation"] for r in rows] == ["-", "requests"]
    header, bert, gpt = cost_report.table(rows).splitlines()
    assert header.split()[-1] == "ALLOCATION"
    assert gpt.split()[-1] == "requests"
    assert bert.split()[-1] == "-"


def test_prometheus_gives_each_model_its_allocation_now(monkeypatch: pytest.MonkeyPatch) -> None:
    end = NOW.timestamp()

    def line(model: str, basis: str, value: float, last: float) -> dict[str, object]:
        points = [[t, str(value)] for t in (last - 60, last)]
        return {"metric": {"model": model, "basis": basis}, "values": points}

    def answer(base_url: str, path: str, params: dict[str, str]) -> list[dict[str, object]]:
        query = params["query"]
        if query == cost_sources.spend_query(None) and path.endswith("query_range"):
            return [
                {"metric": {"model": m, "phase": "serving"}, "values": [[end - 60, "1"], [end, "2"]]}
                for m in ("gpt", "bert", "gone")
            ]
        if query == cost_sources.allocation_query(None):
            return [
                line("gpt", "usage", 2, end),
                line("gpt", "requests", 1, end),
                line("bert", "requests", 2, end),
                line("gone", "usage", 5, end - 3000),  # its resource was deleted long ago
            ]
        return []

    monkeypatch.setattr(cost_sources, "_get", coroutine_of(answer))
    found = {
        h.model: h.allocation
        for h in kubehttp.run(cost_sources.from_prometheus("http://p", None, NOW, 7200, 3600))
    }
    assert found == {"gpt": Allocation(3, 2), "bert": Allocation(2, 0), "gone": None}


def test_tandem_cost_says_when_usage_is_missing_and_why(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_series(base_url: str, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        return []

    monkeypatch.setattr(cost_sources, "_get", coroutine_of(no_series))
    note = kubehttp.run(cost_cli._usage_note("http://p"))
    assert "requests only" in note
    assert "kwok" in note

    def measured(base_url: str, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        labels = {"namespace": "ml", "pod": "p", "container": "c"}
        return [{"metric": labels, "value": [0, "0.5"]}]

    monkeypatch.setattr(cost_sources, "_get", coroutine_of(measured))
    assert kubehttp.run(cost_cli._usage_note("http://p")).startswith("max(request, usage) per container")
    assert "status.cost.allocation" in kubehttp.run(
        cost_cli._usage_note(None)
    )  # the column comes from the status


def test_a_recent_allocation_needs_a_point_near_now() -> None:
    end = (NOW + timedelta(minutes=1)).timestamp()
    fresh = Series(((end - 10, 2.0),))
    stale = Series(((end - 600, 2.0),))
    assert cost_sources._allocation(fresh, None, end, 15) == Allocation(2, 2)
    assert cost_sources._allocation(stale, None, end, 15) is None
