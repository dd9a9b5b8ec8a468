"""The user-entrypoint helpers (`TrainContext`), on one process."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from tandem.errors import UserError
from tandem.workloads.train import checkpoint as ckpt
from tandem.workloads.train.config import TrainConfig
from tandem.workloads.train.loop import DistInfo, StepMetrics
from tandem.workloads.train.session import TrainContext, run_entrypoint, sample_indices


class Hooks:
    def __init__(self) -> None:
        self.steps: list[StepMetrics] = []
        self.checkpoints: list[Any] = []

    def on_step(self, m: StepMetrics) -> None:
        self.steps.append(m)

    def on_checkpoint(self, event: Any) -> None:
        self.checkpoints.append(event)

    def stop_requested(self) -> bool:
        return False

    def resume_hint(self) -> str | None:
        return None


def user_loop(config: dict[str, Any], ctx: TrainContext) -> None:
    model = ctx.prepare_model(torch.nn.Linear(2, 1))
    state = ctx.load_checkpoint()
    start = 0 if state is None else state["step"]
    for s in range(start, config["steps"]):
        with ctx.autocast():
            loss = model(torch.ones(1, 2)).pow(2).sum()
        ctx.report(s + 1, loss=loss.item(), samples=1)
        if (s + 1) % 2 == 0 or ctx.should_stop():
            ctx.save_checkpoint(s + 1, {"step": s + 1, "model": model.state_dict()})


seen: list[dict[str, Any]] = []


@pytest.fixture
def user_module(monkeypatch: pytest.MonkeyPatch) -> str:
    mod = ModuleType("tandem_test_user_loop")
    mod.train = user_loop  # type: ignore[attr-defined]
    mod.one_arg = seen.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return mod.__name__


def test_entrypoint_reports_and_checkpoints_then_resumes(tmp_path: Path, user_module: str) -> None:
    cfg = TrainConfig(
        job_name="u",
        entrypoint=f"{user_module}:train",
        user_config={"steps": 5},
        checkpoint_dir=str(tmp_path),
        checkpoint_keep=2,
    )
    hooks = Hooks()
    result = run_entrypoint(cfg, DistInfo(), hooks)
    assert [m.step for m in hooks.steps] == [1, 2, 3, 4, 5]  # the first step too, timed from the start
    assert all(m.step_seconds > 0 and m.samples_per_second > 0 for m in hooks.steps)
    assert hooks.steps[-1].total_steps == 5
    assert [e.step for e in hooks.checkpoints] == [2, 4]
    assert [r.step for r in ckpt.list_checkpoints(tmp_path)] == [2, 4]
    meta = ckpt.read_metadata(tmp_path / "step-00000004")
    assert meta["entrypoint"] == cfg.entrypoint
    assert meta["loss"] == hooks.steps[3].loss
    # The outcome the head prints and the operator records, as the built-in trainer's.
    assert (result.status, result.step, result.start_step) == ("completed", 5, 0)
    assert result.loss == hooks.steps[-1].loss
    assert result.checkpoint is not None
    assert result.checkpoint.uri == f"file://{tmp_path}/step-00000004"
    again = Hooks()
    resumed = run_entrypoint(
        TrainConfig.from_dict({**cfg.to_dict(), "user_config": {"steps": 6}}), DistInfo(), again
    )
    assert [e.step for e in again.checkpoints] == [6]  # resumed at 4
    assert [m.step for m in again.steps] == [5, 6]
    assert (resumed.start_step, resumed.step) == (4, 6)


def test_a_one_parameter_entrypoint_gets_its_config(user_module: str) -> None:
    result = run_entrypoint(
        TrainConfig(job_name="u", entrypoint=f"{user_module}:one_arg", user_config={"steps": 3}), DistInfo()
    )
    assert seen == [{"steps": 3}]
    assert (result.status, result.step, result.loss, result.checkpoint) == ("completed", 0, None, None)


def test_is_resume_and_resume_step_name_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    def ctx() -> TrainContext:
        return TrainContext(TrainConfig(job_name="u", checkpoint_dir=str(tmp_path)), DistInfo(), None)

    fresh = ctx()
    assert (fresh.is_resume, fresh.resume_step, fresh.load_checkpoint()) == (False, None, None)
    fresh.save_checkpoint(3, {"step": 3})
    fresh.save_checkpoint(7, {"step": 7})
    (tmp_path / "step-00000009").mkdir()  # torn: no COMPLETE marker, never resumed from
    again = ctx()
    assert (again.is_resume, again.resume_step) == (True, 7)
    assert again.load_checkpoint() == {"step": 7}
    assert not TrainContext(TrainConfig(job_name="u"), DistInfo(), None).is_resume  # no storage


def test_report_passes_lr_eval_loss_and_extra_metrics_and_tracks_the_best_eval() -> None:
    hooks = Hooks()
    ctx = TrainContext(TrainConfig(job_name="u", user_config={"steps": 10}), DistInfo(), hooks)
    ctx.report(1, loss=2.0, lr=1e-3, eval_loss=1.5, metrics={"accuracy": 0.25}, tokens=64, grad_norm=0.5)
    ctx.report(2, loss=1.0, eval_loss=1.7)
    ctx.report(2, loss=1.0)  # the same step again: nothing new to time, not reported twice
    assert [(m.step, m.lr, m.eval_loss, m.grad_norm, m.extra) for m in hooks.steps] == [
        (1, 1e-3, 1.5, 0.5, {"accuracy": 0.25}),
        (2, 0.0, 1.7, None, {}),
    ]
    assert hooks.steps[0].tokens_per_second > 0
    assert hooks.steps[0].total_steps == 10  # from the config's `steps`
    assert ctx.best_eval == (1, 1.5)
    other = Hooks()
    TrainContext(TrainConfig(job_name="u"), DistInfo(rank=1, world_size=2), other).report(1, loss=1.0)
    assert other.steps == []  # only rank 0 reports


def test_batch_indices_are_disjoint_per_step_cover_each_epoch_and_resume_identically() -> None:
    def ctx(rank: int, world: int = 2, seed: int = 0) -> TrainContext:
        cfg = TrainConfig(job_name="u", seed=seed, num_workers=world, per_device_batch=4, global_batch=8)
        return TrainContext(cfg, DistInfo(rank=rank, world_size=world), None)

    ranks = [ctx(0), ctx(1)]
    assert ranks[0].global_batch == 8
    assert (ranks[0].per_device_batch, ranks[0].accumulation_steps) == (4, 1)
    seen: list[int] = []
    for step in range(6):  # 6 steps x 8 samples = 48 = two epochs of 24
        parts = [r.batch_indices(step, 24).tolist() for r in ranks]
        assert all(len(p) == 4 for p in parts)
        assert not set(parts[0]) & set(parts[1])
        seen += parts[0] + parts[1]
    assert sorted(seen[:24]) == list(range(24))  # each epoch is a permutation of the data set
    assert sorted(seen[24:]) == list(range(24))
    assert seen[:24] != seen[24:]  # a new order each epoch
    # A pure function of (seed, step): a resumed run (a new context) at step 3 takes the same samples.
    assert ctx(1).batch_indices(4, 24).tolist() == ranks[1].batch_indices(4, 24).tolist()
    assert ctx(1, seed=1).batch_indices(4, 24).tolist() != ranks[1].batch_indices(4, 24).tolist()
    assert ranks[0].epoch(4, 24) == 1
    uncached = sample_indices(4, 24, 8, seed=0, rank=1, world_size=2)  # the context caches permutations
    assert ranks[1].batch_indices(4, 24).tolist() == uncached.tolist()
    with pytest.raises(ValueError, match="global_batch"):
        ranks[0].batch_indices(0, 24, global_batch=7)


def test_checkpoint_due_follows_every_steps_only_with_storage(tmp_path: Path) -> None:
    cfg = TrainConfig(job_name="u", checkpoint_dir=str(tmp_path), checkpoint_every_steps=5)
    ctx = TrainContext(cfg, DistInfo(), None)
    assert [s for s in range(1, 16) if ctx.checkpoint_due(s)] == [5, 10, 15]
    assert ctx.checkpoints_enabled
    bare = TrainContext(TrainConfig(job_name="u", checkpoint_every_steps=5), DistInfo(), None)
    assert not bare.checkpoint_due(5)
    assert not bare.checkpoints_enabled


def test_the_spec_seed_seeds_user_code_and_each_rank_gets_its_own_shard() -> None:
    def draw(seed: int) -> torch.Tensor:
        TrainContext(TrainConfig(job_name="u", seed=seed), DistInfo(), None)
        return torch.randn(4)

    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))
    shards = [
        list(TrainContext(TrainConfig(job_name="u"), DistInfo(rank=r, world_size=3), None).shard(range(10)))
        for r in range(3)
    ]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert TrainContext(TrainConfig(job_name="u", seed=9), DistInfo(), None).seed == 9


def test_save_without_storage_names_the_field(user_module: str) -> None:
    cfg = TrainConfig(job_name="u", entrypoint=f"{user_module}:train", user_config={"steps": 2})
    with pytest.raises(UserError, match=r"spec\.checkpoint"):
        run_entrypoint(cfg, DistInfo())
