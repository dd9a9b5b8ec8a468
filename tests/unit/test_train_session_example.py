"""The session-API example (an MLP regressor, not the GPT) on one process: it learns, and a run
stopped and resumed ends bit for bit where an uninterrupted one does."""

from __future__ import annotations

from pathlib import Path

import torch

from tandem.workloads.train import checkpoint as ckpt
from tandem.workloads.train.config import TrainConfig
from tandem.workloads.train.loop import DistInfo, StepMetrics
from tandem.workloads.train.session import run_entrypoint

ENTRYPOINT = "tandem.workloads.examples.regression:train_loop"
CONFIG = {"steps": 40, "samples": 512, "hidden": 32, "evalEvery": 10, "learningRate": 0.02}


class StopAfter:
    """Hooks that ask to stop once `after` steps were reported (what SIGTERM does)."""

    def __init__(self, after: int | None = None) -> None:
        self.after = after
        self.steps: list[StepMetrics] = []

    def on_step(self, m: StepMetrics) -> None:
        self.steps.append(m)

    def on_checkpoint(self, event: object) -> None:
        pass

    def stop_requested(self) -> bool:
        return self.after is not None and len(self.steps) >= self.after

    def resume_hint(self) -> str | None:
        return None


def cfg(root: Path) -> TrainConfig:
    return TrainConfig(
        job_name="regression",
        entrypoint=ENTRYPOINT,
        user_config=CONFIG,
        seed=7,
        precision="fp32",  # type: ignore[arg-type]
        per_device_batch=16,
        global_batch=32,
        checkpoint_dir=str(root),
        checkpoint_every_steps=15,
    )


def model_at(root: Path, step: int) -> dict[str, torch.Tensor]:
    state = torch.load(root / ckpt.checkpoint_name(step) / ckpt.USER_STATE_FILE, weights_only=False)
    return state["model"]  # type: ignore[no-any-return]


def test_the_example_learns_and_a_stopped_run_resumes_bit_exact(tmp_path: Path) -> None:
    full = StopAfter()
    result = run_entrypoint(cfg(tmp_path / "full"), DistInfo(), full)
    assert (result.status, result.step) == ("completed", 40)
    evals = [m.eval_loss for m in full.steps if m.eval_loss is not None]
    assert [m.step for m in full.steps if m.eval_loss is not None] == [10, 20, 30, 40]
    assert evals[-1] < 0.7 * full.steps[0].loss  # it learns, and generalises to the held-out data
    assert full.steps[0].lr > 0
    assert result.best_eval is not None

    stopped = run_entrypoint(cfg(tmp_path / "cut"), DistInfo(), StopAfter(after=20))
    assert (stopped.status, stopped.step) == ("stopped", 20)  # at the next stop check, checkpointed
    assert [r.step for r in ckpt.list_checkpoints(tmp_path / "cut")] == [15, 20]
    rest = StopAfter()
    resumed = run_entrypoint(cfg(tmp_path / "cut"), DistInfo(), rest)
    assert (resumed.status, resumed.start_step, resumed.step) == ("completed", 20, 40)
    assert rest.steps[0].step == 21
    a, b = model_at(tmp_path / "full", 40), model_at(tmp_path / "cut", 40)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run differs from the uninterrupted one"
    assert [m.loss for m in rest.steps] == [m.loss for m in full.steps[20:]]
