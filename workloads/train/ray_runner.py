"""Runs a training job under Ray Train's `TorchTrainer` (the head pod, and `tandem train --local`).

The driver (this process) starts `TorchTrainer.fit()` in a thread and meanwhile relays what the workers
report to a `ProgressReporter`: rank 0 sends step metrics and checkpoint events to a small named actor
(`Mailbox`, no CPU), which the driver drains twice a second. A stop request (SIGTERM to the head) goes the
other way: the driver flags the mailbox, every worker polls it once a second, and at the next sync step all
ranks write a checkpoint and return.

Checkpoints are Tandem's own (see `checkpoint`); after each one every rank calls `ray.train.report` and
rank 0 attaches a small *pointer* checkpoint (`pointer.json` with the URI) so that Ray Train's failure
handling (`FailureConfig(max_failures)`) restarts the worker group from it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.workloads.train.config import TrainConfig
from tandem.workloads.train.progress import ProgressReporter

log = logging.getLogger(__name__)

POINTER_FILE = "pointer.json"
WORKER_RESOURCE = "tandem-worker"
"""Custom Ray resource each worker pod offers once, so each training rank lands in its own pod."""


@dataclass
class RunOutcome:
    """How the run ended, as seen by the driver."""

    status: str  # completed | stopped | failed
    step: int | None = None
    loss: float | None = None
    error: str | None = None
    checkpoint_uri: str | None = None
    start_step: int | None = None


class Mailbox:
    """Rank 0 -> driver progress, driver -> ranks stop requests (a Ray actor; plain class for tests)."""

    def __init__(self) -> None:
        self._steps: list[dict[str, Any]] = []
        self._checkpoints: list[dict[str, Any]] = []
        self._final: dict[str, Any] | None = None
        self._stop = False

    def put_step(self, m: dict[str, Any]) -> None:
        self._steps.append(m)
        del self._steps[:-100]

    def put_checkpoint(self, ev: dict[str, Any]) -> None:
        self._checkpoints.append(ev)

    def put_final(self, final: dict[str, Any]) -> None:
        self._final = final

    def drain(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any] | None]:
        steps, ckpts = self._steps, self._checkpoints
        self._steps, self._checkpoints = [], []
        return steps, ckpts, self._final

    def request_stop(self) -> None:
        self._stop = True

    def stop_requested(self) -> bool:
        return self._stop


class RayHooks:
    """`loop.Hooks` inside a Ray Train worker."""

    def __init__(self, mailbox: Any, rank: int, *, min_interval: float = 0.2, poll_s: float = 1.0) -> None:
        self.mailbox, self.rank, self.min_interval = mailbox, rank, min_interval
        self._stop = threading.Event()
        self._done = threading.Event()
        self._last_sent = 0.0
        self._poller = threading.Thread(
            target=self._poll, args=(poll_s,), daemon=True, name="tandem-stop-poll"
        )
        self._poller.start()

    def _poll(self, poll_s: float) -> None:
        import ray

        while not self._done.wait(poll_s):
            try:
                if ray.get(self.mailbox.stop_requested.remote(), timeout=10):
                    self._stop.set()
                    return
            except Exception:  # the driver is gone or busy: keep training, try again
                continue

    def close(self) -> None:
        self._done.set()

    def on_step(self, metrics: Any) -> None:
        now = time.monotonic()
        if now - self._last_sent >= self.min_interval or metrics.step == metrics.total_steps:
            self._last_sent = now
            self.mailbox.put_step.remote(metrics.to_dict())

    def on_checkpoint(self, event: Any) -> None:
        import ray.train

        metrics = {"step": event.step, "checkpoint_uri": event.uri}
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        self.mailbox.put_checkpoint.remote(event.to_dict())
        with tempfile.TemporaryDirectory(prefix="tandem-pointer-") as tmp:
            Path(tmp, POINTER_FILE).write_text(json.dumps({"uri": event.uri, "step": event.step}))
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"pointer-{event.step:08d}-{time.time_ns()}",
            )

    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def resume_hint(self) -> str | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            try:
                uri = json.loads(Path(d, POINTER_FILE).read_text())["uri"]
            except (OSError, ValueError, KeyError):
                return None
        log.info("Ray Train restart: resuming from %s", uri)
        return str(uri)


def train_worker(config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs (module level, so Ray can import it by name)."""
    import ray.train

    from tandem.workloads.train.loop import DistInfo, run_builtin
    from tandem.workloads.train.session import run_entrypoint

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig.from_dict(config["train"])
    ctx = ray.train.get_context()
    dist = DistInfo(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank())
    mailbox = config["mailbox"]
    hooks = RayHooks(mailbox, dist.rank)
    try:
        if cfg.entrypoint:
            run_entrypoint(cfg, dist, hooks)
            final: dict[str, Any] = {"status": "stopped" if hooks.stop_requested() else "completed"}
        else:
            result = run_builtin(cfg, dist, hooks, data_root=config.get("data_root"))
            final = {
                "status": result.status,
                "step": result.step,
                "loss": result.loss,
                "start_step": result.start_step,
                "checkpoint_uri": result.checkpoint.uri if result.checkpoint else None,
            }
        if dist.rank == 0:
            ray.get(mailbox.put_final.remote(final))
    finally:
        hooks.close()


