"""Evaluation on held-out data, keep-best checkpoints, early stopping and the schedule from the spec,
on one process with real PyTorch (the Ray path runs the same loop)."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_train import tiny_gpt

from tandem.workloads.train import checkpoint as ckpt
from tandem.workloads.train.config import TrainConfig, from_spec
from tandem.workloads.train.loop import (
    DistInfo,
    GPTRun,
    NullHooks,
    StepMetrics,
    lr_lambda,
    make_optimizer,
    run_builtin,
)
from tandem.workloads.train.progress import ListWriter, ProgressBar, ProgressReporter, TrainMetrics


def config(tmp_path: Path, **kw: Any) -> TrainConfig:
    """A tiny GPT on the small corpus, a tenth held out, evaluated every 4 steps."""
    return tiny_gpt(tmp_path, **({"validation_fraction": 0.1, "eval_interval": 4, "eval_batches": 3} | kw))


class Recorder(NullHooks):
    def __init__(self, crash_at: int | None = None) -> None:
        self.steps: list[StepMetrics] = []
        self.crash_at = crash_at

    def on_step(self, metrics: StepMetrics) -> None:
        if metrics.step == self.crash_at:
            raise RuntimeError("killed")
        self.steps.append(metrics)


def params(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / ckpt.MODEL_FILE, weights_only=True)  # type: ignore[no-any-return]


def same_params(a: Path, b: Path) -> bool:
    pa, pb = params(a), params(b)
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def test_eval_loss_is_reported_at_each_interval_and_at_the_end_and_falls(tmp_path: Path) -> None:
    hooks = Recorder()
    result = run_builtin(config(tmp_path, max_steps=14), DistInfo(), hooks, log_every=5)
    evaluated = [(m.step, m.eval_loss) for m in hooks.steps if m.eval_loss is not None]
    assert [s for s, _ in evaluated] == [4, 8, 12, 14]  # every 4 steps and the last one
    assert evaluated == result.evals
    assert result.evals[-1][1] < result.evals[0][1] - 0.5  # the model learns what it never trained on
    # Steps that evaluate are reported even between log_every steps; the others carry no eval loss.
    assert [m.step for m in hooks.steps] == [4, 5, 8, 10, 12, 14]
    meta = ckpt.read_metadata(tmp_path / "step-00000014")
    assert meta["evaluation"]["last"] == pytest.approx(result.evals[-1][1])


def test_evaluating_never_changes_the_training_run(tmp_path: Path) -> None:
    run_builtin(config(tmp_path / "eval"), DistInfo())
    run_builtin(config(tmp_path / "plain", eval_interval=None), DistInfo())
    assert same_params(tmp_path / "eval" / "step-00000012", tmp_path / "plain" / "step-00000012")


def test_the_same_held_out_samples_are_evaluated_every_time(tmp_path: Path) -> None:
    run = GPTRun(config(tmp_path), DistInfo())
    assert run.evaluate() == run.evaluate()  # no training in between: the same samples give the same loss


def test_resume_is_bit_exact_with_evaluation_and_restores_the_best_so_far(tmp_path: Path) -> None:
    cfg = config(tmp_path / "full", keep_best=True, early_stop_patience=50)
    full = run_builtin(cfg, DistInfo())
    part = replace(cfg, checkpoint_dir=str(tmp_path / "part"))
    with pytest.raises(RuntimeError, match="killed"):
        run_builtin(part, DistInfo(), Recorder(crash_at=10))
    resumed = run_builtin(part, DistInfo())
    assert resumed.start_step == 8
    assert same_params(tmp_path / "full" / "step-00000012", tmp_path / "part" / "step-00000012")
    assert resumed.evals == full.evals[-1:]  # step 12's evaluation, equal to the uninterrupted run's
    a = torch.load(tmp_path / "full" / "step-00000012" / ckpt.TRAINER_STATE_FILE, weights_only=False)
    b = torch.load(tmp_path / "part" / "step-00000012" / ckpt.TRAINER_STATE_FILE, weights_only=False)
    assert a["eval"] == b["eval"]
    assert a["eval"]["best"] == min(loss for _, loss in full.evals)


def test_early_stopping_ends_the_run_successfully_and_keeps_the_best_checkpoint(tmp_path: Path) -> None:
    # minDelta so large that no evaluation after the first counts as an improvement: it stays the best,
    # and the run stops after `patience` evaluations without one.
    cfg = config(
        tmp_path,
        max_steps=40,
        eval_interval=2,
        checkpoint_every_steps=1,
        checkpoint_keep=2,
        keep_best=True,
        early_stop_patience=3,
        early_stop_min_delta=100.0,
    )
    result = run_builtin(cfg, DistInfo())
    assert result.status == "completed"
    assert result.early_stopped
    assert result.step == 8  # evaluations at 2 (best), 4, 6, 8: three without improvement
    assert [s for s, _ in result.evals] == [2, 4, 6, 8]
    assert result.best_eval == result.evals[0]
    # The newest two and the best are kept; every other checkpoint was pruned.
    assert [r.step for r in ckpt.list_checkpoints(tmp_path)] == [2, 7, 8]
    best = ckpt.read_metadata(tmp_path / "step-00000002")
    assert best["evaluation"]["bestStep"] == 2
    assert best["evaluation"]["best"] == pytest.approx(result.evals[0][1])


def test_keep_best_checkpoints_each_improvement_between_regular_checkpoints(tmp_path: Path) -> None:
    cfg = config(tmp_path, max_steps=9, eval_interval=3, checkpoint_every_steps=100, keep_best=True)
    result = run_builtin(cfg, DistInfo())
    assert [loss for _, loss in result.evals] == sorted((loss for _, loss in result.evals), reverse=True)
    assert [r.step for r in ckpt.list_checkpoints(tmp_path)] == [3, 6, 9]  # each evaluation improved


def test_the_schedule_and_optimizer_come_from_the_spec() -> None:
    builtin: dict[str, Any] = {
        "dataset": {"uri": "tandem://corpus-small"},
        "maxSteps": 100,
        "learningRate": 0.01,
    }
    raw = {
        "trainer": {
            "builtin": builtin
            | {
                "optimizer": {
                    "warmupSteps": 10,
                    "decay": "linear",
                    "minLearningRate": 0.001,
                    "beta1": 0.8,
                    "beta2": 0.9,
                    "weightDecay": 0.05,
                    "maxGradNorm": 0.0,
                },
            }
        },
        "precision": "fp32",
    }
    cfg = from_spec(raw, job_name="j")
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1)  # warmup: (step + 1) / 10
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.55)  # halfway down the line from 1 to the floor 0.1
    assert f(100) == pytest.approx(0.1)
    assert f(1000) == pytest.approx(0.1)
    optimizer = make_optimizer(torch.nn.Linear(4, 4), cfg, torch.device("cpu"))
    assert [g["betas"] for g in optimizer.param_groups] == [(0.8, 0.9), (0.8, 0.9)]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]  # the matrix only
    assert cfg.grad_clip == 0.0
    constant = from_spec(
        raw | {"trainer": {"builtin": builtin | {"optimizer": {"decay": "constant"}}}}, job_name="j"
    )
    assert [lr_lambda(constant)(s) for s in (9, 10, 50, 99)] == [1.0, 1.0, 1.0, 1.0]  # warmup min(100, 10)


def test_without_clipping_large_gradients_reach_the_optimizer(tmp_path: Path) -> None:
    """maxGradNorm 0 turns clipping off: the reported norm is the raw one, and the update is larger."""

    def first_update(clip: float) -> tuple[float, float]:
        run = GPTRun(config(tmp_path, grad_clip=clip, learning_rate=0.1, warmup_steps=1), DistInfo())
        before = run.raw_model.wte.weight.detach().clone()
        run.train_step(measure_grad_norm=True)
        assert run.grad_norm is not None
        return float(run.grad_norm), float((run.raw_model.wte.weight.detach() - before).abs().sum())

    (norm_clipped, moved_clipped), (norm_raw, moved_raw) = first_update(1e-3), first_update(0.0)
    assert norm_clipped == pytest.approx(norm_raw)  # the norm before clipping, either way
    assert moved_raw > moved_clipped


def test_eval_loss_reaches_the_progress_record_metrics_and_bar() -> None:
    writer, metrics = ListWriter(), TrainMetrics("j")
    stream = io.StringIO()
    rep = ProgressReporter(
        writer=writer, metrics=metrics, bar=ProgressBar(stream), min_interval=0, bar_interval=0
    )
    base = {"total_steps": 10, "epoch": 0, "loss": 2.0, "lr": 1e-3, "step_seconds": 0.1}
    base |= {"samples_per_second": 1.0, "tokens_per_second": 2.0}
    rep.step({"step": 3, **base})
    rep.step({"step": 4, **base, "eval_loss": 1.75})
    rep.step({"step": 5, **base})
    records = writer.records()
    assert "evalLoss" not in records[0]
    assert (records[1]["evalLoss"], records[1]["evalStep"]) == (1.75, 4)
    assert (records[2]["evalLoss"], records[2]["evalStep"]) == (1.75, 4)  # carried until the next one
    assert 'tandem_train_eval_loss{job="j"} 1.75' in metrics.text()
    assert "eval 1.7500" in stream.getvalue().splitlines()[-1]
