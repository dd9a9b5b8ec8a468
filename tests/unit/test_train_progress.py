"""The progress record (the operator reads it), its rate limit, and the head's Prometheus metrics."""

from __future__ import annotations

import io
from typing import Any

import pytest

from tandem.api.trainingjob import CheckpointInfo, Progress
from tandem.workloads.train.progress import (
    ListWriter,
    PodAnnotationWriter,
    ProgressBar,
    ProgressReporter,
    TrainMetrics,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def step(n: int, total: int = 100, **kw: Any) -> dict[str, Any]:
    return {
        "step": n,
        "total_steps": total,
        "epoch": 0,
        "loss": 2.5,
        "lr": 1e-3,
        "step_seconds": 0.5,
        "samples_per_second": 32.0,
        "tokens_per_second": 4096.0,
        "mfu": None,
        **kw,
    }


CKPT = {
    "step": 10,
    "uri": "file:///ckpt/step-00000010",
    "time": "2026-11-26T10:00:00Z",
    "seconds": 0.2,
    "bytes": 1234,
}


def test_record_is_rate_limited_and_written_on_each_checkpoint() -> None:
    clock, writer = Clock(), ListWriter()
    rep = ProgressReporter(writer=writer, min_interval=5.0, clock=clock)
    rep.step(step(8))
    clock.now += 1
    rep.step(step(9))  # within 5 s: not written
    assert [r["step"] for r in writer.records()] == [8]
    rep.checkpoint(CKPT)  # a checkpoint is written at once, and overtook step 10's report: 10 are done
    clock.now += 5
    rep.step(step(11))
    rep.flush()
    records = writer.records()
    assert [r["step"] for r in records] == [8, 10, 11, 11]
    assert records[1]["checkpoint"] == {"step": 10, "uri": CKPT["uri"], "time": CKPT["time"]}


def test_record_matches_the_operator_status_models() -> None:
    writer = ListWriter()
    rep = ProgressReporter(writer=writer)
    rep.step(step(40))
    rep.checkpoint(CKPT)
    rec = writer.records()[-1]
    assert set(rec) == {
        "step",
        "totalSteps",
        "epoch",
        "loss",
        "samplesPerSecond",
        "tokensPerSecond",
        "etaSeconds",
        "checkpoint",
        "time",
    }
    progress = Progress.model_validate({k: v for k, v in rec.items() if k not in ("checkpoint", "time")})
    assert progress.eta_seconds == 30  # 60 steps left at 2 steps/s
    assert CheckpointInfo.model_validate(rec["checkpoint"]).step == 10


def test_a_failing_writer_never_stops_training() -> None:
    class Broken:
        def write(self, value: str) -> None:
            raise ConnectionError("api server down")

    rep = ProgressReporter(writer=Broken())
    rep.step(step(1))
    rep.checkpoint(CKPT)
    assert rep.write_errors == 2
    assert rep.record is not None


def test_metrics_are_exported() -> None:
    metrics = TrainMetrics("job-a")
    rep = ProgressReporter(metrics=metrics)
    rep.step(step(5, mfu=0.4))
    rep.checkpoint(CKPT)
    text = metrics.text()
    for line in (
        'tandem_train_loss{job="job-a"} 2.5',
        'tandem_train_tokens_per_second{job="job-a"} 4096.0',
        'tandem_train_mfu_ratio{job="job-a"} 0.4',
        'tandem_train_checkpoint_bytes{job="job-a"} 1234.0',
        'tandem_train_checkpoint_save_seconds_count{job="job-a"} 1.0',
        'tandem_train_step_seconds_count{job="job-a"} 1.0',
        "tandem_train_samples_per_second",
    ):
        assert line in text


def test_progress_bar_line() -> None:
    out = io.StringIO()
    bar = ProgressBar(out, width=10)
    rep = ProgressReporter(bar=bar, bar_interval=0)
    rep.step(step(50))
    assert "step 50/100 [#####.....] loss 2.5000  4.1k tok/s  eta 0m25s" in out.getvalue()


def test_pod_writer_needs_the_downward_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POD_NAME", raising=False)
    assert PodAnnotationWriter.from_env() is None
    monkeypatch.setenv("POD_NAME", "job-head")
    monkeypatch.setenv("POD_NAMESPACE", "ns")
    w = PodAnnotationWriter.from_env()
    assert w is not None
    assert (w.pod_name, w.namespace) == ("job-head", "ns")
