"""`tandem cost` on known histories: spend so far, cost per request and token, and the crossover date."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tandem.operator import cost_cli, cost_report, kubehttp
from tandem.operator.cost_plot import plot
from tandem.operator.cost_report import ModelHistory, Series

T0 = datetime(2026, 12, 1, tzinfo=UTC)
HOUR = 3600.0


T = TypeVar("T")


def coroutine_of(function: Callable[..., T]) -> Callable[..., Coroutine[Any, Any, T]]:
    """A plain function as the coroutine function it stands in for."""

    async def call(*args: Any) -> T:
        return function(*args)

    return call


def hourly(values: list[float], start: datetime = T0) -> Series:
    """A cumulative series sampled every hour from `start`."""
    return Series(tuple((start.timestamp() + i * HOUR, v) for i, v in enumerate(values)))


def gpt_history() -> ModelHistory:
    """Training ran 10 hours at $40/h ($400), then stopped; serving began at hour 12 at $2/h, with
    100 requests/s and 2,000 tokens/s; the history ends at hour 36 (serving has cost $48)."""
    training = [min(i, 10) * 40.0 for i in range(37)]
    serving = [max(i - 12, 0) * 2.0 for i in range(37)]
    requests = [max(i - 12, 0) * 100 * HOUR for i in range(37)]
    tokens = [max(i - 12, 0) * 2000 * HOUR for i in range(37)]
    return ModelHistory("gpt", hourly(training), hourly(serving), hourly(requests), hourly(tokens))


def test_the_crossover_is_projected_at_the_current_serving_rate() -> None:
    now = T0 + timedelta(hours=36)
    row = cost_report.summarize(gpt_history(), now)
    assert row.training_usd == 400.0
    assert row.serving_usd == 48.0
    assert row.training_usd_per_hour == 0.0
    assert row.serving_usd_per_hour == pytest.approx(2.0)
    assert row.usd_per_million_requests == pytest.approx(2.0 / (100 * HOUR) * 1e6)  # $5.56
    assert row.usd_per_million_tokens == pytest.approx(2.0 / (2000 * HOUR) * 1e6)  # $0.28
    # ($400 - $48) / $2 per hour = 176 hours after hour 36: 2026-12-09 20:00 UTC.
    assert row.crossover == datetime(2026, 12, 9, 20, 0, tzinfo=UTC)
    assert not row.crossed
    assert "2026-12-09 20:00 UTC" in cost_report.table([row])


def test_a_crossover_already_in_the_history_is_dated_where_it_happened() -> None:
    training = hourly([10.0] * 6)
    serving = hourly([5.0 * i for i in range(6)])  # $5/h: reaches $10 at hour 2
    history = ModelHistory("small", training, serving, Series(), Series())
    row = cost_report.summarize(history, T0 + timedelta(hours=5))
    assert row.crossed
    assert row.crossover == T0 + timedelta(hours=2)
    assert row.usd_per_million_requests is None  # no request counter: no per-request price
    assert "passed 2026-12-01 02:00 UTC" in cost_report.table([row])


def test_training_still_running_moves_the_crossover_and_a_slower_serving_never_crosses() -> None:
    # Training at $10/h ($100 so far), serving at $30/h ($30 so far): they meet 70 / (30 - 10) = 3.5 h on.
    running = ModelHistory("run", hourly([90.0, 100.0]), hourly([0.0, 30.0]), Series(), Series())
    row = cost_report.summarize(running, T0 + timedelta(hours=1))
    assert row.crossover == T0 + timedelta(hours=1 + 3.5)
    slow = ModelHistory("slow", hourly([90.0, 100.0]), hourly([0.0, 5.0]), Series(), Series())
    assert cost_report.summarize(slow, T0 + timedelta(hours=1)).crossover is None


def just_after_training() -> ModelHistory:
    """Sampled every 5 minutes: training ran 10 hours at $40/h ($400) and ended at hour 10; its service
    was created at once but waited at $0 for the checkpoint, then serves from hour 10 at $2/h, 100
    requests/s. The history ends at hour 10.5: the last hour still holds half an hour of training."""
    step = 300.0
    points = range(int(10.5 * HOUR / step) + 1)

    def series(value: Callable[[float], float]) -> Series:
        return Series(tuple((T0.timestamp() + i * step, value(i * step / HOUR)) for i in points))

    return ModelHistory(
        "gpt",
        series(lambda h: min(h, 10.0) * 40.0),
        series(lambda h: max(h - 10.0, 0.0) * 2.0),
        series(lambda h: max(h - 10.0, 0.0) * 100 * HOUR),
        Series(),
        training_ended=True,
    )


def test_a_finished_job_stops_counting_so_the_crossover_is_right_when_serving_starts() -> None:
    now = T0 + timedelta(hours=10.5)
    row = cost_report.summarize(just_after_training(), now)
    assert row.training_usd == 400.0
    assert row.serving_usd == pytest.approx(1.0)
    assert row.training_usd_per_hour == 0.0  # not the $20/h that the last hour saw
    assert row.serving_usd_per_hour == pytest.approx(2.0)  # since it left $0, not over the whole hour
    assert row.usd_per_million_requests == pytest.approx(2.0 / (100 * HOUR) * 1e6)
    # ($400 - $1) / $2 per hour = 199.5 hours after hour 10.5: hour 210, 2026-12-09 18:00 UTC.
    assert row.crossover == datetime(2026, 12, 9, 18, 0, tzinfo=UTC)
    # While the job still runs, its rate counts: serving at $2/h never catches $40/h.
    running = dataclasses.replace(just_after_training(), training_ended=False)
    assert cost_report.summarize(running, now).crossover is None


def test_a_status_line_gives_the_same_projection_as_the_history() -> None:
    now = T0 + timedelta(hours=36)
    at = now.timestamp()
    from_status = ModelHistory(
        "gpt",
        Series.line(at, 400.0, 0.0),
        Series.line(at, 48.0, 2.0 / HOUR),
        Series.line(at, 100 * HOUR, 100.0),
        Series.line(at, 2000 * HOUR, 2000.0),
    )
    assert cost_report.summarize(from_status, now) == cost_report.summarize(gpt_history(), now)


def test_json_and_plot(tmp_path: Path) -> None:
    now = T0 + timedelta(hours=36)
    rows = cost_report.report([gpt_history()], now)
    document = json.loads(json.dumps([r.to_dict() for r in rows]))
    assert document[0]["crossover"] == "2026-12-09T20:00:00+00:00"
    assert document[0]["servingUSD"] == 48.0
    png = tmp_path / "spend.png"
    plot([gpt_history()], rows, now, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_durations_parse_and_bad_ones_name_the_form() -> None:
    assert cost_cli.duration("90s") == 90
    assert cost_cli.duration("1h") == 3600
    assert cost_cli.duration("7d") == 7 * 86400
    with pytest.raises(argparse.ArgumentTypeError, match="30m, 1h or 7d"):
        cost_cli.duration("an hour")


def test_without_prometheus_the_status_gives_spend_and_rate_now(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kubeconfig fallback: a finished $400 job, and the service that serves it at $2/h, $48 so far."""
    from tandem.operator import cost_sources

    now = T0 + timedelta(hours=36)
    listed = {
        "trainingjobs": [
            {"metadata": {"name": "gpt"}, "status": {"phase": "Succeeded", "cost": {"usd": 400.0}}},
        ],
        "inferenceservices": [
            {
                "metadata": {"name": "chat"},
                "spec": {"model": {"trainingJobRef": {"name": "gpt"}}},
                "status": {
                    "cost": {"usd": 48.0, "hourlyUSD": 2.0},
                    "metrics": {"rps": 100.0, "tokensPerSecond": 2000.0},
                },
            },
            {"metadata": {"name": "other"}, "spec": {"model": {"uri": "s3://b/m"}}, "status": {}},
        ],
    }
    monkeypatch.setattr(cost_sources, "_items", coroutine_of(lambda plural, namespace: listed[plural]))
    rows = {
        row.model: row for row in cost_report.report(kubehttp.run(cost_sources.from_status(None, now)), now)
    }
    assert rows["gpt"] == cost_report.summarize(gpt_history(), now)  # the same answer as Prometheus' history
    assert rows[""].crossover is None  # a service with no TrainingJob: nothing to cross


