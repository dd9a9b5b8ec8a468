"""DDP against FSDP (`spec.trainer.strategy`) for the built-in GPT: throughput and memory per GPU.

Each variant runs `GPTRun.train_step()`, the exact step a TrainingJob runs (data sampler, autocast,
gradient clipping at 1.0, fused AdamW, LR schedule, torch.compile on a GPU: the whole model under DDP,
each block under FSDP), on every rank with the same per-GPU batch, so the global batch grows with the
GPUs (weak scaling). Prints, per variant: tokens/s per GPU, ms per step (the slowest rank's) and the peak
GPU memory per rank (the largest over the ranks; parameters, gradients, AdamW state and activations).

One GPU, one process (FSDP over one rank shards nothing: this is its overhead alone; `ddp` on one rank
is the plain model, as a one-worker TrainingJob runs it):
    PYTHONPATH=$PWD python3 bench/train_fsdp_vs_ddp.py --size 124m --out fsdp-1.json

N GPUs of one host, one rank per GPU (torchrun, here as the module of the python3 that holds torch;
NCCL with NVLink multicast left off); with the one-GPU results as the baseline it adds scaling
figures (per-GPU throughput at N over that at 1, and the total speed-up):
    NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD python3 -m torch.distributed.run --standalone --nproc-per-node N \\
        bench/train_fsdp_vs_ddp.py --size 124m --baseline fsdp-1.json --out fsdp-N.json

CPU smoke test (gloo, any machine; proves the script, measures nothing of interest):
    PYTHONPATH=$PWD python3 bench/train_fsdp_vs_ddp.py --device cpu --size tiny --seq-len 64 \\
        --batch 4 --steps 3 --warmup 1
    PYTHONPATH=$PWD python3 -m torch.distributed.run --standalone --nproc-per-node 2 \\
        bench/train_fsdp_vs_ddp.py --device cpu --size tiny --seq-len 64 --batch 4 --steps 3 --warmup 1

Needs torch, numpy and pydantic (no Ray, no installed tandem: PYTHONPATH points at the repository).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# NCCL reads this when a communicator is made: NVLink multicast stays off whatever the caller's shell has.
os.environ["NCCL_NVLS_ENABLE"] = "0"

import torch
import torch.distributed as tdist
from train_gpu_step import timed

from tandem.api.common import Precision
from tandem.workloads.train.config import TrainConfig
from tandem.workloads.train.loop import DistInfo, GPTRun

VARIANTS = ("ddp", "fsdp")


@dataclass
class Result:
    """One variant's figures (the slowest rank's step, the largest rank's memory)."""

    variant: str
    step_seconds: float | None = None
    tokens_per_second_per_gpu: float | None = None
    peak_memory_gib: float | None = None
    parameters: int | None = None
    error: str | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="124m", help="built-in GPT size: tiny, small, medium, 124m")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sample")
    parser.add_argument("--batch", type=int, default=16, help="samples per GPU per step (same for every N)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument(
        "--warmup", type=int, default=8, help="untimed steps first (compilation happens here)"
    )
    parser.add_argument("--precision", choices=[p.value for p in Precision], default="bf16")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: ddp, fsdp")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument(
        "--no-compile", action="store_true", help="eager mode (the default compiles on a GPU, never on a CPU)"
    )
    parser.add_argument("--baseline", type=Path, help="a one-GPU run's --out file: print scaling figures")
    parser.add_argument("--out", type=Path, help="write the results as JSON here (rank 0)")
    args = parser.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {', '.join(sorted(unknown))}; use {', '.join(VARIANTS)}")
    return args


def init_distributed(device: str) -> DistInfo:
    """torchrun's ranks, or one rank of its own (FSDP needs a process group even alone)."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
    backend = "nccl" if device == "cuda" else "gloo"
    if "RANK" in os.environ:
        tdist.init_process_group(backend)
    else:
        with socket.socket() as s:  # a free port for a one-process group
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        tdist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return DistInfo(rank, world, local)


def measure(variant: str, args: argparse.Namespace, dist: DistInfo) -> Result:
    """One variant on every rank: build the run, time its steps, read its peak memory."""
    cuda = args.device == "cuda"
    cfg = TrainConfig(
        job_name=f"bench-{variant}",
        model_size=args.size,
        dataset_uri="tandem://corpus",
        max_steps=args.steps + args.warmup + 1,
        seq_len=args.seq_len,
        precision=Precision(args.precision),
        num_workers=dist.world_size,
        per_device_batch=args.batch,
        global_batch=args.batch * dist.world_size,
        use_gpu=cuda,
        gpus_per_worker=1 if cuda else 0,
        compile=cuda and not args.no_compile,
        strategy=variant,
    )
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    run = GPTRun(cfg, dist)
    seconds = timed(run.train_step, args.steps, args.warmup)
    parameters = run.raw_model.num_parameters()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    del run
    gc.collect()
    if dist.is_main:
        print(f"{variant} done ({time.perf_counter() - started:.0f}s incl. compile)", flush=True)
    return Result(
        variant,
        step_seconds=seconds,
        tokens_per_second_per_gpu=args.batch * args.seq_len / seconds,
        peak_memory_gib=peak,
        parameters=parameters,
    )


def slowest(results: list[Result]) -> Result:
    """Every rank's figures of one variant as one: the slowest step, the largest memory."""
    errors = [r.error for r in results if r.error]
    if errors:
        return Result(results[0].variant, error=errors[0])
    worst = max(results, key=lambda r: r.step_seconds or 0.0)
    memory = [r.peak_memory_gib for r in results if r.peak_memory_gib is not None]
    return Result(
        worst.variant,
        step_seconds=worst.step_seconds,
        tokens_per_second_per_gpu=worst.tokens_per_second_per_gpu,
        peak_memory_gib=max(memory) if memory else None,
        parameters=worst.parameters,
    )


