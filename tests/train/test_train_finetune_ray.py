"""A LoRA fine-tune through real Ray: `tandem train JOB.yaml --local` with two DDP workers (gloo, CPU) starts
from a base job's checkpoint found beside its own, trains only the adapter, writes adapter-only checkpoints
naming the base, and lowers the loss on held-out text the base never saw."""

from __future__ import annotations

import random
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pretrained import train_tiny_base

from tandem.workloads.train import checkpoint as ckpt
from tandem.workloads.train.config import from_spec
from tandem.workloads.train.loop import DistInfo, GPTRun


def test_a_two_worker_lora_fine_tune_through_ray(
    tmp_path: Path,
    write_job: Callable[..., Path],
    tandem_cmd: Callable[..., list[str]],
    spawned: list[subprocess.Popen[str]],
) -> None:
    claim = tmp_path / "claim"
    train_tiny_base(claim / "base")
    rng = random.Random(3)
    pairs = [(rng.randrange(10), rng.randrange(10)) for _ in range(3000)]
    data = tmp_path / "arithmetic.txt"
    data.write_text("\n".join(f"{a} plus {b} is {a + b}." for a, b in pairs) + "\n")
    builtin: dict[str, Any] = {
        "dataset": {"uri": f"file://{data}", "validation": {"fraction": 0.1}},
        "learningRate": 0.01,
        "evaluation": {"intervalSteps": 6, "batches": 2},
        "fineTuning": {"base": {"trainingJobRef": {"name": "base"}}, "lora": {"rank": 4, "alpha": 8}},
    }
    job = write_job(tmp_path / "lora.yaml", steps=12, every=6, workers=2, **builtin)

    spec = {
        "trainer": {"builtin": {"size": "tiny", **builtin}},
        "batch": {"perDevice": 4},
        "checkpoint": {"storage": {"pvc": "c"}},
        "precision": "fp32",
    }
    before = GPTRun(
        from_spec(spec, job_name="lora", checkpoint_dir=str(claim / "lora")), DistInfo()
    ).evaluate()

    cmd = tandem_cmd("train", str(job), "--local", "--checkpoint-dir", str(claim / "lora"), "--no-progress")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    spawned.append(proc)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "completed at step 12" in out

    step = claim / "lora" / "step-00000012"
    assert (step / "adapter.pt").is_file()
    assert not (step / ckpt.MODEL_FILE).exists()
    meta = ckpt.read_metadata(step)
    assert meta["worldSize"] == 2
    assert meta["fineTuning"]["base"] == {
        "uri": ckpt.path_to_uri(claim / "base" / "step-00000030"),
        "step": 30,
        "trainingJob": "base",
    }
    assert meta["evaluation"]["last"] < before - 0.3, (before, meta["evaluation"])
