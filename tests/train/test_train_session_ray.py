"""Your own training code (the session-API example, an MLP regressor, as a module in the current
directory) through `tandem train --local` on real Ray with two DDP ranks: killed mid-run, then resumed
from the newest checkpoint, with steps, loss, evaluation and checkpoints reported as the built-in
trainer reports them, and TensorBoard event files beside the checkpoints."""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from tbevents import read_scalars

from tandem.workloads.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "manifests" / "examples" / "trainingjob-regression.yaml"
MODULE = REPO / "tandem" / "workloads" / "examples" / "regression.py"
TANDEM = str(Path(sys.executable).parent / "tandem")
EVERY = 20


def write_job(path: Path, steps: int) -> Path:
    """The example as a user's own module beside the job file (imported from the current directory),
    with `steps` steps, a smaller data set and more frequent checkpoints/evaluations."""
    shutil.copy(MODULE, path.parent / "my_regression.py")
    doc = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    doc["spec"]["trainer"]["entrypoint"] = "my_regression:train_loop"
    doc["spec"]["trainer"]["config"] |= {
        "steps": steps,
        "evalEvery": EVERY,
        "samples": 2048,
        "warmupSteps": 5,
    }
    doc["spec"]["checkpoint"] |= {"everySteps": EVERY, "keep": 3}
    path.write_text(yaml.safe_dump(doc))
    return path


def start(job: Path, root: Path, log: Path, procs: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    with log.open("w") as out:  # a file, not a pipe: nobody reads the run being killed
        proc = subprocess.Popen(
            # The console script, as a user runs it (`python -m` would put the current directory on the
            # driver's path by itself).
            [TANDEM, "train", str(job), "--local", "--checkpoint-dir", str(root)],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            cwd=job.parent,  # where the user's module is
        )
    procs.append(proc)
    return proc


def tracked(root: Path) -> dict[int, float]:
    """The training losses in the job's TensorBoard event files so far, by step."""
    return read_scalars(root / "tensorboard").get("train/loss", {}) if (root / "tensorboard").is_dir() else {}


def session_alive(sid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    return True
            except OSError:
                continue
    return False


def test_own_code_is_reported_checkpointed_and_resumed_after_a_kill(
    tmp_path: Path,
    spawned: list[subprocess.Popen[str]],
    wait_for: Callable[..., Any],
) -> None:
    root = tmp_path / "checkpoints"
    first = start(write_job(tmp_path / "long.yaml", 100_000), root, tmp_path / "1.log", spawned)
    wait_for((root / ckpt.checkpoint_name(EVERY) / ckpt.MARKER_FILE).exists, 240, "the first checkpoint")
    wait_for(lambda: EVERY in tracked(root), 60, "the steps to the first checkpoint in TensorBoard")
    os.killpg(first.pid, signal.SIGKILL)  # the driver, the local Ray instance, both ranks
    first.wait()
    wait_for(lambda: not session_alive(first.pid), 60, "every process of the killed run to exit")
    newest = ckpt.list_checkpoints(root)[-1].step
    assert EVERY <= newest < 100_000

    total = newest + 30
    second = start(write_job(tmp_path / "short.yaml", total), root, tmp_path / "2.log", spawned)
    assert second.wait(timeout=300) == 0, (tmp_path / "2.log").read_text()[-3000:]
    out = (tmp_path / "2.log").read_text()
    # The outcome line, as the built-in trainer's (it said "step None, loss None" for user code).
    end = re.search(rf"completed at step {total} \(resumed at step {newest}\), loss ([0-9.]+)", out)
    assert end, out[-3000:]
    assert f"last checkpoint file://{root}/{ckpt.checkpoint_name(total)}" in out
    assert re.search(rf"step {total}/{total} \[#+\] loss [0-9.]+  [0-9.k]+ samples/s .* eval [0-9.]+", out)

    meta = ckpt.verify(ckpt.list_checkpoints(root)[-1])
    assert (meta["step"], meta["worldSize"]) == (total, 2)
    assert meta["loss"] == float(end.group(1))  # the last reported loss, recorded with the checkpoint

    tb = read_scalars(root / "tensorboard")  # both runs' event files: one history
    loss = tb["train/loss"]
    assert {1, EVERY, newest + 1, total} <= set(loss)  # the killed run's steps up to a checkpoint too
    assert loss[total] < loss[1] * 0.7  # it learns
    assert set(tb["eval/loss"]) >= {EVERY, total}
    assert all(v > 0 for v in tb["train/learning_rate"].values())
    assert {1, newest + 1, total} <= set(tb["train/grad_norm"])  # report(grad_norm=)
    assert set(tb["checkpoint/bytes"]) >= {EVERY, total}
