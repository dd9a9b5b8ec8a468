"""Recovery through Ray Train: kill one rank mid-run, and compare the end with an uninterrupted run.

    python bench/train_recovery.py --gpus 1 --size 124m --seq-len 1024 --batch 16 --steps 250 \\
        --checkpoint-every 100 --kill-at 130
    NCCL_NVLS_ENABLE=0 python bench/train_recovery.py --gpus 8 ...   # kills the newest rank process
    python bench/train_recovery.py --device cpu --gpus 2 --size tiny --seq-len 64 --batch 4 \\
        --steps 30 --checkpoint-every 10 --kill-at 15                         # smoke run (gloo)

Two runs of the same job through `ray_runner.run`, as a TrainingJob's head runs it (the loop every rank
runs, Ray Train's TorchTrainer, `max_failures` 1): `reference` uninterrupted; `killed` with the process of
its last rank SIGKILLed once rank 0's report of step --kill-at reaches the driver (reports come in
batches, so rank 0 is a little further by then; the steps since the newest checkpoint are lost and
trained again). Ray Train starts a new worker group, the loop
resumes from the newest complete checkpoint, and the run ends at --steps. Prints: the step it resumed
from, the steps lost (the newest step the killed group reported, less the step it resumed from: at most
one checkpoint interval is the promise), the seconds from the kill to the
first step reported after it, each run's wall time, and whether the final parameters and AdamW state
equal the reference's bit for bit (else the largest difference: GPU kernels whose reductions use
atomics, such as an embedding's backward, need not repeat exactly; `--deterministic` runs both with
`spec.trainer.deterministic`, whose kernels do).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from train_ray_vs_torchrun import train_config as throughput_config

from tandem.workloads.train import checkpoint as ckpt
from tandem.workloads.train.config import TrainConfig


def train_config(args: argparse.Namespace, checkpoint_dir: Path) -> TrainConfig:
    """The job of `train_ray_vs_torchrun` (same model, data and batch), checkpointed every
    --checkpoint-every steps, allowed one restart."""
    return replace(
        throughput_config(args, str(checkpoint_dir)),
        job_name="recovery",
        checkpoint_every_steps=args.checkpoint_every,
        checkpoint_keep=3,
        max_failures=1,
        deterministic=args.deterministic,
    )


def train_worker_pids() -> list[int]:
    """This machine's Ray Train worker processes (titled `ray::RayTrainWorker...`), oldest first."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"RayTrainWorker" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return sorted(pids)


def run(args: argparse.Namespace, root: Path, kill_at: int | None) -> dict[str, Any]:
    from tandem.workloads.train import ray_runner
    from tandem.workloads.train.progress import ProgressReporter

    killed: dict[str, float] = {}

    class Watch(ProgressReporter):
        """Kills the last rank once step `kill_at` is reported; notes the newest step the killed group
        reported and when the next group reported its first."""

        def step(self, m: dict[str, Any]) -> None:
            super().step(m)
            now = time.perf_counter()
            if "restarted" in killed:
                killed.setdefault("back", now)
                return
            killed["reached"] = max(killed.get("reached", 0), m["step"])
            if kill_at is not None and "at" not in killed and m["step"] >= kill_at:
                pids = train_worker_pids()
                if not pids:
                    raise SystemExit("no Ray Train worker process found to kill")
                os.kill(pids[-1], signal.SIGKILL)
                killed["at"] = now

        def restarted(self) -> None:
            super().restarted()
            killed["restarted"] = time.perf_counter()

    started = time.perf_counter()
    box: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: box.update(out=ray_runner.run(train_config(args, root), Watch(), quiet=True))
    )
    thread.start()
    thread.join()
    outcome = box["out"]
    if outcome.status != "completed" or outcome.step != args.steps:
        raise SystemExit(f"run under {root} ended {outcome.status} at step {outcome.step}: {outcome.error}")
    row: dict[str, Any] = {"wall_s": time.perf_counter() - started, "start_step": outcome.start_step}
    if kill_at is not None:
        if "at" not in killed:
            raise SystemExit(f"the run ended before step {kill_at} was reported: nothing was killed")
        row["reached_step"] = int(killed["reached"])  # rank 0 may have gone a little further unreported
        if "back" in killed:
            row["recovery_s"] = killed["back"] - killed["at"]
    return row


def compare(a_root: Path, b_root: Path, step: int) -> tuple[bool, float]:
    """Whether the two runs' final parameters and AdamW state are equal, and the largest difference."""
    import torch

    name = ckpt.checkpoint_name(step)
    equal, largest = True, 0.0
    for file in (ckpt.MODEL_FILE, ckpt.OPTIMIZER_FILE):
        a = torch.load(a_root / name / file, weights_only=True, map_location="cpu")
        b = torch.load(b_root / name / file, weights_only=True, map_location="cpu")
        pairs = (
            [(a[k], b[k]) for k in a]
            if file == ckpt.MODEL_FILE
            else [(a["state"][k][n], b["state"][k][n]) for k in a["state"] for n in a["state"][k]]
        )
        for x, y in pairs:
            if not torch.is_tensor(x) or x.shape != y.shape:
                equal &= bool(x == y) if not torch.is_tensor(x) else False
                continue
            if not torch.equal(x, y):
                equal = False
                largest = max(largest, float((x.double() - y.double()).abs().max()))
    return equal, largest


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--gpus", type=int, default=1, help="ranks (one GPU each on cuda)")
    parser.add_argument("--size", default="124m")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16, help="per-GPU batch")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--checkpoint-every", type=int, default=40)
    parser.add_argument(
        "--kill-at", type=int, default=60, help="kill the last rank once this step is reported"
    )
    parser.add_argument(
        "--deterministic", action="store_true", help="spec.trainer.deterministic: repeatable kernels"
    )
    args = parser.parse_args()
    if not args.checkpoint_every < args.kill_at < args.steps:
        parser.error("--kill-at must lie after the first checkpoint (--checkpoint-every) and before --steps")
    with tempfile.TemporaryDirectory(prefix="tandem-bench-recovery-") as tmp:
        roots = {name: Path(tmp) / name for name in ("reference", "killed")}
        reference = run(args, roots["reference"], None)
        killed = run(args, roots["killed"], args.kill_at)
        equal, largest = compare(roots["reference"], roots["killed"], args.steps)
    lost = killed["reached_step"] - (killed["start_step"] or 0)
    print(
        f"\n{args.gpus} rank(s) on {args.device}, GPT {args.size}, per-GPU batch {args.batch} x "
        f"{args.seq_len}, {args.steps} steps, a checkpoint every {args.checkpoint_every}"
        f"{', spec.trainer.deterministic' if args.deterministic else ''}"
    )
    print("| run | wall s | last step reported | resumed from step | steps lost | kill -> next step s |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| reference | {reference['wall_s']:.0f} | | | | |")
    print(
        f"| killed | {killed['wall_s']:.0f} | {killed['reached_step']} | {killed['start_step']} | {lost} | "
        f"{killed.get('recovery_s', float('nan')):.1f} |"
    )
    print(
        "final parameters and AdamW state: "
        + ("bit-exact equal to the reference" if equal else f"differ, largest difference {largest:.3g}")
    )
    return 0 if lost <= args.checkpoint_every else 1


if __name__ == "__main__":
    sys.exit(main())
