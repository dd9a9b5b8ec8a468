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
from tandem.workloads.train.session import TrainContext, run_entrypoint


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


@pytest.fixture
def user_module(monkeypatch: pytest.MonkeyPatch) -> str:
    mod = ModuleType("tandem_test_user_loop")
    mod.train = user_loop  # type: ignore[attr-defined]
    mod.one_arg = lambda config: config["steps"]  # type: ignore[attr-defined]
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
    run_entrypoint(cfg, DistInfo(), hooks)
    assert [m.step for m in hooks.steps] == [2, 3, 4, 5]
    assert hooks.steps[-1].total_steps == 5
    assert [e.step for e in hooks.checkpoints] == [2, 4]
    assert [r.step for r in ckpt.list_checkpoints(tmp_path)] == [2, 4]
    assert ckpt.read_metadata(tmp_path / "step-00000004")["entrypoint"] == cfg.entrypoint
    again = Hooks()
    run_entrypoint(TrainConfig.from_dict({**cfg.to_dict(), "user_config": {"steps": 6}}), DistInfo(), again)
    assert [e.step for e in again.checkpoints] == [6]  # resumed at 4
    assert (
        run_entrypoint(
            TrainConfig(job_name="u", entrypoint=f"{user_module}:one_arg", user_config={"steps": 3}),
            DistInfo(),
        )
        == 3
    )


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
