"""Ray Train DDP against plain torch.distributed DDP: same model, data and step code, 2 CPU workers.

    .venv/bin/python bench/train_ddp_overhead.py [--steps 200] [--size tiny] [--repeats 5]

Both runs call Tandem's `run_builtin` (the same per-step code); only the launcher differs: Ray Train's
`TorchTrainer` through Tandem's `ray_runner.run` exactly as `tandem train --local` runs it (Ray started
with Tandem's settings, `ray_runner.RAY_ENV`; progress relayed through the mailbox actor) versus two
processes from `torch.multiprocessing` with `init_process_group("gloo")`. Workers are alike in both: one
intra-op thread (`torch.set_num_threads(1)` here, `OMP_NUM_THREADS=1` from Ray for a 1-CPU worker), nice
0 (checked and printed). Nothing is set for the benchmark that the product does not set.

Reported: median and mean step time after the first 10 steps (startup excluded), tokens/s from the mean,
the wall time of the whole run (startup included), each repeat's medians, the load average before and
after, and the CPU that Ray's own processes (everything but the two ranks, the driver included) used
while the Ray runs trained. A third row runs Ray with checkpoints every `--ckpt-every` steps and reports
their share of the training time (the checkpoint-overhead goal). The runs alternate (plain, ray, plain,
ray, ...) so background load hits both alike.
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
TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pids: list[int] | None = None) -> dict[int, tuple[str, float, int]]:
    """pid -> (command line, CPU seconds so far, nice) of `pids` (default: every process)."""
    out: dict[int, tuple[str, float, int]] = {}
    for entry in map(str, pids) if pids is not None else os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        out[int(entry)] = (cmd, (int(fields[11]) + int(fields[12])) / TICK, int(fields[16]))
    return out


def ray_group(pid: int, cmd: str) -> str | None:
    """Which of Ray's processes this is (None: not Ray's; 'rank' for a training rank)."""
    if pid == os.getpid():
        return "driver"
    if "RayTrainWorker" in cmd:
        return "rank"
    if cmd.startswith("ray::"):
        return cmd.split(maxsplit=1)[0].split(".", maxsplit=1)[0]
    if cmd.startswith("ray-dashboard"):
        return "dashboard"
    if "site-packages/ray/" in cmd:
        for name in ("raylet", "gcs_server", "log_monitor", "dashboard", "monitor.py", "runtime_env"):
            if name in cmd:
                return name
    return None


class RayCpu:
    """CPU used by Ray's processes between two /proc snapshots taken while the ranks train.

    One scan of /proc finds Ray's processes; later samples (at most one a second, from the driver's
    progress callback) read only theirs, so that measuring costs the Ray run next to nothing.
    """

    def __init__(self) -> None:
        self.first: tuple[float, dict[int, tuple[str, float, int]]] | None = None
        self.last: tuple[float, dict[int, tuple[str, float, int]]] | None = None

    def sample(self) -> None:
        now = time.monotonic()
        if self.first is None:
            snap = {p: v for p, v in proc_cpu().items() if ray_group(p, v[0])}
            self.first = (now, snap)
        elif now - (self.last or self.first)[0] >= 1.0:
            snap = proc_cpu(list(self.first[1]))
            if any(ray_group(p, c) == "rank" for p, (c, _, _) in snap.items()):
                self.last = (now, snap)  # else the ranks are gone: the run is ending

    def groups(self) -> tuple[float, dict[str, float], list[int]]:
        """(seconds, CPU seconds per group, nice of the ranks)."""
        if self.first is None or self.last is None:
            return 0.0, {}, []
        (t0, a), (t1, b) = self.first, self.last
        cpu: dict[str, float] = {}
        nice = []
        for pid, (cmd, sec, ni) in b.items():
            group = ray_group(pid, cmd)
            if group is None:
                continue
            prev = a.get(pid)
            cpu[group] = cpu.get(group, 0.0) + sec - (prev[1] if prev and prev[0] == cmd else 0.0)
            if group == "rank":
                nice.append(ni)
        return t1 - t0, cpu, nice


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
        out.put((hooks.steps, torch.get_num_threads(), os.nice(0)))
    dist.destroy_process_group()


FACTS: dict[str, Any] = {}


def run_plain(cfg: Any) -> tuple[list[float], float]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    t0 = time.perf_counter()
    port = 29500 + os.getpid() % 1000
    args = (cfg.to_dict(), port, q)
    mp.start_processes(_plain_worker, args=args, nprocs=2, start_method="spawn", join=False)  # type: ignore
    steps, threads, nice = q.get()
    wall = time.perf_counter() - t0
    FACTS["plain"] = f"{threads} thread(s), nice {nice}"
    return [s for n, s in steps if n > WARMUP], wall


def run_ray(cfg: Any, cpu: RayCpu | None = None) -> tuple[list[float], float, list[float]]:
    from tandem.workloads.train.progress import ProgressReporter
    from tandem.workloads.train.ray_runner import run

    class Rep(ProgressReporter):
        def __init__(self) -> None:
            super().__init__()
            self.steps: list[tuple[int, float]] = []
            self.ckpt_seconds: list[float] = []

        def step(self, m: dict[str, Any]) -> None:
            self.steps.append((m["step"], m["step_seconds"]))
            if cpu is not None and m["step"] > WARMUP:
                cpu.sample()

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
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ckpt-every", type=int, default=50)
    args = p.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    cfg = make_cfg(args)
    rows: dict[str, dict[str, list[float]]] = {}
    load_before = os.getloadavg()

    def add(name: str, steps: list[float], wall: float) -> None:
        r = rows.setdefault(name, {"steps": [], "wall": []})
        r["steps"] += steps
        r["wall"].append(wall)

    pairs: list[tuple[float, float]] = []
    cpus: list[RayCpu] = []
    for _ in range(args.repeats):
        plain, wall = run_plain(cfg)
        add("plain torch.distributed", plain, wall)
        cpus.append(RayCpu())
        ray, wall, _ = run_ray(cfg, cpus[-1])
        add("Ray Train TorchTrainer", ray, wall)
        pairs.append((statistics.median(plain), statistics.median(ray)))
    with tempfile.TemporaryDirectory() as d:
        ccfg = replace(cfg, checkpoint_dir=d, checkpoint_every_steps=args.ckpt_every, checkpoint_keep=2)
        steps, wall, saves = run_ray(ccfg)
        add(f"Ray Train + checkpoint every {args.ckpt_every}", steps, wall)
        train_s = sum(steps) * cfg.max_steps / max(1, len(steps))
        ckpt_share = sum(saves) / (train_s + sum(saves))
    load_after = os.getloadavg()
    print(
        f"\nmodel {args.size}, seq {cfg.seq_len}, global batch {cfg.global_batch} (2 workers x "
        f"{cfg.per_device_batch}), {cfg.max_steps} steps, {args.repeats} repeats, gloo\n"
    )
    print_table(rows, cfg.global_batch * cfg.seq_len)
    each = ", ".join(f"{pl * 1e3:.1f}/{ry * 1e3:.1f} ({(ry / pl - 1) * 100:+.1f}%)" for pl, ry in pairs)
    ratios = [ry / pl - 1 for pl, ry in pairs]
    print(
        f"\nmedian step ms per repeat, plain/Ray: {each}; median of the repeats' overheads "
        f"{statistics.median(ratios) * 100:+.1f}%"
    )
    print_cpu(cpus)
    before, after = (f"{a:.2f} {b:.2f} {c:.2f}" for a, b, c in (load_before, load_after))
    print(f"load average (1/5/15 min) before {before}, after {after}")
    print(f"checkpoint time share at every {args.ckpt_every} steps: {ckpt_share * 100:.2f}% of training time")


def print_table(rows: dict[str, dict[str, list[float]]], tokens: int) -> None:
    base = rows["plain torch.distributed"]["steps"]
    base_mean, base_median = statistics.mean(base), statistics.median(base)
    print("| launcher | median step ms | mean step ms | tokens/s | vs plain (median / mean) | wall s |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        mean, median = statistics.mean(r["steps"]), statistics.median(r["steps"])
        print(
            f"| {name} | {median * 1e3:.1f} | {mean * 1e3:.1f} | {tokens / mean:,.0f} | "
            f"{(median / base_median - 1) * 100:+.1f}% / {(mean / base_mean - 1) * 100:+.1f}% | "
            f"{statistics.mean(r['wall']):.1f} |"
        )


def print_cpu(cpus: list[RayCpu]) -> None:
    seconds, cpu, nice = 0.0, dict[str, float](), list[int]()
    for c in cpus:
        s, g, n = c.groups()
        seconds += s
        nice += n
        for k, v in g.items():
            cpu[k] = cpu.get(k, 0.0) + v
    rank_cpu = cpu.pop("rank", 0.0)
    if seconds:
        ray_own = sum(cpu.values())
        top = ", ".join(f"{k} {v / seconds * 100:.1f}%" for k, v in sorted(cpu.items(), key=lambda x: -x[1]))
        print(
            f"CPU while the Ray runs trained ({seconds:.0f} s): ranks {rank_cpu / seconds * 100:.0f}% of one "
            f"core, Ray's own processes {ray_own / seconds * 100:.1f}% ({top})"
        )
    print(f"workers: plain {FACTS.get('plain')}; Ray ranks nice {sorted(set(nice))}")


if __name__ == "__main__":
    main()