def scaling_config(cfg: TrainConfig, *, cluster: bool) -> Any:
    """Ray's ScalingConfig for the job: one rank per worker pod in a cluster, 1 CPU each locally."""
    from ray.train import ScalingConfig

    resources: dict[str, float] = {"CPU": max(1, int(cfg.cpus_per_worker)) if cluster else 1}
    if cluster:
        resources[WORKER_RESOURCE] = 1
    if cfg.use_gpu:
        resources["GPU"] = max(1, cfg.gpus_per_worker)
    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources)


def run(
    cfg: TrainConfig,
    reporter: ProgressReporter,
    *,
    address: str | None = None,
    cluster: bool = False,
    stop: threading.Event | None = None,
    data_root: str | None = None,
    num_cpus: int | None = None,
) -> RunOutcome:
    """Run the job on Ray (connecting to `address`, or starting/using a local instance) and wait for it."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started = False
    if not ray.is_initialized():
        ray.init(
            address=address,
            num_cpus=None if address else (num_cpus or max(2, cfg.num_workers)),
            log_to_driver=True,
            configure_logging=False,
        )
        started = True
    try:
        mailbox: Any = ray.remote(num_cpus=0)(Mailbox).remote()
        if cfg.checkpoint_dir:
            storage = ckpt_storage(cfg.checkpoint_dir)
        else:
            storage = str(Path(tempfile.gettempdir()) / "tandem-ray-train")
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"train": cfg.to_dict(), "mailbox": mailbox, "data_root": data_root},
            torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
            scaling_config=scaling_config(cfg, cluster=cluster),
            run_config=RunConfig(
                name=f"{cfg.job_name}-attempt-{cfg.attempt}-{os.getpid()}-{time.time_ns()}",
                storage_path=storage,
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        box: dict[str, Any] = {}

        def fit() -> None:
            try:
                box["result"] = trainer.fit()
            except BaseException as exc:
                box["error"] = exc

        thread = threading.Thread(target=fit, name="tandem-fit", daemon=True)
        thread.start()
        stop_sent = False
        final: dict[str, Any] | None = None
        while True:
            thread.join(timeout=0.5)
            if stop is not None and stop.is_set() and not stop_sent:
                mailbox.request_stop.remote()
                stop_sent = True
            steps, ckpts, final = ray.get(mailbox.drain.remote())
            for ev in ckpts:
                reporter.checkpoint(ev)
            for m in steps:
                reporter.step(m)
            if not thread.is_alive():
                break
        reporter.flush()
        if "error" in box:
            exc = box["error"]
            return RunOutcome(status="failed", error=f"{type(exc).__name__}: {exc}")
        final = final or {}
        return RunOutcome(
            status=final.get("status", "completed"),
            step=final.get("step"),
            loss=final.get("loss"),
            checkpoint_uri=final.get("checkpoint_uri"),
            start_step=final.get("start_step"),
        )
    finally:
        if started:
            ray.shutdown()


def ckpt_storage(checkpoint_dir: str) -> str:
    """Ray Train's run storage (pointer checkpoints, run state): `.ray-train` inside the checkpoint root."""
    from tandem.workloads.train.checkpoint import uri_to_path

    path = uri_to_path(checkpoint_dir) / ".ray-train"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)
