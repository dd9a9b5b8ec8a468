"""`spec.trainer.deterministic`: the run switches PyTorch to deterministic kernels before it builds the
model, on the built-in trainer and under a user's entrypoint alike.

The bit-for-bit result it exists for is a GPU's (`bench/train_recovery.py --deterministic`, results in
docs/benchmarks.md); on a CPU, runs repeat either way, so these tests check that the switch is thrown and
that a run still trains under it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tiny_train import tiny_gpt, train_tiny

from tandem.workloads.train.loop import DistInfo, NullHooks
from tandem.workloads.train.session import TrainContext


@pytest.fixture
def restore_determinism() -> Iterator[None]:
    """The switch is global to the process: put it back for the tests after this one."""
    import torch._inductor.config as inductor_config

    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    inductor = getattr(inductor_config, "deterministic", None)
    yield
    torch.use_deterministic_algorithms(False)
    if inductor is not None:
        inductor_config.deterministic = inductor
    if workspace is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def test_a_deterministic_run_trains_with_deterministic_kernels(
    tmp_path: Path, restore_determinism: None
) -> None:
    assert not torch.are_deterministic_algorithms_enabled()
    result = train_tiny(tmp_path, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # cuBLAS's fixed workspace
    assert result.status == "completed"
    assert result.loss is not None
    assert result.step == tiny_gpt(tmp_path).max_steps


def test_without_it_the_run_leaves_pytorch_as_it_was(tmp_path: Path, restore_determinism: None) -> None:
    train_tiny(tmp_path, max_steps=2)
    assert not torch.are_deterministic_algorithms_enabled()


def test_a_users_entrypoint_gets_deterministic_kernels_before_its_code_runs(
    tmp_path: Path, restore_determinism: None
) -> None:
    cfg = tiny_gpt(tmp_path, deterministic=True, entrypoint="mypkg.train:main", model_size=None)
    TrainContext(cfg, DistInfo(), NullHooks())
    assert torch.are_deterministic_algorithms_enabled()
