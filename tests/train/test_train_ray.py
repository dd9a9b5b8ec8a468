"""Ray Train + PyTorch DDP on CPU: 2 workers learn and checkpoint; a killed worker is recovered."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from rayguard import RunSessions
from tiny_train import tiny_gpt

from tandem.workloads.train import checkpoint as ckpt
from tandem.workloads.train.config import TrainConfig
from tandem.workloads.train.loop import StepMetrics
from tandem.workloads.train.progress import ListWriter, ProgressReporter, TrainMetrics
from tandem.workloads.train.ray_runner import RAY_ENV, Mailbox, RayHooks, RunOutcome, apply_ray_env, run


def config(tmp_path: Path, **kw: Any) -> TrainConfig:
    settings: dict[str, Any] = {
        "job_name": "ddp",
        "max_steps": 30,
        "warmup_steps": 3,
        "seq_len": 64,
        "global_batch": 16,
        "num_workers": 2,
        "checkpoint_every_steps": 10,
        "checkpoint_keep": 2,
        "sync_every": 5,
    }
    return tiny_gpt(tmp_path, **(settings | kw))


def test_two_worker_ddp_lowers_loss_and_checkpoints(ray_cluster: None, tmp_path: Path) -> None:
    writer, metrics = ListWriter(), TrainMetrics("ddp")
    outcome = run(config(tmp_path), ProgressReporter(writer=writer, metrics=metrics, min_interval=0))
    assert outcome.status == "completed"
    assert outcome.step == 30
    assert outcome.start_step == 0
    records = writer.records()
    assert records[-1]["step"] == 30
    assert records[-1]["totalSteps"] == 30
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    assert records[-1]["checkpoint"]["uri"] == f"file://{tmp_path}/step-00000030"
    assert [r.step for r in ckpt.list_checkpoints(tmp_path)] == [20, 30]  # keep: 2
    meta = ckpt.verify(ckpt.list_checkpoints(tmp_path)[-1])
    assert meta["worldSize"] == 2
    assert meta["batch"]["accumulationSteps"] == 2
    assert 'tandem_train_checkpoints_total{job="ddp"} 3.0' in metrics.text()
    assert list((tmp_path / ".ray-train").glob("*/pointer-00000030-*/pointer.json"))  # Ray's pointer
    assert 'tandem_train_step_seconds_count{job="ddp"} 30.0' in metrics.text()  # every step arrived
    text = metrics.text()
    assert 'tandem_train_data_wait_seconds_count{job="ddp"} 30.0' in text  # rank 0's wait, every step
    assert 'tandem_train_grad_norm{job="ddp"}' in text
    assert 'tandem_train_restarts_total{job="ddp"} 0.0' in text
    assert "tandem_train_mfu_ratio{" not in text  # CPU ranks: no MFU, no GPU series
    assert "tandem_train_gpu_memory_allocated_bytes{" not in text


def test_rank0_sends_steps_in_batches_and_learns_of_a_stop_from_the_reply(
    ray_cluster: None, wait_for: Callable[..., Any]
) -> None:
    import ray

    mailbox: Any = ray.remote(num_cpus=0)(Mailbox).remote()
    rank0, rank1 = RayHooks(mailbox, 0, interval=0.05), RayHooks(mailbox, 1, interval=0.05)
    try:
        for step in range(1, 51):
            rank0.on_step(StepMetrics(step, 50, 0, 2.0, 1e-3, 0.01, 800.0, 1e5))
        assert not rank0.stop_requested()
        mailbox.request_stop.remote()
        wait_for(rank0.stop_requested, 10, "rank 0 to learn of the stop request")
        assert not rank1.stop_requested()  # only rank 0 asks; the ranks agree at the next sync step
        rank0.on_step(StepMetrics(51, 51, 0, 2.0, 1e-3, 0.01, 800.0, 1e5))
    finally:
        rank0.close()
        rank1.close()
    steps = ray.get(mailbox.drain.remote()).steps
    assert [m["step"] for m in steps] == list(range(1, 52))  # every step, the last one flushed by close()


def test_ray_settings_never_override_the_environment() -> None:
    env = apply_ray_env({"RAY_worker_niceness": "5"})
    assert env["RAY_worker_niceness"] == "5"
    assert {k: v for k, v in env.items() if k != "RAY_worker_niceness"} == {
        k: v for k, v in RAY_ENV.items() if k != "RAY_worker_niceness"
    }


def train_worker_pids() -> list[int]:
    """PIDs of this run's Ray Train worker processes (title `ray::RayTrainWorker...`), in pytest's session
    as the module's in-process Ray is: a worker of another run on this host is never the one killed."""
    return sorted(pid for pid, cmd in RunSessions().ray_processes().items() if "RayTrainWorker" in cmd)


