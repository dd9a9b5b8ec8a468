"""Tandem's training step on one GPU against a minimal reference loop, same model, same run.

    python bench/train_gpu_step.py --size 124m --seq-len 1024 --batch 16 --steps 30

tandem    - `GPTRun.train_step()`, the exact per-step code a TrainingJob runs: data sampler, bf16
            autocast, gradient clipping at 1.0 (the default), GradScaler plumbing (disabled in bf16),
            LR schedule, fused AdamW, torch.compile; and the same without clipping (`gradClip: 0`),
            which the reference does not do;
reference - the smallest loop that trains the same model on the same data: the batches Tandem's
            sampler gives, staged on the GPU before timing (one fixed random batch, as before
            2026-12-06, ran ~0.4% faster than real text), torch.compile, bf16 autocast, fused
            AdamW, nothing else; and the same with gradient clipping at 1.0 (`clip_grad_norm_`), the
            work Tandem's default step does besides.
With --deterministic, last (the switch is global to the process): tandem with
`spec.trainer.deterministic` (deterministic kernels, bit-for-bit repeatable), and its cost against tandem.
Prints tokens/s, ms/step and MFU (training FLOPs per token from the model x tokens/s over the
card's dense bf16 peak), and the ratio tandem / reference.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable

import torch

from tandem.api.common import Precision
from tandem.workloads.models.gpt import GPT, config_for
from tandem.workloads.train.config import TrainConfig
from tandem.workloads.train.loop import DistInfo, GPTRun, peak_flops


def timed(step: Callable[[], torch.Tensor], steps: int, warmup: int) -> float:
    """Seconds per step after `warmup` steps (compile included there), synchronised at the ends (the
    GPU when there is one; a CPU step is done when it returns)."""

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    loss = torch.zeros(())
    for _ in range(steps):
        loss = step()
    float(loss)
    sync()
    return (time.perf_counter() - start) / steps


def reference_step(
    size: str, data: torch.Tensor, grad_clip: float = 0.0
) -> tuple[Callable[[], torch.Tensor], float]:
    """The minimal loop over `data` (batches already on the GPU, taken in turn); with `grad_clip` > 0 it
    also clips gradients as Tandem does by default."""
    torch.manual_seed(0)
    model = GPT(config_for(size, block_size=data.shape[-1] - 1)).cuda()
    compiled = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    parameters = list(model.parameters())
    taken = itertools.count()

    def step() -> torch.Tensor:
        batch = data[next(taken) % len(data)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = compiled(batch[:, :-1], batch[:, 1:])
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        detached: torch.Tensor = loss.detach()
        return detached

    return step, model.flops_per_token(data.shape[-1] - 1)


def print_table(
    rows: list[tuple[str, float, float]],
    deterministic: tuple[str, float, float] | None,
    tokens: int,
    peak: float,
) -> None:
    """The rows (tandem first, the reference without clipping last), then the ratios."""
    reference = rows[-1][1]
    print("| loop | ms/step | tokens/s | MFU |")
    print("| --- | --- | --- | --- |")
    for name, seconds, fpt in rows:
        rate = tokens / seconds
        print(f"| {name} | {seconds * 1000:.1f} | {rate:,.0f} | {rate * fpt / peak:.1%} |")
    for name, seconds, _ in rows[:-1]:
        print(f"{name} / reference throughput: {reference / seconds:.3f}")
    clipped = rows[-2][1]
    print(f"tandem / reference with the same clipping: {clipped / rows[0][1]:.3f}")
    if deterministic is not None:
        name, seconds, fpt = deterministic
        rate = tokens / seconds
        print(f"| {name} | {seconds * 1000:.1f} | {rate:,.0f} | {rate * fpt / peak:.1%} |")
        print(f"deterministic / tandem throughput: {rows[0][1] / seconds:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="124m")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument(
        "--deterministic", action="store_true", help="also time tandem with spec.trainer.deterministic (last)"
    )
    args = parser.parse_args()
    device = torch.device("cuda")
    peak = peak_flops(device) or 989e12
    tokens = args.batch * args.seq_len
    rows = []
    data: torch.Tensor | None = None

    def tandem_step(name: str, clip: float, deterministic: bool = False) -> None:
        nonlocal data
        cfg = TrainConfig(
            job_name="bench",
            model_size=args.size,
            dataset_uri="tandem://corpus",
            max_steps=args.steps + args.warmup + 1,
            seq_len=args.seq_len,
            precision=Precision.BF16,
            per_device_batch=args.batch,
            global_batch=args.batch,
            use_gpu=True,
            gpus_per_worker=1,
            compile=True,
            grad_clip=clip,
            deterministic=deterministic,
        )
        compile_start = time.perf_counter()
        run = GPTRun(cfg, DistInfo())
        if data is None:  # the reference trains on the very batches Tandem's sampler gives, pre-staged
            batches = [run.sampler.batch(i * args.batch, args.batch) for i in range(args.steps + args.warmup)]
            data = torch.stack([torch.from_numpy(b) for b in batches]).cuda()
        rows.append((name, timed(run.train_step, args.steps, args.warmup), run.flops_per_token))
        print(f"{name} done ({time.perf_counter() - compile_start:.0f}s incl. compile)", flush=True)
        del run
        torch.cuda.empty_cache()

    tandem_step("tandem", 1.0)
    tandem_step("tandem, no gradient clipping", 0.0)

    assert data is not None
    step, flops_per_token = reference_step(args.size, data, grad_clip=1.0)
    rows.append(("reference, clipping at 1.0", timed(step, args.steps, args.warmup), flops_per_token))
    del step
    torch.cuda.empty_cache()
    step, flops_per_token = reference_step(args.size, data)
    rows.append(("reference", timed(step, args.steps, args.warmup), flops_per_token))

    deterministic = None
    if args.deterministic:
        tandem_step("tandem, spec.trainer.deterministic", 1.0, deterministic=True)
        deterministic = rows.pop()
    card = torch.cuda.get_device_name(device)
    print(f"\n{card}, {args.size}, bf16, batch {args.batch} x {args.seq_len} tokens")
    print_table(rows, deterministic, tokens, peak)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
