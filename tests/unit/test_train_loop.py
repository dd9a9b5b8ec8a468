"""The Ray-independent training loop on one process: learning, exact resume, precisions, sampler."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_train import tiny_gpt

from tandem.workloads.models.gpt import GPT
from tandem.workloads.train import checkpoint as ckpt
from tandem.workloads.train.data import WindowSampler, load_tokens, micro_batch_first_sample
from tandem.workloads.train.loop import DistInfo, StepMetrics, lr_lambda, run_builtin


def params(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / ckpt.MODEL_FILE, weights_only=True)  # type: ignore[no-any-return]


class Recorder:
    def __init__(self) -> None:
        self.steps: list[StepMetrics] = []

    def on_step(self, m: StepMetrics) -> None:
        self.steps.append(m)

    def on_checkpoint(self, event: object) -> None:
        pass

    def stop_requested(self) -> bool:
        return len(self.steps) >= 3

    def resume_hint(self) -> str | None:
        return None


class Crash(Exception):
    pass


class CrashAt(Recorder):
    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def on_step(self, m: StepMetrics) -> None:
        if m.step == self.step:
            raise Crash

    def stop_requested(self) -> bool:
        return False


def test_loss_drops_and_checkpoints_are_written(tmp_path: Path) -> None:
    result = run_builtin(tiny_gpt(tmp_path, max_steps=16), DistInfo())
    assert result.status == "completed"
    assert result.step == 16
    assert result.history[-1] < result.history[0] - 1.0
    assert [r.step for r in ckpt.list_checkpoints(tmp_path)] == [4, 8, 12, 16]
    meta = ckpt.verify(ckpt.list_checkpoints(tmp_path)[-1])
    assert meta["data"]["samplesConsumed"] == 16 * 8
    assert meta["model"]["size"] == "tiny"
    assert meta["batch"] == {"global": 8, "perDevice": 4, "accumulationSteps": 2}


def test_resume_is_bit_exact_and_skips_torn_and_corrupt_checkpoints(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    full = run_builtin(tiny_gpt(tmp_path / "full"), DistInfo())
    part_dir = tmp_path / "part"
    with pytest.raises(Crash):  # the process dies at step 10, after the checkpoint of step 8 ...
        run_builtin(tiny_gpt(part_dir), DistInfo(), CrashAt(10))
    # ... leaving a checkpoint at 8 whose data got corrupted and a torn one (no marker) at 10:
    shutil.copytree(part_dir / "step-00000008", part_dir / "step-00000010")
    (part_dir / "step-00000010" / ckpt.MARKER_FILE).unlink()
    raw = bytearray((part_dir / "step-00000008" / ckpt.OPTIMIZER_FILE).read_bytes())
    raw[-100] ^= 0x55
    (part_dir / "step-00000008" / ckpt.OPTIMIZER_FILE).write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        resumed = run_builtin(tiny_gpt(part_dir), DistInfo())
    assert "skipping corrupted checkpoint" in caplog.text
    assert resumed.start_step == 4
    assert resumed.step == 12
    a, b = params(tmp_path / "full" / "step-00000012"), params(part_dir / "step-00000012")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.history[-1] == resumed.history[-1]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_keeps_fp32_master_weights(tmp_path: Path, precision: str) -> None:
    result = run_builtin(tiny_gpt(tmp_path, precision=precision, max_steps=4), DistInfo())
    assert result.status == "completed"
    assert all(np.isfinite(result.history))
    weights = params(tmp_path / "step-00000004")
    assert all(t.dtype == torch.float32 for t in weights.values())
    state = torch.load(tmp_path / "step-00000004" / ckpt.TRAINER_STATE_FILE, weights_only=False)
    assert bool(state["scaler"]) == (precision == "fp16")  # the scaler is only enabled for fp16


def test_stop_request_checkpoints_and_returns(tmp_path: Path) -> None:
    hooks = Recorder()
    result = run_builtin(tiny_gpt(tmp_path, checkpoint_every_steps=100), DistInfo(), hooks)
    assert result.status == "stopped"
    assert result.step == 3
    assert [r.step for r in ckpt.list_checkpoints(tmp_path)] == [3]
    assert hooks.steps[0].tokens_per_second > 0
    assert hooks.steps[0].total_steps == 12


class Everything(Recorder):
    def stop_requested(self) -> bool:
        return False


def test_each_step_reports_its_gradient_norm_and_data_wait_and_no_mfu_on_a_cpu(tmp_path: Path) -> None:
    clipped, unclipped = Everything(), Everything()
    run_builtin(tiny_gpt(tmp_path / "a", max_steps=3), DistInfo(), clipped)
    run_builtin(tiny_gpt(tmp_path / "b", max_steps=3, grad_clip=0.0), DistInfo(), unclipped)
    for m in clipped.steps + unclipped.steps:
        assert m.grad_norm is not None
        assert 0 < m.grad_norm < 1e4
        assert m.data_wait_seconds is not None
        assert 0 < m.data_wait_seconds < m.step_seconds
        assert m.mfu is None  # no GPU peak to divide by: absent, not 0
    # The first step's gradients are the same either way: the norm is taken before clipping.
    assert unclipped.steps[0].grad_norm == pytest.approx(clipped.steps[0].grad_norm, rel=1e-5)


def test_sampler_is_deterministic_and_covers_each_epoch() -> None:
    tokens = load_tokens("tandem://corpus-small")
    s1, s2 = WindowSampler(tokens, 32, seed=1), WindowSampler(tokens, 32, seed=1)
    assert np.array_equal(s1.batch(1000, 8), s2.batch(1000, 8))
    starts = s1.window_starts(0, s1.windows)
    assert sorted(starts.tolist()) == [i * 32 for i in range(s1.windows)]
    assert not np.array_equal(s1.window_starts(s1.windows, 4), starts[:4])  # new epoch, new order
    b = s1.batch(0, 2)
    assert b.shape == (2, 33)
    assert np.array_equal(b[0], tokens[starts[0] : starts[0] + 33])


def test_each_step_uses_the_same_samples_whatever_the_world_size() -> None:
    one = sorted(
        micro_batch_first_sample(5, m, 0, global_batch=16, per_device=4, world_size=1) + j
        for m in range(4)
        for j in range(4)
    )
    two = sorted(
        micro_batch_first_sample(5, m, r, global_batch=16, per_device=4, world_size=2) + j
        for m in range(2)
        for r in range(2)
        for j in range(4)
    )
    assert one == two == list(range(80, 96))


def test_lr_schedule_warms_up_then_decays_to_the_floor(tmp_path: Path) -> None:
    f = lr_lambda(tiny_gpt(tmp_path, max_steps=100, warmup_steps=10, min_lr_ratio=0.1))
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.55)
    assert f(100) == pytest.approx(0.1)


def test_flops_estimate_is_six_n_plus_attention() -> None:
    from tandem.workloads.models.gpt import SIZES

    model = GPT(SIZES["124m"])
    assert model.num_parameters() == pytest.approx(124.5e6, rel=0.01)
    assert model.flops_per_token(1024) == pytest.approx(6 * 123.7e6 + 12 * 12 * 768 * 1024, rel=0.01)
