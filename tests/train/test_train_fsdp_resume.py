"""SIGKILL of a whole `tandem train --local` FSDP run (Ray, 2 ranks), then a rerun: bit for bit the
uninterrupted FSDP run. The same kill and rerun as test_train_resume.py, with `spec.trainer.strategy:
fsdp`: sharded state is gathered into the checkpoint and scattered back from it exactly."""

from __future__ import annotations

import importlib
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from tandem.workloads.train import checkpoint as ckpt

# The kill-and-rerun helpers of the DDP test (pytest puts this folder on sys.path; mypy does not know it).
resume: Any = importlib.import_module("test_train_resume")
kill_and_rerun = resume.kill_after_first_checkpoint_and_rerun

STEPS = 40


def test_an_fsdp_run_killed_and_rerun_ends_bit_exact(
    tmp_path: Path,
    spawned: list[subprocess.Popen[str]],
    wait_for: Callable[..., Any],
    write_job: Callable[..., Path],
    tandem_cmd: Callable[..., list[str]],
) -> None:
    job = write_job(tmp_path / "fsdp.yaml", steps=STEPS, every=10)
    manifest = yaml.safe_load(job.read_text())
    manifest["spec"]["trainer"]["strategy"] = "fsdp"
    job.write_text(yaml.safe_dump(manifest))
    reference_out, _ = kill_and_rerun(job, tmp_path, STEPS, spawned, wait_for, tandem_cmd)
    assert "2 worker(s), fsdp" in reference_out
    last = f"step-{STEPS:08d}"
    assert ckpt.read_metadata(tmp_path / "killed" / last)["strategy"] == "fsdp"
    for name in (ckpt.MODEL_FILE, ckpt.OPTIMIZER_FILE):
        a = torch.load(tmp_path / "reference" / last / name, weights_only=True)
        b = torch.load(tmp_path / "killed" / last / name, weights_only=True)
        if name == ckpt.OPTIMIZER_FILE:
            assert a["param_groups"] == b["param_groups"]
            a = {f"{i}.{n}": t for i, s in a["state"].items() for n, t in s.items()}
            b = {f"{i}.{n}": t for i, s in b["state"].items() for n, t in s.items()}
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), (
            f"{name}: the resumed run differs from the uninterrupted one"
        )
