"""The user-entrypoint API: your `module:function` training loop, with Tandem's helpers.

`spec.trainer.entrypoint: my_pkg.train:train_loop` is called once per worker as
`train_loop(config, ctx)` (or `train_loop(config)`), where `config` is `spec.trainer.config` and `ctx` is
a `TrainContext`::

    def train_loop(config: dict, ctx: TrainContext) -> None:
        model = ctx.prepare_model(MyModel())               # to the device, wrapped in DDP
        opt = torch.optim.AdamW(model.parameters())
        start, state = 0, ctx.load_checkpoint()           # the newest complete checkpoint, or None
        if state is not None:
            start = state["step"]
            model.module.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        for step in range(start, config["steps"]):
            with ctx.autocast():
                loss = ...
            ...
            ctx.report(step + 1, loss=loss.item(), samples=batch_size * ctx.world_size)
            if (step + 1) % 100 == 0 or ctx.should_stop():  # both are collectives: call on every rank
                ctx.save_checkpoint(step + 1, {"step": step + 1, "model": model.module.state_dict(),
                                               "optimizer": opt.state_dict()})

Checkpoints use the same atomic, CRC-checked layout as the built-in trainer (`state.pt` in a
`step-NNNNNNNN` directory), are reported to the platform, and are what `load_checkpoint` resumes from.
"""

from __future__ import annotations

import importlib
import inspect
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from tandem.errors import UserError

ENTRYPOINT_FIELD = "spec.trainer.entrypoint"
T = TypeVar("T")


def resolve_entrypoint(entrypoint: str) -> Callable[..., Any]:
    """Import `module:function`; `UserError` naming the field when it cannot."""
    module_name, _, func_name = entrypoint.partition(":")
    if not module_name or not func_name:
        raise UserError(f"{ENTRYPOINT_FIELD}: {entrypoint!r} is not of the form package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(
            f"{ENTRYPOINT_FIELD}: cannot import module {module_name!r} ({exc}); install it in the "
            "training image or fix the name"
        ) from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise UserError(f"{ENTRYPOINT_FIELD}: module {module_name!r} has no function {func_name!r}")
    return fn  # type: ignore[no-any-return]


