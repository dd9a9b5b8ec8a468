"""The training driver through Ray Train, as the product runs it, against the same loop under torchrun.

    python bench/train_ray_vs_torchrun.py --gpus 1 --size 124m --seq-len 1024 --batch 16 --steps 60
    NCCL_NVLS_ENABLE=0 python bench/train_ray_vs_torchrun.py --gpus 8 --size 124m --seq-len 1024 --batch 16
    python bench/train_ray_vs_torchrun.py --device cpu --gpus 2 --size tiny --seq-len 64 --batch 4 \\
        --steps 12 --warmup 4 --rounds 1                                  # smoke run (gloo, any machine)

Both variants run `loop.run_builtin` on every rank, the loop a TrainingJob runs (data sampler, autocast,
gradient clipping, fused AdamW and torch.compile on a GPU, a report every step, a checkpoint at the last
step), with the same configuration and per-GPU batch, each run from a fresh checkpoint folder:
  torchrun - `python -m torch.distributed.run --standalone --nproc-per-node N` (NCCL; gloo on a CPU);
             rank 0 keeps its step reports;
  ray      - `ray_runner.run`: Ray Train's TorchTrainer with N workers on a Ray instance of its own, rank
             0's reports reaching the driver through the mailbox, with the GPU sampler thread, as a
             TrainingJob's head and `tandem train --local` run it.
Per run: the mean time per step over the steps after --warmup (compilation, the first collectives) and
before the last (the checkpoint's), from rank 0's reports (wall time between consecutive reports);
tokens/s = N x batch x seq_len over it; MFU as the loop reports it; the checkpoint's seconds; and the run's
wall time from launch to exit (the start-up of Ray or torchrun included). Rounds alternate the variants;
the table gives each variant's median over rounds and the ratio ray / torchrun.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tandem.api.common import Precision
from tandem.workloads.train.config import TrainConfig


def train_config(args: argparse.Namespace, checkpoint_dir: str) -> TrainConfig:
    gpu = args.device == "cuda"
    return TrainConfig(
        job_name="bench",
        model_size=args.size,
        dataset_uri="tandem://corpus",
        max_steps=args.steps,
        warmup_steps=10,
        seq_len=args.seq_len,
        precision=Precision.BF16 if gpu else Precision.FP32,
        num_workers=args.gpus,
        per_device_batch=args.batch,
        global_batch=args.batch * args.gpus,
        use_gpu=gpu,
        gpus_per_worker=1 if gpu else 0,
        compile=gpu,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every_steps=args.steps,
        max_failures=0,
    )


def summary(
    steps: list[dict[str, Any]], checkpoints: list[dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    """Rank 0's reports -> seconds a step (mean over the timed window), tokens/s, MFU, checkpoint seconds."""
    timed = [m for m in steps if args.warmup < m["step"] < args.steps]
    if not timed:
        raise SystemExit(f"no step reports between --warmup {args.warmup} and --steps {args.steps}")
    seconds = statistics.fmean(m["step_seconds"] for m in timed)
    mfus = [m["mfu"] for m in timed if m.get("mfu") is not None]
    return {
        "step_ms": 1000 * seconds,
        "tokens_per_s": args.gpus * args.batch * args.seq_len / seconds,
        "mfu": statistics.fmean(mfus) if mfus else None,
        "checkpoint_s": checkpoints[-1]["seconds"] if checkpoints else None,
        "steps_reported": len(steps),
    }


def run_torchrun(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out = workdir / "torchrun.json"
    config = workdir / "config.json"
    config.write_text(json.dumps(train_config(args, str(workdir / "ckpt")).to_dict()))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.gpus}",
        __file__, "--worker", str(config), str(out),
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - started
    record = json.loads(out.read_text())
    return summary(record["steps"], record["checkpoints"], args) | {"wall_s": wall}


