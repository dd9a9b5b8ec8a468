"""The tiny GPT's training settings for tests: one base, so that each test writes only what it changes.

`tiny_gpt` is the `TrainConfig` that the training, serving and metrics tests train on a CPU in seconds;
`train_tiny` runs it on this process (as one rank) and leaves its checkpoints for a test to load or serve.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandem.workloads.train.config import TrainConfig

if TYPE_CHECKING:
    from tandem.workloads.train.loop import RunResult

#: The small generated corpus: no file, no tokenizer (bytes).
SMALL_CORPUS = "tandem://corpus-small"


def tiny_gpt(checkpoint_dir: Path | str | None, **overrides: Any) -> TrainConfig:
    """The tiny GPT on the small corpus: 12 steps of 8 windows of 32 tokens (micro-batches of 4), at a
    learning rate of 3e-3 after 2 warm-up steps, seed 7, a checkpoint every 4 steps into
    `checkpoint_dir`, 5 kept. `overrides` replace any `TrainConfig` field (a misspelt one raises)."""
    base = TrainConfig(
        job_name="tiny",
        model_size="tiny",
        dataset_uri=SMALL_CORPUS,
        max_steps=12,
        learning_rate=3e-3,
        warmup_steps=2,
        seq_len=32,
        per_device_batch=4,
        global_batch=8,
        checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
        checkpoint_every_steps=4,
        checkpoint_keep=5,
        seed=7,
    )
    return replace(base, **overrides)


def train_tiny(checkpoint_dir: Path, **overrides: Any) -> RunResult:
    """Train `tiny_gpt(checkpoint_dir, **overrides)` on this process, to its last step."""
    # Imported here: the loop brings torch, which the modules that only build configs do not need.
    from tandem.workloads.train.loop import DistInfo, run_builtin

    return run_builtin(tiny_gpt(checkpoint_dir, **overrides), DistInfo())


def train_tiny_checkpoint(checkpoint_dir: Path, **overrides: Any) -> Path:
    """A model to load or serve, not to judge: 3 steps of 2 windows, one checkpoint (step 3) under
    `checkpoint_dir`, which is returned."""
    settings: dict[str, Any] = {
        "max_steps": 3,
        "warmup_steps": 1,
        "per_device_batch": 2,
        "global_batch": 2,
        "checkpoint_every_steps": 3,
    }
    train_tiny(checkpoint_dir, **(settings | overrides))
    return checkpoint_dir
