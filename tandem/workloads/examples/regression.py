"""A complete `spec.trainer.entrypoint` on the session API: an MLP regressor on synthetic data.

Not the built-in GPT: your own model, data, optimizer and loop, with Tandem doing the rest (DDP, the
rank's share of each batch, checkpoints, resume, progress, metrics, tracking). Run it with

    tandem train manifests/examples/trainingjob-regression.yaml --local

or apply that file to a cluster (this module ships in the training image). Your own module works the
same way once it is importable in the image (or, locally, on PYTHONPATH).

Settings (`spec.trainer.config`): `steps` (optimizer steps), `learningRate` (peak, after `warmupSteps`
of linear warmup, then cosine to a tenth), `maxGradNorm` (gradient clipping, default 1), `hidden`
(width of the two hidden layers), `evalEvery` (steps between held-out evaluations), `samples` (training
set size; a fifth as many are held out), `features` (inputs per sample), `dataSeed` (the data set's
seed: the same data on every rank and every attempt). `spec.seed` seeds the model's initialisation
and the sampling order.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tandem.workloads.train.session import TrainContext

STOP_CHECK_EVERY = 10
"""Steps between the ranks' agreement on a stop request (`should_stop` is a collective)."""


def make_data(samples: int, features: int, seed: int) -> tuple[torch.Tensor, ...]:
    """(x, y, validation x, validation y): a smooth non-linear target plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    held_out = max(1, samples // 5)
    x = torch.randn(samples + held_out, features, generator=g)
    w1 = torch.randn(features, 1, generator=g) / math.sqrt(features)
    w2 = torch.randn(features, 1, generator=g) / math.sqrt(features)
    y = torch.sin(2 * x @ w1) + 0.5 * (x @ w2) ** 2 + 0.05 * torch.randn(samples + held_out, 1, generator=g)
    return x[:samples], y[:samples], x[samples:], y[samples:]


class MLP(nn.Module):
    def __init__(self, features: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


def schedule(warmup: int, steps: int) -> Any:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared error on the held-out set (every rank computes the same value: no collective)."""
    model.eval()
    loss = F.mse_loss(model(x), y).item()
    model.train()
    return float(loss)


def train_loop(config: dict[str, Any], ctx: TrainContext) -> None:
    steps = int(config.get("steps", 400))
    lr = float(config.get("learningRate", 1e-2))
    warmup = int(config.get("warmupSteps", max(1, steps // 20)))
    eval_every = int(config.get("evalEvery", 50))
    max_grad_norm = float(config.get("maxGradNorm", 1.0))
    features = int(config.get("features", 8))
    x, y, val_x, val_y = make_data(
        int(config.get("samples", 4096)), features, int(config.get("dataSeed", 1234))
    )
    x, y, val_x, val_y = (t.to(ctx.device) for t in (x, y, val_x, val_y))

    model = ctx.prepare_model(MLP(features, int(config.get("hidden", 64))))
    raw: nn.Module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(warmup, steps))

    start = 0
    state = ctx.load_checkpoint()  # None unless ctx.is_resume
    if state is not None:
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = int(state["step"])

    for step in range(start, steps):
        # This rank's samples of this step: a pure function of (spec.seed, step), so a resumed run
        # continues the data order exactly; split into micro-batches of spec.batch.perDevice.
        indices = torch.from_numpy(ctx.batch_indices(step, len(x))).to(ctx.device)
        micro = torch.split(indices, ctx.per_device_batch)
        total = torch.zeros((), device=ctx.device)
        for i, part in enumerate(micro):
            last = i == len(micro) - 1
            sync = nullcontext() if last or raw is model else model.no_sync()
            with sync:
                with ctx.autocast():
                    loss = F.mse_loss(model(x[part]).float(), y[part])
                (loss / len(micro)).backward()  # type: ignore[no-untyped-call]
            total += loss.detach()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        done = step + 1
        eval_loss = evaluate(raw, val_x, val_y) if done % eval_every == 0 or done == steps else None
        ctx.report(
            done,
            loss=float(total) / len(micro),
            samples=ctx.global_batch,
            total_steps=steps,
            epoch=ctx.epoch(step, len(x)),
            lr=float(scheduler.get_last_lr()[0]),
            eval_loss=eval_loss,
            grad_norm=float(grad_norm),
        )
        stopping = done % STOP_CHECK_EVERY == 0 and ctx.should_stop()  # the same steps on every rank
        if ctx.checkpoint_due(done) or (ctx.checkpoints_enabled and (stopping or done == steps)):
            ctx.save_checkpoint(
                done,
                {
                    "step": done,
                    "model": raw.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                },
            )
        if stopping:
            return
