"""The user-entrypoint API: your `module:function` training loop, with Tandem's helpers.

`spec.trainer.entrypoint: my_pkg.train:train_loop` is called once per worker as
`train_loop(config, ctx)` (or `train_loop(config)`), where `config` is `spec.trainer.config` and `ctx` is
a `TrainContext`::

    def train_loop(config: dict, ctx: TrainContext) -> None:
        model = ctx.prepare_model(MyModel())               # to the device, wrapped in DDP
        opt = torch.optim.AdamW(model.parameters())
        start, state = 0, ctx.load_checkpoint()           # the newest complete checkpoint, or None
        if state is not None:                             # (ctx.is_resume says so up front)
            start = state["step"]
            model.module.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        for step in range(start, config["steps"]):
            idx = ctx.batch_indices(step, len(dataset))   # this rank's samples of this step
            with ctx.autocast():
                loss = ...
            ...
            ctx.report(step + 1, loss=loss.item(), samples=ctx.global_batch, lr=..., eval_loss=...)
            if ctx.checkpoint_due(step + 1) or ctx.should_stop():  # should_stop is a collective
                ctx.save_checkpoint(step + 1, {"step": step + 1, "model": model.module.state_dict(),
                                               "optimizer": opt.state_dict()})
                if ctx.stopping:
                    return

Reports take the built-in trainer's path (rank 0 -> the head's progress record, the pod annotation,
`tandem_train_*` metrics, the progress bar and `spec.tracking`), and checkpoints use its atomic,
CRC-checked layout (`state.pt` in a `step-NNNNNNNN` directory), are reported to the platform, and are
what `load_checkpoint` resumes from. `examples/` has a complete example (tandem.workloads.examples).
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


def sample_indices(
    step: int,
    num_samples: int,
    global_batch: int,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    permutation: Callable[[int], Any] | None = None,
) -> Any:
    """Rank `rank`'s sample indices (a numpy int64 array) of optimizer step `step`.

    Step `s` takes global samples `[s * global_batch, (s + 1) * global_batch)` of an endless stream
    in which epoch `e` is a permutation of `range(num_samples)` seeded by `(seed, e)`; rank `r` gets
    the `r`-th of `world_size` equal, contiguous parts. A pure function of its arguments, like the
    built-in trainer's sampler: a run resumed at step `s` sees exactly the samples an uninterrupted
    run would have, and the ranks' parts of a step are disjoint. `permutation(epoch)` may serve the
    epochs' permutations from a cache (`TrainContext` keeps the last two).
    """
    import numpy as np

    def fresh(epoch: int) -> Any:
        return np.random.default_rng([seed, epoch]).permutation(num_samples)

    if num_samples < 1:
        raise ValueError(f"batch_indices: num_samples is {num_samples}; the data set is empty")
    if global_batch < 1 or global_batch % world_size:
        raise ValueError(
            f"batch_indices: global_batch ({global_batch}) must be a positive multiple of the world "
            f"size ({world_size}); set spec.batch.global (or pass global_batch=) accordingly"
        )
    per_rank = global_batch // world_size
    first = step * global_batch + rank * per_rank
    positions = np.arange(first, first + per_rank, dtype=np.int64)
    epochs = positions // num_samples
    out = np.empty(per_rank, dtype=np.int64)
    for epoch in np.unique(epochs):
        mask = epochs == epoch
        perm = (permutation or fresh)(int(epoch))
        out[mask] = perm[positions[mask] % num_samples]
    return out


class TrainContext:
    """What a user training loop gets from Tandem (one per worker).

    Creating it is a collective (the ranks agree on the checkpoint to resume from): `run_entrypoint`
    creates it on every rank before your function runs.
    """

    def __init__(self, cfg: Any, dist: Any, hooks: Any) -> None:
        from tandem.workloads.train.loop import (
            NullHooks,
            autocast_context,
            find_resume,
            pick_device,
            seed_everything,
            use_deterministic_algorithms,
        )

        self._cfg, self._dist, self._hooks = cfg, dist, hooks or NullHooks()
        seed_everything(int(cfg.seed))  # spec.seed, before your code builds a model or draws a batch
        use_deterministic_algorithms(cfg.deterministic)  # spec.trainer.deterministic, likewise
        self.device = pick_device(cfg, dist)
        self._autocast = autocast_context(cfg.precision, self.device)
        self._resume = find_resume(cfg, dist, self._hooks) if cfg.checkpoint_dir else None
        self._last_report: tuple[int, float] = (self.resume_step or 0, time.perf_counter())
        #: What rank 0 last reported / published (the run's outcome: `run_entrypoint`).
        self.last_step: int | None = None
        self.last_loss: float | None = None
        self.last_checkpoint: Any = None
        self.best_eval: tuple[int, float] | None = None
        self._permutations: dict[tuple[int, int], Any] = {}
        self.stopping = False
        """True once `should_stop()` returned True (on every rank): checkpoint and return."""

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

    @property
    def resume_step(self) -> int | None:
        """The step of the checkpoint this run resumes from (`load_checkpoint` returns its state), or
        None for a fresh start. The same on every rank."""
        return None if self._resume is None else int(self._resume.step)

    @property
    def is_resume(self) -> bool:
        """True when a complete checkpoint exists to continue from (an earlier attempt, a restart)."""
        return self._resume is not None

    @property
    def global_batch(self) -> int:
        """`spec.batch.global` (samples per optimizer step over all workers)."""
        return int(self._cfg.global_batch)

    @property
    def per_device_batch(self) -> int:
        """`spec.batch.perDevice` (samples per forward/backward pass on one worker)."""
        return int(self._cfg.per_device_batch)

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step on each worker: global / (perDevice x workers)."""
        return int(self._cfg.accumulation_steps)

    def shard(self, items: Sequence[T]) -> Sequence[T]:
        """This rank's share of `items`: every `world_size`-th item from index `rank`, so the ranks' shares
        are disjoint and together are all of `items` (a view for ranges, lists slice, numpy arrays too)."""
        return items[self.rank :: self.world_size]

    def batch_indices(self, step: int, num_samples: int, global_batch: int | None = None) -> Any:
        """This rank's sample indices (numpy int64) for optimizer step `step` (0-based) of a data set of
        `num_samples`: `global_batch` (default `spec.batch.global`) samples per step over all ranks, a
        seeded (`spec.seed`) permutation per epoch. The same step gives the same samples in a resumed
        run, so resuming at a checkpoint's step continues the data order exactly (same world size)."""
        import numpy as np

        def permutation(epoch: int) -> Any:
            # One permutation per epoch, not per step: it costs milliseconds for a million samples.
            key = (num_samples, epoch)
            if key not in self._permutations:
                if len(self._permutations) >= 2:
                    self._permutations.pop(next(iter(self._permutations)))
                self._permutations[key] = np.random.default_rng([self.seed, epoch]).permutation(num_samples)
            return self._permutations[key]

        return sample_indices(
            step,
            num_samples,
            self.global_batch if global_batch is None else global_batch,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            permutation=permutation,
        )

    def epoch(self, step: int, num_samples: int, global_batch: int | None = None) -> int:
        """Passes over the data started by the time step `step` begins (0-based), as `batch_indices`
        counts them."""
        return step * (self.global_batch if global_batch is None else global_batch) // num_samples

    @property
    def checkpoints_enabled(self) -> bool:
        """True when the job has checkpoint storage (`spec.checkpoint`; locally always)."""
        return bool(self._cfg.checkpoint_dir)

    def checkpoint_due(self, step: int) -> bool:
        """True when step `step` (done) is a multiple of `spec.checkpoint.everySteps`; False without
        checkpoint storage. The same on every rank (no collective)."""
        every = self._cfg.checkpoint_every_steps
        return bool(self._cfg.checkpoint_dir) and bool(every) and step % every == 0

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
        self._restart_clock()
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
        lr: float | None = None,
        eval_loss: float | None = None,
        grad_norm: float | None = None,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Report progress after `step` (rank 0's reports are used; other ranks' are ignored).

        `samples` / `tokens` are what one step consumed over all workers (for throughput); `lr` the
        learning rate of the step; `eval_loss` a held-out loss measured at this step (shown as
        `status.progress.evalLoss`); `grad_norm` the gradients' norm (`tandem_train_grad_norm`);
        `metrics` further scalars for `spec.tracking` (TensorBoard, MLflow). `total_steps` defaults to
        the config's `maxSteps` or `steps`. Report as often as you like: the step time is measured
        between reports.
        """
        from tandem.workloads.train.loop import StepMetrics

        if self.rank != 0:
            return
        now = time.perf_counter()
        prev_step, prev_time = self._last_report
        self.last_step, self.last_loss = step, float(loss)
        if eval_loss is not None and (self.best_eval is None or eval_loss < self.best_eval[1]):
            self.best_eval = (step, float(eval_loss))
        if step <= prev_step:  # a repeated step: nothing new to time
            return
        self._last_report = (step, now)
        dt = max(now - prev_time, 1e-9) / (step - prev_step)
        total = total_steps or int(
            self._cfg.user_config.get("maxSteps", self._cfg.user_config.get("steps", step))
        )
        self._hooks.on_step(
            StepMetrics(
                step=step,
                total_steps=max(total, step),
                epoch=epoch,
                loss=float(loss),
                lr=0.0 if lr is None else float(lr),
                step_seconds=dt,
                samples_per_second=(samples or 0) / dt,
                tokens_per_second=(tokens or 0) / dt,
                eval_loss=None if eval_loss is None else float(eval_loss),
                grad_norm=None if grad_norm is None else float(grad_norm),
                extra={k: float(v) for k, v in (metrics or {}).items()},
            )
        )

    def should_stop(self) -> bool:
        """True on every rank once any rank was asked to stop (SIGTERM). A collective: call on all ranks."""
        from tandem.workloads.train.loop import agree

        self.stopping = agree([self._hooks.stop_requested()], self._dist, self.device)[0]
        return self.stopping

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
                        "loss": self.last_loss,
                        "totalSteps": self._cfg.user_config.get(
                            "maxSteps", self._cfg.user_config.get("steps")
                        ),
                        "worldSize": self.world_size,
                        "seed": self.seed,
                        "entrypoint": self._cfg.entrypoint,
                        "user": metadata or {},
                    }
                )
                nbytes = st.nbytes
            ckpt.prune(root, self._cfg.checkpoint_keep)
            result = (ref.step, ref.uri, ckpt.read_metadata(ref.path)["time"], nbytes)
        s, uri, when, nbytes = broadcast_object(result, self._dist)
        event = CheckpointEvent(step=s, uri=uri, time=when, seconds=time.perf_counter() - t0, bytes=nbytes)
        self._hooks.on_checkpoint(event)
        self.last_checkpoint = event
        # Checkpoint time is not step time: the next report measures from here.
        self._last_report = (max(self._last_report[0], s), time.perf_counter())
        return str(uri)

    def _restart_clock(self) -> None:
        """Before the first report, set-up (building the model, loading a checkpoint) is not step time:
        the first step is timed from the last of them, as the built-in trainer times it."""
        if self.last_step is None:
            self._last_report = (self._last_report[0], time.perf_counter())

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The state saved by the checkpoint this run resumes from (the newest complete one, or the one
        the operator asked for), or None (`is_resume` is False)."""
        import torch

        from tandem.workloads.train import checkpoint as ckpt

        if self._resume is None:
            return None
        state = torch.load(self._resume.path / ckpt.USER_STATE_FILE, map_location="cpu", weights_only=False)
        self._restart_clock()
        return state if isinstance(state, dict) else {"state": state}


def run_entrypoint(cfg: Any, dist: Any, hooks: Any = None) -> Any:
    """Call the user's function with its config (and a `TrainContext` if it takes two parameters).

    Returns how the run ended, as the built-in trainer does (`loop.RunResult`: the last reported step
    and loss, the last checkpoint, the step it resumed at; "stopped" when `should_stop()` said so).
    """
    from tandem.workloads.train.loop import RunResult

    assert cfg.entrypoint is not None
    fn = resolve_entrypoint(cfg.entrypoint)
    ctx = TrainContext(cfg, dist, hooks)
    params = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(params) >= 2:
        fn(ctx.config, ctx)
    else:
        fn(ctx.config)
    checkpoint = ctx.last_checkpoint
    step = ctx.last_step
    if checkpoint is not None and (step is None or checkpoint.step > step):
        step = checkpoint.step
    return RunResult(
        status="stopped" if ctx.stopping else "completed",
        step=step if step is not None else (ctx.resume_step or 0),
        loss=ctx.last_loss,
        start_step=ctx.resume_step or 0,
        checkpoint=checkpoint,
        best_eval=ctx.best_eval,
    )
