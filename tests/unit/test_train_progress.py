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


def test_a_late_step_report_never_takes_the_record_below_its_checkpoint() -> None:
    """kubectl showed STEP 122 beside CHECKPOINT 140: the ranks' batched reports of steps 121-122 came
    after the checkpoint event of step 140."""
    clock, writer = Clock(), ListWriter()
    rep = ProgressReporter(writer=writer, min_interval=0.0, clock=clock)
    rep.step(step(9))
    rep.checkpoint(CKPT)
    rep.step(step(9))  # late
    rep.step(step(12))
    assert [r["step"] for r in writer.records()] == [9, 10, 10, 12]
    assert all(r["checkpoint"]["step"] == 10 for r in writer.records()[1:])


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


def exported(metrics: TrainMetrics) -> set[str]:
    """The series names with a sample (comment lines left out)."""
    return {line.split("{")[0] for line in metrics.text().splitlines() if not line.startswith("#")}


def test_series_that_mean_nothing_are_absent_not_zero() -> None:
    metrics = TrainMetrics("cpu-run")
    rep = ProgressReporter(metrics=metrics)
    rep.step(step(1))  # a CPU run: no MFU, and a user entrypoint's report: no norm, no data wait
    names = exported(metrics)
    assert "tandem_train_loss" in names
    assert 'tandem_train_restarts_total{job="cpu-run"} 0.0' in metrics.text()  # 0 restarts means something
    for absent in (
        "tandem_train_mfu_ratio",
        "tandem_train_grad_norm",
        "tandem_train_data_wait_seconds_count",
        "tandem_train_gpu_utilization_ratio",
        "tandem_train_gpu_memory_allocated_bytes",
    ):
        assert absent not in names


def test_gradient_norm_data_wait_restarts_and_gpu_samples_are_exported() -> None:
    metrics = TrainMetrics("gpu-run")
    rep = ProgressReporter(metrics=metrics)
    rep.step(step(1, grad_norm=0.75, data_wait_seconds=0.0003))
    rep.restarted()
    rep.device(0, {"utilization": 0.9, "allocated_bytes": 2e9, "reserved_bytes": 3e9, "total_bytes": 8e10})
    rep.device(1, {"allocated_bytes": 1e9})  # a rank without NVML: memory only
    text = metrics.text()
    for line in (
        'tandem_train_grad_norm{job="gpu-run"} 0.75',
        'tandem_train_data_wait_seconds_bucket{job="gpu-run",le="0.0005"} 1.0',
        'tandem_train_data_wait_seconds_bucket{job="gpu-run",le="0.00025"} 0.0',
        'tandem_train_restarts_total{job="gpu-run"} 1.0',
        'tandem_train_gpu_utilization_ratio{job="gpu-run",rank="0"} 0.9',
        'tandem_train_gpu_memory_allocated_bytes{job="gpu-run",rank="1"} 1e+09',
        'tandem_train_gpu_memory_total_bytes{job="gpu-run",rank="0"} 8e+10',
    ):
        assert line in text
    assert 'tandem_train_gpu_utilization_ratio{job="gpu-run",rank="1"}' not in text


class FakeCuda:
    """torch.cuda's calls that the sampler makes, for a machine without a GPU."""

    def __init__(self, nvml: bool) -> None:
        self.nvml, self.utilization_calls = nvml, 0

    def get_device_properties(self, index: int) -> Any:
        return type("Props", (), {"total_memory": 80 * 2**30})()

    def memory_allocated(self, index: int) -> int:
        return 5 * 2**30

    def memory_reserved(self, index: int) -> int:
        return 6 * 2**30

    def utilization(self, index: int) -> int:
        self.utilization_calls += 1
        if not self.nvml:
            raise ModuleNotFoundError("pynvml does not seem to be installed or it can't be imported.")
        return 87


def test_gpu_sampler_reads_memory_and_leaves_utilisation_out_without_nvml() -> None:
    from tandem.workloads.train.devices import GpuSampler

    sample = GpuSampler(0, FakeCuda(nvml=True)).sample()
    assert sample == {
        "allocated_bytes": 5 * 2**30,
        "reserved_bytes": 6 * 2**30,
        "total_bytes": 80 * 2**30,
        "utilization": 0.87,
    }
    cuda = FakeCuda(nvml=False)
    sampler = GpuSampler(0, cuda)
    assert "utilization" not in sampler.sample()
    assert "utilization" not in sampler.sample()
    assert cuda.utilization_calls == 1  # NVML is not asked again every second


def test_progress_bar_line() -> None:
    out = io.StringIO()
    bar = ProgressBar(out, width=10)
    rep = ProgressReporter(bar=bar, bar_interval=0)
    rep.step(step(50))
    assert "step 50/100 [#####.....] loss 2.5000  4.1k tok/s  eta 0m25s" in out.getvalue()
    rep.step(step(51, tokens_per_second=0.0))  # a user loop on other data reports no tokens
    assert "loss 2.5000  32 samples/s  eta" in out.getvalue().splitlines()[-1]


def test_pod_writer_needs_the_downward_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POD_NAME", raising=False)
    assert PodAnnotationWriter.from_env() is None
    monkeypatch.setenv("POD_NAME", "job-head")
    monkeypatch.setenv("POD_NAMESPACE", "ns")
    w = PodAnnotationWriter.from_env()
    assert w is not None
    assert (w.pod_name, w.namespace) == ("job-head", "ns")
