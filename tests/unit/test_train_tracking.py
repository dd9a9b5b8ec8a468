"""`spec.tracking`: TensorBoard event files next to the checkpoints and an MLflow run, fed with what the
driver's progress reporter receives, from the built-in trainer and from the session API alike."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from tbevents import read_scalars
from tiny_train import tiny_gpt

from tandem.api.tracking import TENSORBOARD_DIR
from tandem.errors import UserError
from tandem.workloads.train.config import TrainConfig, from_spec
from tandem.workloads.train.loop import CheckpointEvent, DistInfo, NullHooks, StepMetrics, run_builtin
from tandem.workloads.train.progress import ProgressReporter
from tandem.workloads.train.session import TrainContext
from tandem.workloads.train.tracking import (
    MLFLOW_RUN_TAG,
    MLflowTracker,
    TensorBoardTracker,
    Trackers,
    open_tracker,
)

ENTRYPOINT_SPEC: dict[str, Any] = {
    "trainer": {"entrypoint": "tandem.workloads.examples.regression:train_loop"},
    "checkpoint": {"storage": {"pvc": "c"}},
}


class ToReporter(NullHooks):
    """The Ray runner's path in one process: rank 0's hooks feed the driver's reporter."""

    def __init__(self, reporter: ProgressReporter) -> None:
        self.reporter = reporter

    def on_step(self, metrics: StepMetrics) -> None:
        self.reporter.step(metrics.to_dict())

    def on_checkpoint(self, event: CheckpointEvent) -> None:
        self.reporter.checkpoint(event.to_dict())


def test_spec_tracking_puts_event_files_in_the_checkpoint_root_and_needs_one(tmp_path: Path) -> None:
    cfg = from_spec({**ENTRYPOINT_SPEC, "tracking": {}}, job_name="j", checkpoint_dir=f"file://{tmp_path}")
    assert cfg.tensorboard_dir == str(tmp_path / TENSORBOARD_DIR)
    assert cfg.mlflow_uri is None
    untracked = from_spec(ENTRYPOINT_SPEC, job_name="j", checkpoint_dir=str(tmp_path))
    assert (untracked.tensorboard_dir, untracked.mlflow_uri) == (None, None)  # unset: no tracking
    assert open_tracker(untracked) is None
    bare = {"trainer": ENTRYPOINT_SPEC["trainer"], "tracking": {}}
    with pytest.raises(UserError, match=r"spec\.tracking\.tensorboard.*spec\.checkpoint"):
        from_spec(bare, job_name="j")
    only_mlflow = {**bare, "tracking": {"tensorboard": False, "mlflow": {"trackingUri": "http://m:5000"}}}
    cfg = from_spec(only_mlflow, job_name="j")
    assert (cfg.tensorboard_dir, cfg.mlflow_uri, cfg.mlflow_experiment) == (None, "http://m:5000", "j")
    with pytest.raises(UserError, match=r"spec\.tracking\.mlflow\.trackingUri"):
        from_spec({**bare, "tracking": {"mlflow": {"trackingUri": "s3://b/k"}}}, job_name="j")


def test_the_built_in_trainer_writes_loss_lr_throughput_and_eval_loss(tmp_path: Path) -> None:
    cfg = tiny_gpt(
        tmp_path,
        validation_fraction=0.1,
        max_steps=6,
        global_batch=4,
        checkpoint_every_steps=3,
        eval_interval=3,
        eval_batches=2,
        tensorboard_dir=str(tmp_path / TENSORBOARD_DIR),
    )
    tracker = open_tracker(cfg)
    assert tracker is not None
    run_builtin(cfg, DistInfo(), ToReporter(ProgressReporter(tracker=tracker)))
    tracker.close("completed")
    got = read_scalars(tmp_path / TENSORBOARD_DIR)
    assert sorted(got["train/loss"]) == [1, 2, 3, 4, 5, 6]
    assert got["train/loss"][6] < got["train/loss"][1]
    assert all(v > 0 for v in got["train/learning_rate"].values())
    assert all(v > 0 for v in got["train/tokens_per_second"].values())
    assert sorted(got["eval/loss"]) == [3, 6]
    assert sorted(got["checkpoint/bytes"]) == [3, 6]