def test_the_status_right_after_training_gives_the_same_crossover(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kubeconfig fallback half an hour into serving: the job Succeeded, the service at $2/h."""
    from tandem.operator import cost_sources

    now = T0 + timedelta(hours=10.5)
    job: dict[str, Any] = {"phase": "Succeeded", "cost": {"usd": 400.0}}
    listed = {
        "trainingjobs": [
            {"metadata": {"name": "gpt"}, "status": job},
        ],
        "inferenceservices": [
            {
                "metadata": {"name": "chat"},
                "spec": {"model": {"trainingJobRef": {"name": "gpt"}}},
                "status": {"cost": {"usd": 1.0, "hourlyUSD": 2.0}, "metrics": {"rps": 100.0}},
            },
        ],
    }
    monkeypatch.setattr(cost_sources, "_items", coroutine_of(lambda plural, namespace: listed[plural]))
    (row,) = cost_report.report(kubehttp.run(cost_sources.from_status(None, now)), now)
    assert row == cost_report.summarize(just_after_training(), now)
    job["phase"] = "Recovering"  # not ended: it will spend again
    (history,) = kubehttp.run(cost_sources.from_status(None, now))
    assert not history.training_ended


def test_prometheus_histories_mark_the_models_whose_training_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    """From Prometheus: a model is still training if a job of it has a phase other than Succeeded or
    Failed, or pods on nodes; the others' training spend is fixed."""
    from tandem.operator import cost_sources

    now = T0 + timedelta(hours=10.5)
    history = just_after_training()

    def matrix(model: str, phase: str, series: Series) -> dict[str, object]:
        return {"metric": {"model": model, "phase": phase}, "values": [[t, str(v)] for t, v in series.points]}

    def answer(base_url: str, path: str, params: dict[str, str]) -> list[dict[str, object]]:
        query = params["query"]
        if path == "/api/v1/query":  # the models still training: "big" only
            assert query == cost_sources.training_active_query("ml")
            return [{"metric": {"model": "big"}, "value": [now.timestamp(), "1"]}]
        if query == cost_sources.spend_query("ml"):
            return [
                matrix("gpt", "training", history.training_usd),
                matrix("gpt", "serving", history.serving_usd),
                matrix("big", "training", history.training_usd),
            ]
        return []

    monkeypatch.setattr(cost_sources, "_get", coroutine_of(answer))
    found = {
        h.model: h for h in kubehttp.run(cost_sources.from_prometheus("http://p", "ml", now, 86400.0, HOUR))
    }
    assert found["gpt"].training_ended
    assert not found["big"].training_ended
    row = cost_report.summarize(found["gpt"], now)
    assert row.crossover == datetime(2026, 12, 9, 18, 0, tzinfo=UTC)
    assert cost_report.summarize(found["big"], now).training_usd_per_hour == pytest.approx(20.0)


def test_the_status_says_how_each_model_is_allocated(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Prometheus the ALLOCATION column comes from each resource's status.cost.allocation: one
    basis when a model's resources agree, `mixed` when they do not, `-` when none says."""
    from tandem.operator import cost_sources

    now = T0 + timedelta(hours=1)

    def job(name: str, basis: str | None) -> dict[str, Any]:
        cost: dict[str, Any] = {"usd": 1.0} | ({"allocation": basis} if basis else {})
        return {"metadata": {"name": name}, "status": {"phase": "Running", "cost": cost}}

    def service(name: str, model: str, basis: str) -> dict[str, Any]:
        return {
            "metadata": {"name": name},
            "spec": {"model": {"trainingJobRef": {"name": model}}},
            "status": {"cost": {"usd": 1.0, "hourlyUSD": 1.0, "allocation": basis}},
        }

    listed = {
        "trainingjobs": [job("a", "usage"), job("b", "usage"), job("c", None)],
        "inferenceservices": [service("a-chat", "a", "usage"), service("b-chat", "b", "requests")],
    }
    monkeypatch.setattr(cost_sources, "_items", coroutine_of(lambda plural, namespace: listed[plural]))
    rows = {
        row.model: row for row in cost_report.report(kubehttp.run(cost_sources.from_status(None, now)), now)
    }
    assert {model: row.allocation for model, row in rows.items()} == {"a": "usage", "b": "mixed", "c": "-"}
    assert rows["b"].to_dict()["allocation"] == "mixed"
