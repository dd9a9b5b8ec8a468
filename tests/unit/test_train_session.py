"""The user-entrypoint helpers (`TrainContext`) and the pod environment, on one process."""

from __future__ import annotations

import json
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
from tandem.workloads.train.pod import PodEnv, worker_resources
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


def test_save_without_storage_names_the_field(user_module: str) -> None:
    cfg = TrainConfig(job_name="u", entrypoint=f"{user_module}:train", user_config={"steps": 2})
    with pytest.raises(UserError, match=r"spec\.checkpoint"):
        run_entrypoint(cfg, DistInfo())


SPEC = {
    "trainer": {"builtin": {"dataset": {"uri": "tandem://corpus"}}},
    "workers": {"replicas": 3, "resources": {"cpu": "2500m", "gpu": 1}},
}


def test_pod_env_follows_the_operator_contract() -> None:
    env = PodEnv.from_env(
        {
            "TANDEM_JOB_NAME": "j",
            "TANDEM_JOB_NAMESPACE": "ns",
            "TANDEM_JOB_SPEC": json.dumps(SPEC),
            "TANDEM_NUM_WORKERS": "3",
            "TANDEM_ATTEMPT": "2",
            "TANDEM_CHECKPOINT_URI": "file:///c",
            "TANDEM_RESUME_FROM": "file:///c/step-00000010",
        }
    )
    assert (env.num_workers, env.attempt, env.metrics_port) == (3, 2, 8080)
    cfg = env.train_config()
    assert cfg.resume_from == "file:///c/step-00000010"
    assert cfg.use_gpu
    assert cfg.attempt == 2
    assert worker_resources(SPEC) == (2, 1)
    with pytest.raises(UserError, match="TANDEM_JOB_SPEC"):
        PodEnv.from_env({"TANDEM_JOB_NAME": "j"})
    with pytest.raises(UserError, match="TANDEM_HEAD_ADDRESS"):
        PodEnv.from_env({"TANDEM_JOB_NAME": "j", "TANDEM_JOB_SPEC": "{}"}, need_head_address=True)
    with pytest.raises(UserError, match="TANDEM_ATTEMPT"):
        PodEnv.from_env({"TANDEM_JOB_NAME": "j", "TANDEM_JOB_SPEC": "{}", "TANDEM_ATTEMPT": "x"})
