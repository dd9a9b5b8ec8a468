"""Ray Train DDP against plain torch.distributed DDP: same model, data and step code, 2 CPU workers.

    .venv/bin/python bench/train_ddp_overhead.py [--steps 200] [--size tiny] [--repeats 2]

Both runs call Tandem's `run_builtin` (the same per-step code); only the launcher differs: Ray Train's
`TorchTrainer` (process group set up by Ray, progress relayed through the head's mailbox) versus two
processes from `torch.multiprocessing` with `init_process_group("gloo")`. Each worker uses one thread.
Reported: median and mean step time after the first 10 steps (startup excluded), tokens/s from the mean,
and the wall time of the whole run (startup included). A third row runs Ray with checkpoints every
`--ckpt-every` steps and reports their share of the training time (the checkpoint-overhead goal).
The runs alternate (plain, ray, plain, ray, ...) so background load hits both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from typing import Any

WARMUP = 10


def make_cfg(args: argparse.Namespace) -> Any:
    from tandem.workloads.train.config import DEFAULT_SEQ_LEN, TrainConfig

    return TrainConfig(
        job_name="bench",
        model_size=args.size,
        dataset_uri="tandem://corpus",
        max_steps=args.steps,
        learning_rate=1e-3,
        warmup_steps=10,
        seq_len=args.seq_len or DEFAULT_SEQ_LEN[args.size],
        per_device_batch=args.per_device,
        global_batch=args.per_device * 2,
        num_workers=2,
        sync_every=10,
    )


class Collect:
    def __init__(self) -> None:
        self.steps: list[tuple[int, float]] = []
        self.ckpt_seconds: list[float] = []

    def on_step(self, m: Any) -> None:
        self.steps.append((m.step, m.step_seconds))

    def on_checkpoint(self, ev: Any) -> None:
        self.ckpt_seconds.append(ev.seconds)

    def stop_requested(self) -> bool:
        return False

    def resume_hint(self) -> str | None:
        return None


def _plain_worker(rank: int, cfg_dict: dict[str, Any], port: int, out: Any) -> None:
    import torch
    import torch.distributed as dist

    from tandem.workloads.train.config import TrainConfig
    from tandem.workloads.train.loop import DistInfo, run_builtin

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    hooks = Collect()
    run_builtin(TrainConfig.from_dict(cfg_dict), DistInfo(rank, 2, rank), hooks)
    if rank == 0:
        out.put(hooks.steps)
    dist.destroy_process_group()


def run_plain(cfg: Any) -> tuple[list[float], float]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    t0 = time.perf_counter()
    port = 29500 + os.getpid() % 1000
    args = (cfg.to_dict(), port, q)
    mp.start_processes(_plain_worker, args=args, nprocs=2, start_method="spawn", join=False)  # type: ignore
    steps = q.get()
    wall = time.perf_counter() - t0
    return [s for n, s in steps if n > WARMUP], wall


def run_ray(cfg: Any) -> tuple[list[float], float, list[float]]:
    from tandem.workloads.train.progress import ProgressReporter
    from tandem.workloads.train.ray_runner import run

    class Rep(ProgressReporter):
        def __init__(self) -> None:
            super().__init__()
            self.steps: list[tuple[int, float]] = []
            self.ckpt_seconds: list[float] = []

        def step(self, m: dict[str, Any]) -> None:
            self.steps.append((m["step"], m["step_seconds"]))

        def checkpoint(self, ev: dict[str, Any]) -> None:
            self.ckpt_seconds.append(ev["seconds"])

    rep = Rep()
    t0 = time.perf_counter()
    out = run(cfg, rep, num_cpus=2)
    wall = time.perf_counter() - t0
    assert out.status == "completed", out
    return [s for n, s in rep.steps if n > WARMUP], wall, rep.ckpt_seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--size", default="tiny")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--per-device", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--ckpt-every", type=int, default=50)
    args = p.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    cfg = make_cfg(args)
    rows: dict[str, dict[str, list[float]]] = {}

    def add(name: str, steps: list[float], wall: float) -> None:
        r = rows.setdefault(name, {"steps": [], "wall": []})
        r["steps"] += steps
        r["wall"].append(wall)

    ckpt_share: list[float] = []
    for _ in range(args.repeats):
        add("plain torch.distributed", *run_plain(cfg))
        steps, wall, _ = run_ray(cfg)
        add("Ray Train TorchTrainer", steps, wall)
    with tempfile.TemporaryDirectory() as d:
        ccfg = replace(cfg, checkpoint_dir=d, checkpoint_every_steps=args.ckpt_every, checkpoint_keep=2)
        steps, wall, saves = run_ray(ccfg)
        add(f"Ray Train + checkpoint every {args.ckpt_every}", steps, wall)
        train_s = sum(steps) * cfg.max_steps / max(1, len(steps))
        ckpt_share.append(sum(saves) / (train_s + sum(saves)))

    tokens = cfg.global_batch * cfg.seq_len
    base = statistics.mean(rows["plain torch.distributed"]["steps"])
    print(
        f"\nmodel {args.size}, seq {cfg.seq_len}, global batch {cfg.global_batch} (2 workers x "
        f"{cfg.per_device_batch}), {cfg.max_steps} steps, {args.repeats} repeats, gloo, 1 thread/worker\n"
    )
    print("| launcher | median step ms | mean step ms | tokens/s | vs plain | wall s (with startup) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        mean = statistics.mean(r["steps"])
        median_ms = statistics.median(r["steps"]) * 1e3
        print(
            f"| {name} | {median_ms:.1f} | {mean * 1e3:.1f} | {tokens / mean:,.0f} | "
            f"{(mean / base - 1) * 100:+.1f}% | {statistics.mean(r['wall']):.1f} |"
        )
    share = ckpt_share[0] * 100
    print(f"\ncheckpoint time share at every {args.ckpt_every} steps: {share:.2f}% of training time")


if __name__ == "__main__":
    main()
