"""`tandem train JOB.yaml --local` before Ray starts: where checkpoints go, bad checkpoint roots named,
paths the Ray ranks can use; and the driver's ordering of checkpoint events among the ranks' steps."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tandem.cli import main
from tandem.workloads.train import ray_runner
from tandem.workloads.train.cli import StatusLine
from tandem.workloads.train.ray_runner import Drained, InStepOrder, RunOutcome


def write_job(path: Path, *, storage: dict[str, str], tracking: bool = False) -> Path:
    spec: dict[str, Any] = {
        "trainer": {
            "builtin": {
                "size": "tiny",
                "dataset": {"uri": "pvc://datasets/corpus.txt"},
                "maxSteps": 4,
                "sequenceLength": 32,
            }
        },
        "workers": {"replicas": 1},
        "precision": "fp32",
        "batch": {"perDevice": 2},
        "checkpoint": {"storage": storage, "everySteps": 2},
    }
    if tracking:
        spec["tracking"] = {"tensorboard": True}
    doc = {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "j"},
        "spec": spec,
    }
    path.write_text(yaml.safe_dump(doc))
    (path.parent / "data" / "datasets").mkdir(parents=True, exist_ok=True)
    (path.parent / "data" / "datasets" / "corpus.txt").write_text("to be or not to be " * 200)
    return path


def run_cli(job: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`tandem train JOB --local ARGS` in a fresh interpreter; prints whether Ray or torch was imported."""
    code = (
        "import sys; from tandem.cli import main; rc = main(sys.argv[1:]); "
        "print(rc, 'ray' in sys.modules, 'torch' in sys.modules)"
    )
    cmd = [sys.executable, "-c", code, "train", str(job), "--local", "--data-root", "data", *args]
    return subprocess.run(cmd, cwd=job.parent, capture_output=True, text=True, timeout=120, check=False)


def test_a_checkpoint_dir_that_cannot_be_written_fails_before_ray_naming_the_option(tmp_path: Path) -> None:
    job = write_job(tmp_path / "job.yaml", storage={"pvc": "ckpt"}, tracking=True)
    (tmp_path / "a-file").write_text("")
    proc = run_cli(job, "--checkpoint-dir", str(tmp_path / "a-file" / "ckpt"))
    assert proc.stdout.split() == ["1", "False", "False"]
    assert "--checkpoint-dir" in proc.stderr
    assert "Not a directory" in proc.stderr
    assert "spec.tracking" not in proc.stderr  # it named the TensorBoard folder beside the checkpoints


def test_a_bad_storage_uri_fails_before_ray_naming_the_field(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    job = write_job(tmp_path / "job.yaml", storage={"uri": f"file://{tmp_path}/a-file/ckpt"})
    proc = run_cli(job)
    assert proc.stdout.split() == ["1", "False", "False"]
    assert "spec.checkpoint.storage.uri" in proc.stderr
    assert "--checkpoint-dir" in proc.stderr  # the way out


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """`ray_runner.run` replaced by a recorder (what the local run would hand to Ray)."""
    seen: dict[str, Any] = {}

    def fake_run(cfg: Any, reporter: Any, **kw: Any) -> RunOutcome:
        seen.update(kw, cfg=cfg)
        return RunOutcome(status="completed", step=4, start_step=0)

    monkeypatch.setattr(ray_runner, "run", fake_run)
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # keep pytest's handlers
    return seen


def test_the_spec_storage_uri_is_the_local_checkpoint_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, captured: dict[str, Any]
) -> None:
    root = tmp_path / "shared" / "ckpt"
    job = write_job(tmp_path / "job.yaml", storage={"uri": f"file://{root}"})
    monkeypatch.chdir(tmp_path)
    assert main(["train", "job.yaml", "--local", "--data-root", "data", "--no-progress"]) == 0
    assert captured["cfg"].checkpoint_dir == str(root)
    assert root.is_dir()
    assert not (tmp_path / "tandem-runs").exists()
    # --checkpoint-dir still wins over the spec.
    assert main(["train", str(job), "--local", "--data-root", "data", "--checkpoint-dir", "mine"]) == 0
    assert captured["cfg"].checkpoint_dir == str(tmp_path / "mine")


def test_relative_paths_reach_the_ranks_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, captured: dict[str, Any]
) -> None:
    """The ranks run in a directory of Ray's: a relative --data-root read 0 tokens there."""
    write_job(tmp_path / "job.yaml", storage={"pvc": "ckpt"})
    monkeypatch.chdir(tmp_path)
    assert main(["train", "job.yaml", "--local", "--data-root", "data", "--no-progress"]) == 0
    cfg = captured["cfg"]
    assert captured["data_root"] == str(tmp_path / "data")
    assert cfg.dataset_uri == str(tmp_path / "data" / "datasets" / "corpus.txt")
    assert cfg.checkpoint_dir == str(tmp_path / "tandem-runs" / "j" / "checkpoints")
    assert captured["quiet"] is True  # Ray Train's INFO lines stay off the progress line


def step(n: int) -> dict[str, Any]:
    return {"step": n}


def ckpt(n: int) -> dict[str, Any]:
    return {"step": n, "uri": f"file:///c/step-{n:08d}"}


def test_checkpoints_are_passed_on_just_before_the_step_they_were_taken_at() -> None:
    order = InStepOrder()
    # Rank 0 sends checkpoints at once and steps once a second: the checkpoint at 2 comes first, the one
    # at 4 before its step has arrived at all.
    first = order.feed(Drained(steps=[step(1), step(2), step(3)], checkpoints=[ckpt(2), ckpt(4)], final=None))
    assert first == [("step", step(1)), ("checkpoint", ckpt(2)), ("step", step(2)), ("step", step(3))]
    second = order.feed(Drained(steps=[step(4), step(5)], checkpoints=[], final=None))
    assert second == [("checkpoint", ckpt(4)), ("step", step(4)), ("step", step(5))]
    # A Ray Train restart goes back to the checkpoint's step: the steps keep their order.
    third = order.feed(Drained(steps=[step(5), step(6)], checkpoints=[ckpt(6), ckpt(8)], final=None))
    assert third == [("step", step(5)), ("checkpoint", ckpt(6)), ("step", step(6))]
    assert order.rest() == [("checkpoint", ckpt(8))]  # the run ended: nothing is lost
    assert order.rest() == []


def test_other_output_goes_above_the_progress_line() -> None:
    """Ray prints the ranks' output into a terminal whose last line is the bar (no newline): it must
    clear the bar's line, write its lines, and redraw the bar below them."""
    out, err = io.StringIO(), io.StringIO()
    line = StatusLine(out, err)
    line.bar_stream.write("\rstep 1/9\033[K")
    line.stderr.write("(RayTrainWorker pid=7) WARNING skipped step-00000010\n")
    assert err.getvalue() == (
        "\rstep 1/9\033[K"
        + "\r\033[K"
        + "(RayTrainWorker pid=7) WARNING skipped step-00000010\n"
        + "\rstep 1/9\033[K"
    )
    err.seek(0)
    err.truncate()
    # A line written in parts: the bar waits for its end (an update meanwhile included).
    line.stdout.write("(pid=7) hello")
    line.bar_stream.write("\rstep 2/9\033[K")
    line.stdout.write(" world\n")
    assert out.getvalue() == "(pid=7) hello world\n"
    assert err.getvalue() == "\r\033[K" + "\rstep 2/9\033[K"
    line.bar_stream.write("\n")  # the bar closes its line: later output is left alone
    line.stderr.write("completed\n")
    assert err.getvalue().endswith("\rstep 2/9\033[K\ncompleted\n")
