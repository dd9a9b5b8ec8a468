"""A pretrained base for the fine-tuning tests: the tiny GPT trained 30 steps on the small corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tiny_train import train_tiny


def train_tiny_base(checkpoint_dir: Path, job_name: str = "base", **overrides: Any) -> None:
    """Write the base job's checkpoint (step 30; `overrides` may add earlier ones) under `checkpoint_dir`,
    in seconds on a CPU."""
    settings: dict[str, Any] = {
        "max_steps": 30,
        "warmup_steps": 3,
        "per_device_batch": 8,
        "global_batch": 8,
        "checkpoint_every_steps": 30,
        "seed": 1,
    }
    train_tiny(checkpoint_dir, job_name=job_name, **(settings | overrides))
