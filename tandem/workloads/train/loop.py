"""The training loop of the built-in GPT, independent of Ray.

`run_builtin(cfg, dist, hooks)` runs on every rank once `torch.distributed` is initialised (by Ray Train's
`TorchTrainer`, or by `init_process_group` in a plain `torch.distributed` run such as the benchmark's);
Ray-specific behaviour (reporting to the head, Ray checkpoint pointers) lives behind `Hooks`.

One optimizer step: `accumulation_steps` micro-batches of `per_device_batch` samples on each rank (DDP
all-reduces gradients on the last one only; FSDP, `strategy: fsdp`, reduce-scatters them there, see
`sharding`), optional autocast (bf16, or fp16 with a `GradScaler`), gradient clipping, AdamW, warmup +
cosine LR. Ranks agree every `sync_every` steps (one tiny all-reduce)
on whether to stop (SIGTERM) or checkpoint (time-based interval), so collectives always line up.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from tandem.workloads.models.gpt import GPT, config_for
from tandem.workloads.models.tokenizer import ByteTokenizer, HFTokenizer
from tandem.workloads.train import checkpoint as ckpt
from tandem.workloads.train import sharding
from tandem.workloads.train.config import TrainConfig, resolve_data_uri
from tandem.workloads.train.data import WindowSampler, micro_batch_first_sample, train_and_validation
from tandem.workloads.train.finetune import FineTune

log = logging.getLogger(__name__)

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
"""Dense bf16/fp16 tensor-core peak per GPU, for the MFU estimate (fp32 runs are rated against it too)."""


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class StepMetrics:
    """What rank 0 reports after an optimizer step."""

    step: int
    total_steps: int
    epoch: int
    loss: float
    lr: float
    step_seconds: float
    samples_per_second: float
    tokens_per_second: float
    #: None where it cannot be estimated (a CPU, a GPU of unknown peak): the metric stays absent.
    mfu: float | None = None
    #: L2 norm of all gradients before clipping (of the reported step).
    grad_norm: float | None = None
    #: Time one step waited for its batches on this rank (mean over the steps since the last report).
    data_wait_seconds: float | None = None
    #: Loss on the held-out data, on steps that evaluated (`spec.trainer.builtin.evaluation`).
    eval_loss: float | None = None
    #: Further scalars a user loop reports (`TrainContext.report(metrics=...)`), for `spec.tracking`.
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CheckpointEvent:
    """A checkpoint that was just published."""

    step: int
    uri: str
    time: str
    seconds: float
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunResult:
    """How a run on one rank ended."""

    status: str  # "completed" | "stopped"
    step: int
    loss: float | None = None
    start_step: int = 0
    checkpoint: CheckpointEvent | None = None
    history: list[float] = field(default_factory=list)
    #: (step, eval loss) of every evaluation of this run.
    evals: list[tuple[int, float]] = field(default_factory=list)
    #: True when early stopping ended the run before maxSteps.
    early_stopped: bool = False
    #: (step, loss) of the best evaluation so far, this run's or a resumed one's (None without any).
    best_eval: tuple[int, float] | None = None


class Hooks(Protocol):
    """What the loop tells its runner, and asks it."""

    def on_step(self, metrics: StepMetrics) -> None:
        """Rank 0, after each optimizer step whose loss was read (every `log_every` steps)."""

    def on_checkpoint(self, event: CheckpointEvent) -> None:
        """Every rank, after a checkpoint was published (Ray's report is a collective)."""

    def stop_requested(self) -> bool:
        """True once this rank was asked to stop (SIGTERM); the ranks agree at the next sync step."""

    def resume_hint(self) -> str | None:
        """A checkpoint URI the runner prefers to resume from (Ray Train's latest), or None."""


class NullHooks:
    """Hooks that do nothing (tests, benchmarks)."""

    def on_step(self, metrics: StepMetrics) -> None:
        pass

    def on_checkpoint(self, event: CheckpointEvent) -> None:
        pass

    def stop_requested(self) -> bool:
        return False

    def resume_hint(self) -> str | None:
        return None


# ------------------------------------------------------------------------------------------------
# Pieces (shared with the benchmark and the user-entrypoint helpers)
# ------------------------------------------------------------------------------------------------


def pick_device(cfg: TrainConfig, dist: DistInfo) -> torch.device:
    """The rank's CUDA device when the job asks for GPUs and one is visible, else the CPU."""
    if cfg.use_gpu and torch.cuda.is_available():
        index = dist.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def autocast_context(precision: str, device: torch.device) -> Callable[[], AbstractContextManager[Any]]:
    """A factory of the forward pass's autocast context for `precision`."""
    if precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the peak LR at a step: linear warmup, then `lr_decay` (cosine, linear or constant)
    down to `min_lr_ratio` at `max_steps`."""
    warmup, total, floor, decay = cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio, cfg.lr_decay

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if decay == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (fused on CUDA)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda"
    )


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, CUDA)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def use_deterministic_algorithms(enabled: bool) -> None:
    """`spec.trainer.deterministic`: kernels that give the same bits every time, so that a run resumed
    from a checkpoint ends where an uninterrupted one does on a GPU too (on one H100, two runs of GPT
    124M without it differed by 4e-5 after 30 steps; with it, not at all). Called before the model is
    built and before the first matrix product: cuBLAS reads its workspace setting when it starts."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config, "deterministic"):  # compiled kernels too (newer PyTorch has the switch)
        inductor_config.deterministic = True


def gather_objects(obj: Any, dist: DistInfo) -> list[Any]:
    """`obj` from every rank (a list indexed by rank)."""
    if dist.world_size == 1:
        return [obj]
    out: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, dist: DistInfo) -> Any:
    """Rank 0's `obj` on every rank."""
    if dist.world_size == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def peak_flops(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak, if known (MFU is only estimated for known GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def find_resume(cfg: TrainConfig, dist: DistInfo, hooks: Hooks) -> ckpt.CheckpointRef | None:
    """Rank 0 picks (and verifies) the checkpoint to resume from; every rank gets the same answer."""
    ref = None
    if dist.is_main and cfg.checkpoint_dir:
        root = ckpt.uri_to_path(cfg.checkpoint_dir)
        ckpt.clean_staging(root)
        ref = ckpt.latest_complete(root, prefer=hooks.resume_hint() or cfg.resume_from)
    found = broadcast_object(None if ref is None else (ref.step, str(ref.path)), dist)
    return None if found is None else ckpt.CheckpointRef(found[0], Path(found[1]))


# ------------------------------------------------------------------------------------------------
# The built-in GPT run
# ------------------------------------------------------------------------------------------------


class GPTRun:
    """State of one rank's built-in GPT run: model, optimizer, scheduler, scaler, data."""

    def __init__(
        self, cfg: TrainConfig, dist: DistInfo, hooks: Hooks | None = None, data_root: str | None = None
    ) -> None:
        assert cfg.model_size is not None
        assert cfg.dataset_uri is not None
        self.cfg, self.dist, self.hooks = cfg, dist, hooks or NullHooks()
        self.device = pick_device(cfg, dist)
        seed_everything(cfg.seed)
        use_deterministic_algorithms(cfg.deterministic)
        #: `spec.trainer.builtin.fineTuning`: base weights (and LoRA layers) instead of random ones.
        self.fine_tune = FineTune.from_config(cfg)
        self.model_config = (
            config_for(cfg.model_size, block_size=cfg.seq_len, vocab_size=cfg.vocab_size)
            if self.fine_tune is None
            else self.fine_tune.gpt_config
        )
        #: `spec.trainer.strategy: fsdp`: the model is sharded over the ranks (FSDP2, `sharding`).
        self.sharded = cfg.strategy == "fsdp"
        if self.sharded and self.fine_tune is not None and self.fine_tune.lora is not None:
            raise ValueError(f"{sharding.FIELD}: fsdp does not train LoRA adapters; use ddp")
        # Sharding moves the model to the device a block at a time: built on the CPU, it never sits
        # whole on the GPU (the initial weights are the same either way: they are drawn on the CPU).
        self.raw_model = GPT(self.model_config)
        if not self.sharded:
            self.raw_model = self.raw_model.to(self.device)
        if self.fine_tune is not None:
            self.fine_tune.prepare(self.raw_model)
        self.model: nn.Module = self.raw_model
        if self.sharded:
            sharding.shard_gpt(
                self.raw_model,
                self.device,
                dist.world_size,
                precision=cfg.precision,
                compile_blocks=cfg.compile,
            )
        elif dist.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.raw_model, device_ids=ids)
        self.forward: nn.Module | Callable[..., Any] = (
            torch.compile(self.model) if cfg.compile and not self.sharded else self.model
        )
        self.optimizer = make_optimizer(self.raw_model, cfg, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        fp16 = cfg.precision == "fp16"
        self.scaler = (
            sharding.grad_scaler(self.device, fp16)
            if self.sharded
            else torch.amp.GradScaler(self.device.type, enabled=fp16)
        )
        self.autocast = autocast_context(cfg.precision, self.device)
        train_tokens, held_out = train_and_validation(cfg, data_root)
        self.data_root = data_root
        self.sampler = _sampler(train_tokens, cfg, "spec.trainer.builtin.dataset.uri")
        self.val_sampler = (
            None if held_out is None else _sampler(held_out, cfg, "spec.trainer.builtin.dataset.validation")
        )
        self.evaluation = EvalState()
        self.step = 0
        self.flops_per_token = self.raw_model.flops_per_token(cfg.seq_len)
        self.peak = peak_flops(self.device)
        #: Seconds the steps so far waited for their batches (host time: read, collate, pin, copy issued).
        self.data_wait_seconds = 0.0
        #: The last step's gradient norm (a tensor on the device: read with the loss, no extra sync).
        self.grad_norm: torch.Tensor | None = None

    # -- one optimizer step (the code the benchmark measures) -------------------------------------

    def train_step(self, measure_grad_norm: bool = False) -> torch.Tensor:
        """One optimizer step over `accumulation_steps` micro-batches; returns the mean loss (a tensor).

        The gradient norm is kept in `grad_norm` (clipping computes it anyway; without clipping only when
        `measure_grad_norm`), and the time spent getting batches is added to `data_wait_seconds`: neither
        waits for the device."""
        cfg, dist = self.cfg, self.dist
        accum = cfg.accumulation_steps
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            waited = time.perf_counter()
            first = micro_batch_first_sample(
                self.step,
                micro,
                dist.rank,
                global_batch=cfg.global_batch,
                per_device=cfg.per_device_batch,
                world_size=dist.world_size,
            )
            batch = torch.from_numpy(self.sampler.batch(first, cfg.per_device_batch))
            if self.device.type == "cuda":
                batch = batch.pin_memory().to(self.device, non_blocking=True)
            self.data_wait_seconds += time.perf_counter() - waited
            inputs, targets = batch[:, :-1], batch[:, 1:]
            last = micro == accum - 1
            if self.sharded:
                sharding.set_gradient_sync(self.model, last)
            sync: AbstractContextManager[Any] = (
                self.model.no_sync()
                if not last and isinstance(self.model, nn.parallel.DistributedDataParallel)
                else nullcontext()
            )
            with sync:
                with self.autocast():
                    _, loss = self.forward(inputs, targets)
                assert loss is not None
                self.scaler.scale(loss / accum).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        if self.sharded:  # gradients are DTensor shards: their norm is summed over the ranks
            if cfg.grad_clip > 0:
                self.grad_norm = sharding.clip_grad_norm(self.raw_model.parameters(), cfg.grad_clip)
            elif measure_grad_norm:
                self.grad_norm = sharding.grad_norm(self.raw_model.parameters())
        elif cfg.grad_clip > 0:
            self.grad_norm = nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
        elif measure_grad_norm:
            grads = [p.grad for p in self.raw_model.parameters() if p.grad is not None]
            self.grad_norm = nn.utils.get_total_norm(grads) if grads else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return total / accum

    # -- evaluation --------------------------------------------------------------------------------

    def evaluation_due(self) -> bool:
        """True at every `eval_interval`-th step and at the last one (when the run evaluates at all)."""
        cfg = self.cfg
        return (
            self.val_sampler is not None
            and cfg.eval_interval is not None
            and (self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps)
        )

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over `eval_batches` held-out batches on every rank (the same samples each time).

        Each rank takes its own samples (rank-interleaved, like training); one all-reduce and one read of
        the result, at evaluations only. No RNG is drawn, so evaluating never changes the training run.
        """
        assert self.val_sampler is not None
        cfg, dist = self.cfg, self.dist
        self.raw_model.eval()
        total = torch.zeros((), device=self.device)
        for b in range(cfg.eval_batches):
            first = (b * dist.world_size + dist.rank) * cfg.per_device_batch
            batch = torch.from_numpy(self.val_sampler.batch(first, cfg.per_device_batch)).to(self.device)
            with self.autocast():
                _, loss = self.raw_model(batch[:, :-1], batch[:, 1:])
            assert loss is not None
            total += loss.float()
        self.raw_model.train()
        if dist.world_size > 1:
            tdist.all_reduce(total)
        value = float(total.item()) / (cfg.eval_batches * dist.world_size)
        self.evaluation.record(self.step, value, cfg.early_stop_min_delta)
        return value

    # -- checkpoints -------------------------------------------------------------------------------

    def load(self, ref: ckpt.CheckpointRef) -> None:
        """Restore everything from a checkpoint (every rank)."""
        p = ref.path
        if self.sharded:  # rank 0 reads the full state (a DDP or an FSDP checkpoint), every rank its shards
            self._load_sharded(p)
        else:
            if self.fine_tune is not None:
                self.fine_tune.load_weights(p, self.raw_model, self.device)
            else:
                self.raw_model.load_state_dict(
                    torch.load(p / ckpt.MODEL_FILE, map_location=self.device, weights_only=True)
                )
            self.optimizer.load_state_dict(
                torch.load(p / ckpt.OPTIMIZER_FILE, map_location=self.device, weights_only=True)
            )
        state = torch.load(p / ckpt.TRAINER_STATE_FILE, map_location="cpu", weights_only=False)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.evaluation = EvalState.from_dict(state.get("eval"))
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            set_rng_state(rngs[self.dist.rank])
        else:
            log.warning(
                "checkpoint %s was written by %d ranks, this run has %d: RNG states not restored",
                p,
                len(rngs),
                self.dist.world_size,
            )
        self.step = int(state["step"])

    def _load_sharded(self, path: Path) -> None:
        """The model's and the optimizer's state under FSDP: read on rank 0, broadcast as shards."""
        main = self.dist.is_main

        def read(name: str) -> dict[str, Any]:
            loaded: dict[str, Any] = torch.load(path / name, map_location="cpu", weights_only=True)
            return loaded

        sharding.load_model_state(self.raw_model, read(ckpt.MODEL_FILE) if main else {})
        sharding.load_optimizer_state(
            self.raw_model, self.optimizer, read(ckpt.OPTIMIZER_FILE) if main else {}
        )

    def save(self, loss: float | None) -> CheckpointEvent:
        """Write and publish a checkpoint (a collective: every rank calls it at the same step)."""
        assert self.cfg.checkpoint_dir is not None
        t0 = time.perf_counter()
        rngs = gather_objects(rng_state(), self.dist)
        if self.sharded:  # gathered unsharded on rank 0 (collectives), written as a DDP run writes them
            model_state = sharding.full_model_state(self.raw_model)
            optimizer_state = sharding.full_optimizer_state(self.raw_model, self.optimizer)
        result = None
        if self.dist.is_main:
            root = ckpt.uri_to_path(self.cfg.checkpoint_dir)
            with ckpt.staging(root, self.step) as st:
                if self.sharded:  # a full fine-tune's weights too (fsdp refuses LoRA)
                    st.save_torch(ckpt.MODEL_FILE, model_state)
                    st.save_torch(ckpt.OPTIMIZER_FILE, optimizer_state)
                else:
                    if self.fine_tune is not None:  # the adapter alone with LoRA
                        self.fine_tune.save_weights(st, self.raw_model)
                    else:
                        st.save_torch(ckpt.MODEL_FILE, self.raw_model.state_dict())
                    st.save_torch(ckpt.OPTIMIZER_FILE, self.optimizer.state_dict())
                st.save_torch(
                    ckpt.TRAINER_STATE_FILE,
                    {
                        "step": self.step,
                        "scheduler": self.scheduler.state_dict(),
                        "scaler": self.scaler.state_dict(),
                        "rng": rngs,
                        "eval": self.evaluation.to_dict(),
                    },
                )
                if self.cfg.tokenizer_uri is not None:
                    st.write_bytes(TOKENIZER_FILE, self.tokenizer_path().read_bytes())
                ref = st.publish(self.metadata(loss))
                nbytes = st.nbytes
            best = self.evaluation.best_step
            ckpt.prune(root, self.cfg.checkpoint_keep, protect=(best,) if self.cfg.keep_best and best else ())
            result = (ref.step, ref.uri, ckpt.read_metadata(ref.path)["time"], nbytes)
        step, uri, when, nbytes = broadcast_object(result, self.dist)
        return CheckpointEvent(step=step, uri=uri, time=when, seconds=time.perf_counter() - t0, bytes=nbytes)

    def metadata(self, loss: float | None) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "job": cfg.job_name,
            "attempt": cfg.attempt,
            "loss": loss,
            "epoch": self.sampler.position(self.step * cfg.global_batch).epoch,
            "totalSteps": cfg.max_steps,
            "worldSize": self.dist.world_size,
            "strategy": cfg.strategy,
            "precision": cfg.precision,
            "seed": cfg.seed,
            "model": {
                "family": "gpt",
                "size": cfg.model_size,
                "config": self.model_config.to_dict(),
                "parameters": self.raw_model.num_parameters(),
            },
            "tokenizer": self.tokenizer_info(),
            "vocabSize": cfg.vocab_size,
            "evaluation": self.evaluation.to_dict(),
            "data": {"uri": cfg.dataset_uri, **self.sampler.position(self.step * cfg.global_batch).to_dict()},
            "batch": {
                "global": cfg.global_batch,
                "perDevice": cfg.per_device_batch,
                "accumulationSteps": cfg.accumulation_steps,
            },
            **({} if self.fine_tune is None else self.fine_tune.metadata(self.raw_model)),
        }

    def tokenizer_path(self) -> Path:
        assert self.cfg.tokenizer_uri is not None
        return resolve_data_uri(self.cfg.tokenizer_uri, data_root=self.data_root)

    def tokenizer_info(self) -> dict[str, object]:
        """What the metadata records about the tokenizer (its `tokenizer.json` is in the checkpoint)."""
        if self.cfg.tokenizer_uri is None:
            return ByteTokenizer().to_dict()
        return HFTokenizer.from_file(self.tokenizer_path()).to_dict() | {"uri": self.cfg.tokenizer_uri}


TOKENIZER_FILE = "tokenizer.json"
"""A checkpoint's copy of the tokenizer its data was read with (absent for the byte tokenizer)."""


def _sampler(tokens: Any, cfg: TrainConfig, field_name: str) -> WindowSampler:
    try:
        return WindowSampler(tokens, cfg.seq_len, cfg.seed, vocab_size=cfg.vocab_size)
    except ValueError as exc:
        raise ValueError(f"{field_name}: {exc}; use more data or a shorter sequenceLength") from None


@dataclass
class EvalState:
    """The evaluations so far: the best loss and its step, evaluations since it (early stopping)."""

    last: float | None = None
    last_step: int | None = None
    best: float | None = None
    best_step: int | None = None
    since_best: int = 0

    def record(self, step: int, loss: float, min_delta: float) -> bool:
        """Fold in an evaluation; True when it improved on the best by more than `min_delta`."""
        self.last, self.last_step = loss, step
        if self.best is None or loss < self.best - min_delta:
            self.best, self.best_step, self.since_best = loss, step, 0
            return True
        self.since_best += 1
        return False

    def to_dict(self) -> dict[str, Any]:
        return {
            "last": self.last,
            "lastStep": self.last_step,
            "best": self.best,
            "bestStep": self.best_step,
            "sinceBest": self.since_best,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> EvalState:
        """Inverse of `to_dict`; None (a checkpoint from before evaluation existed) is a fresh state."""
        if not data:
            return cls()
        return cls(data["last"], data["lastStep"], data["best"], data["bestStep"], data["sinceBest"])


def agree(flags: list[bool], dist: DistInfo, device: torch.device) -> list[bool]:
    """Logical OR of each flag over all ranks (one all-reduce)."""
    if dist.world_size == 1:
        return flags
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


@dataclass
class _StepClock:
    """When and at which step rank 0 last reported, and the data wait until then."""

    t_prev: float
    last_logged: int
    waited_before: float

    def reset(self, step: int, waited: float) -> None:
        self.t_prev, self.last_logged, self.waited_before = time.perf_counter(), step, waited


def _report(
    run: GPTRun, hooks: Hooks, loss_t: torch.Tensor, clock: _StepClock, eval_loss: float | None
) -> float:
    """Read the step's loss (and gradient norm: one copy from the device for both) and report it."""
    cfg, step = run.cfg, run.step
    grad_norm: float | None = None
    if run.grad_norm is None:
        loss_value = float(loss_t.item())
    else:  # one copy from the device for both (the loss read was already the step's only sync)
        loss_value, grad_norm = torch.stack([loss_t.float(), run.grad_norm.float()]).tolist()
    now = time.perf_counter()
    steps_since = max(1, step - clock.last_logged)
    dt = (now - clock.t_prev) / steps_since
    data_wait = (run.data_wait_seconds - clock.waited_before) / steps_since
    clock.t_prev, clock.last_logged, clock.waited_before = now, step, run.data_wait_seconds
    tokens_s = cfg.global_batch * cfg.seq_len / dt
    hooks.on_step(
        StepMetrics(
            step=step,
            total_steps=cfg.max_steps,
            epoch=step * cfg.global_batch // run.sampler.windows,
            loss=loss_value,
            lr=float(run.scheduler.get_last_lr()[0]),
            step_seconds=dt,
            samples_per_second=cfg.global_batch / dt,
            tokens_per_second=tokens_s,
            mfu=(run.flops_per_token * tokens_s / (run.peak * run.dist.world_size)) if run.peak else None,
            grad_norm=grad_norm,
            data_wait_seconds=data_wait,
            eval_loss=eval_loss,
        )
    )
    return loss_value


def _evaluate(run: GPTRun, result: RunResult) -> tuple[float | None, float, bool, bool]:
    """Evaluate when due: (eval loss or None, seconds it took, checkpoint as the new best, stop early)."""
    if not run.evaluation_due():
        return None, 0.0, False, False
    cfg, state = run.cfg, run.evaluation
    started = time.perf_counter()
    loss = run.evaluate()
    result.evals.append((run.step, loss))
    best = cfg.keep_best and state.best_step == run.step
    stop = cfg.early_stop_patience is not None and state.since_best >= cfg.early_stop_patience
    if stop and run.dist.is_main:
        log.info(
            "early stopping at step %d: no evaluation improved on %.4f (step %s) for %d evaluations",
            run.step,
            state.best,
            state.best_step,
            state.since_best,
        )
    return loss, time.perf_counter() - started, best, stop


def run_builtin(
    cfg: TrainConfig,
    dist: DistInfo,
    hooks: Hooks | None = None,
    *,
    data_root: str | None = None,
    log_every: int = 1,
) -> RunResult:
    """Train the built-in GPT to `cfg.max_steps`, resuming from the newest checkpoint; every rank calls it."""
    hooks = hooks or NullHooks()
    run = GPTRun(cfg, dist, hooks, data_root=data_root)
    ref = find_resume(cfg, dist, hooks)
    if ref is not None:
        run.load(ref)
        if dist.is_main:
            log.info("resumed from %s at step %d", ref.uri, run.step)
    start = run.step
    result = RunResult(status="completed", step=run.step, start_step=start)
    every_steps = cfg.checkpoint_every_steps
    every_s = cfg.checkpoint_every_minutes * 60 if cfg.checkpoint_every_minutes else None
    last_ckpt_time = time.monotonic()
    loss_value: float | None = None
    clock = _StepClock(time.perf_counter(), start, 0.0)

    def reported(step: int) -> bool:
        return dist.is_main and (step % log_every == 0 or step == cfg.max_steps)

    while run.step < cfg.max_steps:
        loss_t = run.train_step(measure_grad_norm=reported(run.step + 1))
        step = run.step
        eval_loss, eval_seconds, best_ckpt, early_stop = _evaluate(run, result)
        clock.t_prev += eval_seconds  # step time excludes evaluation time
        if reported(step) or (dist.is_main and eval_loss is not None):
            loss_value = _report(run, hooks, loss_t, clock, eval_loss)
            result.history.append(loss_value)
        stop = want_ckpt = False
        if dist.world_size == 1 or step % cfg.sync_every == 0:
            due = every_s is not None and time.monotonic() - last_ckpt_time >= every_s
            stop, want_ckpt = agree([hooks.stop_requested(), due], dist, run.device)
        if cfg.checkpoint_dir and (
            want_ckpt
            or stop
            or early_stop
            or best_ckpt
            or step == cfg.max_steps
            or (every_steps and step % every_steps == 0)
        ):
            event = run.save(loss_value)
            last_ckpt_time = time.monotonic()
            result.checkpoint = event
            hooks.on_checkpoint(event)
            # step time excludes checkpoint time
            clock.reset(step, run.data_wait_seconds)
        if stop:
            result.status = "stopped"
            break
        if early_stop:
            result.early_stopped = True
            break
    result.step = run.step
    result.loss = loss_value
    best = run.evaluation
    if best.best is not None and best.best_step is not None:
        result.best_eval = (best.best_step, best.best)
    if run.sharded:
        # FSDP's modules and hooks hold reference cycles that keep the process group's C++ object alive;
        # freed only at interpreter exit, after the group was destroyed, a rank was seen to abort there
        # ("terminate called without an active exception"). Free them now, while the group exists.
        del run
        gc.collect()
    return result