def figure(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def report(args: argparse.Namespace, world: int, results: list[Result]) -> dict[str, Any]:
    """Print the table (and scaling figures against --baseline); the JSON form of the run."""
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    params = next((r.parameters for r in results if r.parameters), None)
    print(
        f"\n{world} x {card}, GPT {args.size} ({figure(params and params / 1e6, '.1f')}M parameters), "
        f"{args.precision}, {args.batch} x {args.seq_len} tokens per GPU per step"
    )
    print("| variant | GPUs | tokens/s per GPU | step ms | peak memory per GPU (GiB) |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        if r.error:
            print(f"| {r.variant} | {world} | failed: {r.error[:200]} | | |")
            continue
        step_ms = None if r.step_seconds is None else r.step_seconds * 1000
        rate, memory = figure(r.tokens_per_second_per_gpu, ",.0f"), figure(r.peak_memory_gib, ".2f")
        print(f"| {r.variant} | {world} | {rate} | {figure(step_ms, '.1f')} | {memory} |")
    done = {r.variant: r for r in results if not r.error}
    if {"ddp", "fsdp"} <= done.keys():
        ddp, fsdp = done["ddp"], done["fsdp"]
        assert ddp.tokens_per_second_per_gpu
        assert fsdp.tokens_per_second_per_gpu
        print(f"fsdp / ddp throughput: {fsdp.tokens_per_second_per_gpu / ddp.tokens_per_second_per_gpu:.3f}")
        if ddp.peak_memory_gib and fsdp.peak_memory_gib:
            print(f"fsdp / ddp peak memory: {fsdp.peak_memory_gib / ddp.peak_memory_gib:.3f}")
    if args.baseline is not None:
        scaling(json.loads(args.baseline.read_text()), world, done)
    elif world > 1:
        print("(scaling figures: pass --baseline with the --out file of the same command on one GPU)")
    return {
        "world": world,
        "card": card,
        "size": args.size,
        "seqLen": args.seq_len,
        "batchPerGpu": args.batch,
        "precision": args.precision,
        "results": [asdict(r) for r in results],
    }


def scaling(baseline: dict[str, Any], world: int, done: dict[str, Result]) -> None:
    """Per-GPU throughput at `world` GPUs over the baseline's (1.0: perfect weak scaling)."""
    base = {r["variant"]: r for r in baseline["results"] if not r.get("error")}
    print(f"\nscaling from {baseline['world']} to {world} GPUs (same per-GPU batch):")
    print("| variant | per-GPU efficiency | total speed-up | ideal |")
    print("| --- | --- | --- | --- |")
    for variant, r in done.items():
        if variant not in base or not r.tokens_per_second_per_gpu:
            continue
        efficiency = r.tokens_per_second_per_gpu / base[variant]["tokens_per_second_per_gpu"]
        ideal = world / baseline["world"]
        print(f"| {variant} | {efficiency:.3f} | {efficiency * ideal:.2f}x | {ideal:.0f}x |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "no GPU visible: run on a GPU machine, or pass --device cpu for the smoke test", file=sys.stderr
        )
        return 2
    dist = init_distributed(args.device)
    try:
        results = []
        for variant in args.variants.split(","):
            try:
                mine = measure(variant, args, dist)
            except Exception as exc:  # one variant failing (e.g. out of memory) still reports the other
                mine = Result(variant, error=f"{type(exc).__name__}: {exc}")
            gathered: list[Any] = [None] * dist.world_size
            tdist.all_gather_object(gathered, mine)
            results.append(slowest(gathered))
        if dist.is_main:
            document = report(args, dist.world_size, results)
            if args.out is not None:
                args.out.write_text(json.dumps(document, indent=2) + "\n")
    finally:
        tdist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