def test_killing_one_ray_worker_mid_run_still_completes(
    ray_cluster: None, tmp_path: Path, wait_for: Callable[..., Any]
) -> None:
    cfg = config(tmp_path, max_steps=60, checkpoint_every_steps=5, max_failures=2, checkpoint_keep=3)
    box: dict[str, RunOutcome] = {}
    metrics = TrainMetrics("ddp")
    thread = threading.Thread(target=lambda: box.update(out=run(cfg, ProgressReporter(metrics=metrics))))
    thread.start()
    wait_for((tmp_path / "step-00000005" / ckpt.MARKER_FILE).exists, 120, "the first checkpoint")
    pids = wait_for(train_worker_pids, 30, "the Ray Train worker processes")
    assert os.getpriority(os.PRIO_PROCESS, pids[-1]) == 0  # RAY_ENV: ranks at normal priority, not 15
    os.kill(pids[-1], signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive()
    outcome = box["out"]
    assert outcome.status == "completed"
    assert outcome.step == 60
    assert outcome.start_step is not None
    assert 5 <= outcome.start_step < 60
    assert 'tandem_train_restarts_total{job="ddp"} 1.0' in metrics.text()  # the one Ray Train restart


def test_stop_request_checkpoints_then_a_new_run_resumes_there(
    ray_cluster: None, tmp_path: Path, wait_for: Callable[..., Any]
) -> None:
    cfg = config(tmp_path, max_steps=400, checkpoint_every_steps=5, checkpoint_keep=3)
    stop = threading.Event()
    box: dict[str, RunOutcome] = {}
    thread = threading.Thread(target=lambda: box.update(out=run(cfg, ProgressReporter(), stop=stop)))
    thread.start()
    wait_for((tmp_path / "step-00000005" / ckpt.MARKER_FILE).exists, 120, "the first checkpoint")
    stop.set()  # what SIGTERM does in the head and in `tandem train --local`
    thread.join(timeout=300)
    stopped = box["out"]
    assert stopped.status == "stopped"
    assert stopped.step is not None
    assert stopped.step < 400
    assert stopped.step % cfg.sync_every == 0  # the ranks agreed at a sync step
    assert ckpt.list_checkpoints(tmp_path)[-1].step == stopped.step
    resumed = run(replace(cfg, max_steps=stopped.step + 5), ProgressReporter())
    assert resumed.status == "completed"
    assert resumed.start_step == stopped.step


def test_bad_config_fails_before_ray_or_torch_start(
    tmp_path: Path, write_job: Callable[..., Path], tandem_cmd: Callable[..., list[str]]
) -> None:
    job = write_job(tmp_path / "bad.yaml", steps=10, every=5, size="huge")
    code = (
        "import sys; from tandem.cli import main; rc = main(sys.argv[1:]); "
        "print(rc, 'ray' in sys.modules, 'torch' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "train", str(job), "--local"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.stdout.split() == ["1", "False", "False"]
    assert "spec.trainer.builtin.size" in proc.stderr
    missing = write_job(tmp_path / "missing.yaml", steps=10, every=5, dataset={"uri": "file:///no/such/file"})
    proc = subprocess.run(
        tandem_cmd("train", str(missing), "--local"), capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 1
    assert "spec.trainer.builtin.dataset.uri" in proc.stderr


@pytest.mark.parametrize("mode", ["head", "worker"])
def test_pod_commands_outside_a_pod_explain_themselves(
    mode: str, tandem_cmd: Callable[..., list[str]]
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    proc = subprocess.run(
        tandem_cmd("train", mode), capture_output=True, text=True, timeout=60, check=False, env=env
    )
    assert proc.returncode == 1
    assert "TANDEM_RUN" in proc.stderr
    assert "--local" in proc.stderr


def test_two_ranks_evaluate_disjoint_shards_agree_on_early_stopping_and_report_eval_loss(
    ray_cluster: None, tmp_path: Path
) -> None:
    """Each rank evaluates its own samples and one all-reduce averages them: the 2-rank loss equals one
    process evaluating both shards on the same checkpoint. minDelta 100 makes only the first evaluation
    an improvement, so both ranks must decide to stop at the same step (or a collective would hang)."""
    from tandem.workloads.train.loop import DistInfo, GPTRun

    cfg = config(
        tmp_path,
        max_steps=60,
        validation_fraction=0.1,
        eval_interval=4,
        eval_batches=2,
        keep_best=True,
        early_stop_patience=2,
        early_stop_min_delta=100.0,
        checkpoint_every_steps=100,
    )
    writer, metrics = ListWriter(), TrainMetrics("ddp")
    outcome = run(cfg, ProgressReporter(writer=writer, metrics=metrics, min_interval=0))
    assert outcome.status == "completed"
    assert outcome.step == 12  # evaluations at 4 (best), 8, 12: two without improvement
    assert outcome.early_stopped
    evals = {r["evalStep"]: r["evalLoss"] for r in writer.records() if "evalLoss" in r}
    assert sorted(evals) == [4, 8, 12]
    assert f'tandem_train_eval_loss{{job="ddp"}} {evals[12]}' in metrics.text()
    assert [r.step for r in ckpt.list_checkpoints(tmp_path)] == [4, 12]  # the best, and the last
    assert outcome.best_eval_step == 4
    assert outcome.best_eval_loss == pytest.approx(evals[4], abs=1e-5)
    best = ckpt.list_checkpoints(tmp_path)[0]
    one = GPTRun(replace(cfg, num_workers=1, global_batch=4, eval_batches=4), DistInfo())
    one.load(best)
    assert one.evaluate() == pytest.approx(evals[4], rel=1e-5)