def run_ray(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from tandem.workloads.train import ray_runner
    from tandem.workloads.train.progress import ProgressReporter

    class Recorder(ProgressReporter):
        def __init__(self) -> None:
            super().__init__()
            self.steps: list[dict[str, Any]] = []
            self.checkpoints: list[dict[str, Any]] = []

        def step(self, m: dict[str, Any]) -> None:
            self.steps.append(m)
            super().step(m)

        def checkpoint(self, ev: dict[str, Any]) -> None:
            self.checkpoints.append(ev)
            super().checkpoint(ev)

    reporter = Recorder()
    started = time.perf_counter()
    outcome = ray_runner.run(train_config(args, str(workdir / "ckpt")), reporter, quiet=True)
    wall = time.perf_counter() - started
    if outcome.status != "completed":
        raise SystemExit(f"ray run {outcome.status}: {outcome.error}")
    return summary(reporter.steps, reporter.checkpoints, args) | {"wall_s": wall}


def worker(config_path: str, out_path: str) -> None:
    """One torchrun rank: the loop a TrainingJob's ranks run, its reports kept by rank 0."""
    import torch
    import torch.distributed as dist

    from tandem.workloads.train.loop import CheckpointEvent, DistInfo, NullHooks, StepMetrics, run_builtin

    cfg = TrainConfig.from_dict(json.loads(Path(config_path).read_text()))
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if cfg.use_gpu:
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group("nccl" if cfg.use_gpu else "gloo")  # as Ray Train's TorchConfig does

    class Keep(NullHooks):
        def __init__(self) -> None:
            self.steps: list[dict[str, Any]] = []
            self.checkpoints: list[dict[str, Any]] = []

        def on_step(self, metrics: StepMetrics) -> None:
            self.steps.append(metrics.to_dict())

        def on_checkpoint(self, event: CheckpointEvent) -> None:
            self.checkpoints.append(event.to_dict())

    hooks = Keep()
    try:
        run_builtin(cfg, info, hooks)
    finally:
        dist.destroy_process_group()
    if info.is_main:
        Path(out_path).write_text(json.dumps({"steps": hooks.steps, "checkpoints": hooks.checkpoints}))


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--gpus", type=int, default=1, help="ranks (one GPU each on cuda)")
    parser.add_argument("--size", default="124m", help="built-in GPT size: tiny, small, medium, 124m, ...")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16, help="per-GPU batch")
    parser.add_argument("--steps", type=int, default=60, help="steps a run trains (the last one checkpoints)")
    parser.add_argument("--warmup", type=int, default=15, help="steps left out of the timing (compilation)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the two variants")
    parser.add_argument("--variants", default="torchrun,ray")
    args = parser.parse_args()
    if args.steps <= args.warmup + 1:
        parser.error("--steps must exceed --warmup + 1 (the timed window lies between them)")
    runners = {"torchrun": run_torchrun, "ray": run_ray}
    variants = args.variants.split(",")
    unknown = set(variants) - set(runners)
    if unknown:
        parser.error(f"--variants: unknown {', '.join(sorted(unknown))} (choose from torchrun, ray)")
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for round_ in range(args.rounds):
        for name in variants if round_ % 2 == 0 else variants[::-1]:
            with tempfile.TemporaryDirectory(prefix=f"tandem-bench-{name}-") as tmp:
                row = runners[name](args, Path(tmp))
            results[name].append(row)
            print(f"round {round_ + 1} {name}: {json.dumps(row)}", flush=True)
    print(
        f"\n{args.gpus} rank(s) on {args.device}, GPT {args.size}, "
        f"per-GPU batch {args.batch} x {args.seq_len}, "
        f"{args.steps} steps (timed {args.warmup + 1}..{args.steps - 1}), {args.rounds} round(s), medians"
    )
    print("| variant | tokens/s | ms a step | MFU | checkpoint s | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    medians: dict[str, float] = {}
    for name, rows in results.items():
        tps = statistics.median(r["tokens_per_s"] for r in rows)
        medians[name] = tps
        mfus = [r["mfu"] for r in rows if r["mfu"] is not None]
        ckpts = [r["checkpoint_s"] for r in rows if r["checkpoint_s"] is not None]
        print(
            f"| {name} | {tps:,.0f} | {statistics.median(r['step_ms'] for r in rows):.1f} | "
            f"{f'{statistics.median(mfus):.1%}' if mfus else ''} | "
            f"{f'{statistics.median(ckpts):.2f}' if ckpts else ''} | "
            f"{statistics.median(r['wall_s'] for r in rows):.0f} |"
        )
    if "ray" in medians and "torchrun" in medians:
        print(f"ray / torchrun throughput: {medians['ray'] / medians['torchrun']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
