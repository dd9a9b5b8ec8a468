"""The session-API path against the built-in trainer, same model, same data, same process.

    python bench/train_session_overhead.py --device cuda --size 124m --seq-len 1024 --batch 16 --compile
    python bench/train_session_overhead.py --device cpu --size tiny --seq-len 128 --batch 8

builtin - `loop.run_builtin`: the loop a TrainingJob with `spec.trainer.builtin` runs (sampler, autocast,
          gradient clipping, LR schedule, fused AdamW on CUDA, a report every step);
session - `session_loop` below through `session.run_entrypoint`: the same GPT written as user code on
          `TrainContext` (`batch_indices` for the rank's windows, `prepare_model`, `autocast`, AdamW,
          warmup + cosine, clipping, `report` every step with loss, tokens, LR and gradient norm,
          `should_stop` every 10 steps), as a TrainingJob with `spec.trainer.entrypoint` runs it.
Both read the loss every step (one device sync, as a pod reports every step) and run on `tandem://corpus`.
Rounds alternate the two; the time per step is taken between the reports of the first and the last timed
step (after `--warmup` steps: compilation) and the median over rounds is printed with the ratio.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from tandem.api.common import Precision
from tandem.workloads.models.gpt import GPT, config_for
from tandem.workloads.train.config import TrainConfig
from tandem.workloads.train.loop import DistInfo, NullHooks, StepMetrics, run_builtin
from tandem.workloads.train.session import TrainContext, run_entrypoint

ENTRYPOINT = "train_session_overhead:session_loop"


class Clock(NullHooks):
    """When each step was reported."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}

    def on_step(self, metrics: StepMetrics) -> None:
        self.times[metrics.step] = time.perf_counter()

    def seconds_per_step(self, first: int, last: int) -> float:
        return (self.times[last] - self.times[first]) / (last - first)


def session_loop(config: dict[str, Any], ctx: TrainContext) -> None:
    """The built-in GPT's training, written as a user would on the session API."""
    from torch import nn

    from tandem.workloads.data.corpus import builtin_corpus

    seq_len, steps, lr = int(config["seqLen"]), int(config["steps"]), float(config["learningRate"])
    model = ctx.prepare_model(GPT(config_for(config["size"], block_size=seq_len)))
    forward = torch.compile(model) if config["compile"] else model
    cuda = ctx.device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)
    warmup = max(1, min(100, steps // 10))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    tokens = torch.from_numpy(np.frombuffer(builtin_corpus("corpus"), dtype=np.uint8).copy())
    windows = (len(tokens) - 1) // seq_len
    offsets = torch.arange(seq_len + 1)
    for step in range(steps):
        starts = torch.from_numpy(ctx.batch_indices(step, windows)) * seq_len
        batch = tokens[starts[:, None] + offsets].long()
        if cuda:
            batch = batch.pin_memory().to(ctx.device, non_blocking=True)
        with ctx.autocast():
            _, loss = forward(batch[:, :-1], batch[:, 1:])
        loss.backward()
        norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        loss_value, norm_value = torch.stack([loss.detach().float(), norm.float()]).tolist()  # one sync
        ctx.report(
            step + 1,
            loss=loss_value,
            tokens=ctx.global_batch * seq_len,
            samples=ctx.global_batch,
            total_steps=steps,
            lr=float(scheduler.get_last_lr()[0]),
            grad_norm=norm_value,
        )
        if (step + 1) % 10 == 0 and ctx.should_stop():
            return


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--size", default="124m")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="steps before timing (compilation)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    total = args.warmup + args.steps
    cuda = args.device == "cuda"
    builtin = TrainConfig(
        job_name="bench",
        model_size=args.size,
        dataset_uri="tandem://corpus",
        max_steps=total,
        warmup_steps=max(1, min(100, total // 10)),
        seq_len=args.seq_len,
        per_device_batch=args.batch,
        global_batch=args.batch,
        precision=Precision.BF16 if cuda else Precision.FP32,
        use_gpu=cuda,
        compile=args.compile,
    )
    session = replace(
        builtin,
        model_size=None,
        dataset_uri=None,
        entrypoint=ENTRYPOINT,
        user_config={
            "size": args.size,
            "seqLen": args.seq_len,
            "steps": total,
            "learningRate": builtin.learning_rate,
            "compile": args.compile,
        },
    )
    times: dict[str, list[float]] = {"builtin": [], "session": []}
    for _ in range(args.rounds):
        for name, cfg in (("builtin", builtin), ("session", session)):
            clock = Clock()
            if name == "builtin":
                run_builtin(cfg, DistInfo(), clock)
            else:
                run_entrypoint(cfg, DistInfo(), clock)
            times[name].append(clock.seconds_per_step(args.warmup, total))
            if cuda:
                torch.cuda.empty_cache()
    tokens = args.batch * args.seq_len
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{device}, GPT {args.size}, sequence {args.seq_len}, batch {args.batch}, compile {args.compile}")
    print("| loop | ms/step (median) | tokens/s | rounds (ms/step) |")
    print("| --- | --- | --- | --- |")
    medians = {}
    for name, values in times.items():
        medians[name] = statistics.median(values)
        rounds = ", ".join(f"{v * 1e3:.1f}" for v in values)
        print(f"| {name} | {medians[name] * 1e3:.2f} | {tokens / medians[name]:,.0f} | {rounds} |")
    print(f"session / builtin time per step: {medians['session'] / medians['builtin']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