def test_session_reports_are_tracked_like_the_built_in_trainers(tmp_path: Path) -> None:
    reporter = ProgressReporter(tracker=TensorBoardTracker(tmp_path, job="u"))
    ctx = TrainContext(TrainConfig(job_name="u", user_config={"steps": 3}), DistInfo(), ToReporter(reporter))
    ctx.report(1, loss=0.9, lr=0.01, samples=32, metrics={"accuracy": 0.5})
    ctx.report(2, loss=0.7, samples=32, eval_loss=0.8)
    assert reporter.tracker is not None
    reporter.tracker.close("completed")
    got = read_scalars(tmp_path)
    assert got["train/loss"] == pytest.approx({1: 0.9, 2: 0.7})
    assert got["eval/loss"] == pytest.approx({2: 0.8})
    assert got["accuracy"] == {1: 0.5}
    assert got["train/learning_rate"] == pytest.approx({1: 0.01})  # step 2 reported none: left out
    assert set(got["train/samples_per_second"]) == {1, 2}
    assert "train/tokens_per_second" not in got  # no tokens reported: absent, not 0


def test_a_resumed_job_adds_a_file_that_continues_the_same_tags(tmp_path: Path) -> None:
    for attempt, steps in ((0, (1, 2)), (1, (3, 4))):
        tb = TensorBoardTracker(tmp_path, job="j", attempt=attempt)
        for s in steps:
            tb.step({"step": s, "loss": 1.0 / s})
        tb.close("stopped" if attempt == 0 else "completed")
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    assert read_scalars(tmp_path)["train/loss"] == pytest.approx({1: 1.0, 2: 0.5, 3: 1 / 3, 4: 0.25})


def test_an_unwritable_event_folder_names_the_field(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match=r"spec\.tracking\.tensorboard"):
        TensorBoardTracker(blocker / TENSORBOARD_DIR, job="j")


def test_a_failing_tracker_never_stops_the_others(tmp_path: Path) -> None:
    class Broken:
        def step(self, m: Any) -> None:
            raise OSError("disk full")

        def checkpoint(self, ev: Any) -> None:
            raise OSError("disk full")

        def close(self, status: str) -> None:
            raise OSError("disk full")

    tb = TensorBoardTracker(tmp_path, job="j")
    both = Trackers([Broken(), tb])
    both.step({"step": 1, "loss": 2.0})
    both.checkpoint({"step": 1, "seconds": 0.1, "bytes": 5})
    both.close("completed")
    assert read_scalars(tmp_path)["train/loss"] == {1: 2.0}


def test_mlflow_gets_one_run_per_checkpoint_root_continued_by_a_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file://{tmp_path}/mlruns"
    cfg = replace(
        from_spec(
            {**ENTRYPOINT_SPEC, "trainer": {**ENTRYPOINT_SPEC["trainer"], "config": {"steps": 4}}},
            job_name="reg",
            checkpoint_dir=str(tmp_path / "job's ckpt"),  # a quote: MLflow filters have no escapes
        ),
        mlflow_uri=uri,
        mlflow_experiment="exp",
    )
    first = open_tracker(cfg)
    assert first is not None
    first.step({"step": 1, "loss": 1.0, "lr": 0.1, "eval_loss": 1.5})
    first.checkpoint({"step": 1, "seconds": 0.1, "bytes": 100})
    first.close("stopped")
    second = open_tracker(cfg)
    assert second is not None
    second.step({"step": 2, "loss": 0.5, "extra": {"accuracy": 0.9}})
    second.close("completed")

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("exp")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the resume continued the run
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags[MLFLOW_RUN_TAG] == str(tmp_path / "job's ckpt")
    assert run.data.params["entrypoint"] == cfg.entrypoint
    assert run.data.params["config.steps"] == "4"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert history == {1: 1.0, 2: 0.5}
    assert [m.value for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [1.5]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "accuracy")] == [0.9]


def test_an_unreachable_mlflow_server_never_holds_up_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    tracker = MLflowTracker("http://127.0.0.1:9", experiment="e", run_name="r", key=None, interval=0.1)
    started = time.monotonic()
    for s in range(1, 2001):
        tracker.step({"step": s, "loss": 1.0})
    assert time.monotonic() - started < 5  # queued, not sent on the caller's thread
    tracker.close("completed", timeout=60)
    assert tracker.run_id is None
    assert tracker.errors >= 1
