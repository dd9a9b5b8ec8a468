"""A pretrained base for the fine-tuning tests: the tiny GPT trained 30 steps on the small corpus."""

from __future__ import annotations

from pathlib import Path

from tandem.workloads.train.config import TrainConfig
from tandem.workloads.train.loop import DistInfo, run_builtin


def train_tiny_base(checkpoint_dir: Path, job_name: str = "base") -> None:
    """Write the base job's checkpoint (step 30) under `checkpoint_dir`, in seconds on a CPU."""
    run_builtin(
        TrainConfig(
            job_name=job_name,
            model_size="tiny",
            dataset_uri="tandem://corpus-small",
            max_steps=30,
            learning_rate=3e-3,
            warmup_steps=3,
            seq_len=32,
            per_device_batch=8,
            global_batch=8,
            checkpoint_dir=str(checkpoint_dir),
            checkpoint_every_steps=30,
            seed=1,
        ),
        DistInfo(),
    )
