"""SIGKILL of a whole `tandem train --local` run, then a rerun: bit-for-bit equal to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tandem.workloads.train import checkpoint as ckpt

STEPS = 60


def start(
    cmd: Callable[..., list[str]], job: Path, ckpt_dir: Path, procs: list[subprocess.Popen[str]]
) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        cmd(
            "train",
            str(job),
            "--local",
            "--checkpoint-dir",
            str(ckpt_dir),
            "--seq-len",
            "64",
            "--seed",
            "3",
            "--no-progress",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    procs.append(proc)
    return proc


def session_alive(sid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    return True
            except OSError:
                continue
    return False


def finish(proc: subprocess.Popen[str]) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


def kill_after_first_checkpoint_and_rerun(
    job: Path,
    root: Path,
    steps: int,
    spawned: list[subprocess.Popen[str]],
    wait_for: Callable[..., Any],
    tandem_cmd: Callable[..., list[str]],
) -> tuple[str, str]:
    """Run `job` twice at once (same seed) into root/killed and root/reference, SIGKILL the first after its
    first checkpoint, finish the second, rerun the first: it must resume from its newest checkpoint and
    complete. Returns the reference's and the rerun's output."""
    killed = start(tandem_cmd, job, root / "killed", spawned)
    reference = start(tandem_cmd, job, root / "reference", spawned)
    wait_for(
        (root / "killed" / "step-00000010" / ckpt.MARKER_FILE).exists,
        240,
        "the first checkpoint of the run to kill",
    )
    os.killpg(killed.pid, signal.SIGKILL)  # the driver, the local Ray cluster, the workers: everything
    killed.wait()
    wait_for(lambda: not session_alive(killed.pid), 60, "every process of the killed run to exit")
    done = [r.step for r in ckpt.list_checkpoints(root / "killed")]
    assert done, "no checkpoint survived the kill"
    assert done[-1] < steps, f"the run finished before it was killed ({done})"
    reference_out = finish(reference)
    out = finish(start(tandem_cmd, job, root / "killed", spawned))
    assert f"completed at step {steps} (resumed at step {done[-1]})" in out
    return reference_out, out


def test_sigkill_then_rerun_is_bit_exact(
    tmp_path: Path,
    spawned: list[subprocess.Popen[str]],
    wait_for: Callable[..., Any],
    write_job: Callable[..., Path],
    tandem_cmd: Callable[..., list[str]],
) -> None:
    job = write_job(tmp_path / "resume.yaml", steps=STEPS, every=10)
    kill_after_first_checkpoint_and_rerun(job, tmp_path, STEPS, spawned, wait_for, tandem_cmd)
    a = torch.load(tmp_path / "reference" / f"step-{STEPS:08d}" / ckpt.MODEL_FILE, weights_only=True)
    b = torch.load(tmp_path / "killed" / f"step-{STEPS:08d}" / ckpt.MODEL_FILE, weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed parameters differ from the uninterrupted run"
    oa = torch.load(tmp_path / "reference" / f"step-{STEPS:08d}" / ckpt.OPTIMIZER_FILE, weights_only=True)
    ob = torch.load(tmp_path / "killed" / f"step-{STEPS:08d}" / ckpt.OPTIMIZER_FILE, weights_only=True)
    for k in oa["state"]:
        assert all(torch.equal(oa["state"][k][n], ob["state"][k][n]) for n in oa["state"][k])