class TrainContext:
    """What a user training loop gets from Tandem (one per worker)."""

    def __init__(self, cfg: Any, dist: Any, hooks: Any) -> None:
        from tandem.workloads.train.loop import NullHooks, autocast_context, pick_device, seed_everything

        self._cfg, self._dist, self._hooks = cfg, dist, hooks or NullHooks()
        seed_everything(int(cfg.seed))  # spec.seed, before your code builds a model or draws a batch
        self.device = pick_device(cfg, dist)
        self._autocast = autocast_context(cfg.precision, self.device)
        self._last_report: tuple[int, float] | None = None

    @property
    def config(self) -> dict[str, Any]:
        """`spec.trainer.config`."""
        return dict(self._cfg.user_config)

    @property
    def rank(self) -> int:
        return int(self._dist.rank)

    @property
    def world_size(self) -> int:
        return int(self._dist.world_size)

    @property
    def local_rank(self) -> int:
        return int(self._dist.local_rank)

    @property
    def seed(self) -> int:
        """`spec.seed`: Python's, numpy's and torch's generators are seeded with it before your function
        runs (the same on every rank; derive per-rank seeds from it and `rank` where you need them)."""
        return int(self._cfg.seed)

    def shard(self, items: Sequence[T]) -> Sequence[T]:
        """This rank's share of `items`: every `world_size`-th item from index `rank`, so the ranks' shares
        are disjoint and together are all of `items` (a view for ranges, lists slice, numpy arrays too)."""
        return items[self.rank :: self.world_size]

    @property
    def precision(self) -> str:
        """`fp32`, `bf16` or `fp16` (spec.precision)."""
        return str(self._cfg.precision)

    @property
    def job_name(self) -> str:
        return str(self._cfg.job_name)

    def autocast(self) -> AbstractContextManager[Any]:
        """The autocast context of the job's precision (a no-op for fp32)."""
        return self._autocast()

    def prepare_model(self, model: Any) -> Any:
        """Move `model` to this worker's device and wrap it in DDP when there are several workers."""
        from torch import nn

        model = model.to(self.device)
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model

    def report(
        self,
        step: int,
        *,
        loss: float,
        samples: int | None = None,
        tokens: int | None = None,
        total_steps: int | None = None,
        epoch: int = 0,
    ) -> None:
        """Report progress after `step` (rank 0's reports are used; other ranks' are ignored).

        `samples` / `tokens` are what one step consumed over all workers (for throughput).
        """
        from tandem.workloads.train.loop import StepMetrics

        if self.rank != 0:
            return
        now = time.perf_counter()
        prev = self._last_report
        self._last_report = (step, now)
        if prev is None or step <= prev[0]:
            return
        dt = (now - prev[1]) / (step - prev[0])
        total = total_steps or int(
            self._cfg.user_config.get("maxSteps", self._cfg.user_config.get("steps", step))
        )
        self._hooks.on_step(
            StepMetrics(
                step=step,
                total_steps=max(total, step),
                epoch=epoch,
                loss=float(loss),
                lr=0.0,
                step_seconds=dt,
                samples_per_second=(samples or 0) / dt,
                tokens_per_second=(tokens or 0) / dt,
            )
        )

    def should_stop(self) -> bool:
        """True on every rank once any rank was asked to stop (SIGTERM). A collective: call on all ranks."""
        from tandem.workloads.train.loop import agree

        return agree([self._hooks.stop_requested()], self._dist, self.device)[0]

    def save_checkpoint(
        self, step: int, state: dict[str, Any], *, metadata: dict[str, Any] | None = None
    ) -> str:
        """Publish `state` (rank 0's) as the checkpoint of `step`; returns its URI. Call on every rank."""
        from tandem.workloads.train import checkpoint as ckpt
        from tandem.workloads.train.loop import CheckpointEvent, broadcast_object

        if not self._cfg.checkpoint_dir:
            raise UserError("spec.checkpoint: the job has no checkpoint storage; set spec.checkpoint.storage")
        t0 = time.perf_counter()
        result = None
        if self.rank == 0:
            root = ckpt.uri_to_path(self._cfg.checkpoint_dir)
            with ckpt.staging(root, step) as st:
                st.save_torch(ckpt.USER_STATE_FILE, state)
                ref = st.publish(
                    {
                        "job": self._cfg.job_name,
                        "attempt": self._cfg.attempt,
                        "worldSize": self.world_size,
                        "entrypoint": self._cfg.entrypoint,
                        "user": metadata or {},
                    }
                )
                nbytes = st.nbytes
            ckpt.prune(root, self._cfg.checkpoint_keep)
            result = (ref.step, ref.uri, ckpt.read_metadata(ref.path)["time"], nbytes)
        s, uri, when, nbytes = broadcast_object(result, self._dist)
        self._hooks.on_checkpoint(
            CheckpointEvent(step=s, uri=uri, time=when, seconds=time.perf_counter() - t0, bytes=nbytes)
        )
        return str(uri)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The state saved by the newest complete checkpoint (or the one the operator asked for), or None."""
        import torch

        from tandem.workloads.train import checkpoint as ckpt
        from tandem.workloads.train.loop import find_resume

        if not self._cfg.checkpoint_dir:
            return None
        ref = find_resume(self._cfg, self._dist, self._hooks)
        if ref is None:
            return None
        state = torch.load(ref.path / ckpt.USER_STATE_FILE, map_location="cpu", weights_only=False)
        return state if isinstance(state, dict) else {"state": state}


def run_entrypoint(cfg: Any, dist: Any, hooks: Any = None) -> Any:
    """Call the user's function with its config (and a `TrainContext` if it takes two parameters)."""
    assert cfg.entrypoint is not None
    fn = resolve_entrypoint(cfg.entrypoint)
    ctx = TrainContext(cfg, dist, hooks)
    params = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return fn(ctx.config, ctx) if len(params) >= 2 else fn(ctx.config)
