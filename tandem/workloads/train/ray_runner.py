"""Runs a training job under Ray Train's `TorchTrainer` (the head pod, and `tandem train --local`).

The driver (this process) starts `TorchTrainer.fit()` in a thread and meanwhile relays what the workers
report to a `ProgressReporter`: rank 0 buffers its step metrics and a background thread sends them, once a
second, to a small actor (`Mailbox`, no CPU), which the driver drains once a second; checkpoint events go
there as they happen. A stop request (SIGTERM to the head) goes the other way: the driver flags the
mailbox, rank 0 reads the flag in the reply to its next send, and at the next sync step all ranks agree
(`loop.agree`), write a checkpoint and return. That is two actor calls a second whatever the step rate
(plus one a second from each other rank that trains on a GPU, with a sample of it), none of them on the
training thread. Rank 0 also tells the mailbox when its worker group starts: every start after the first
is a Ray Train restart, which the driver counts (`tandem_train_restarts_total`).

`RAY_ENV` is how Tandem runs Ray for training (worker priority, Ray's own metrics, Ray Train's optional
actors); `apply_ray_env` puts it in the environment of every Ray process Tandem starts.

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
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.workloads.train.config import TrainConfig
from tandem.workloads.train.progress import ProgressReporter

log = logging.getLogger(__name__)

POINTER_FILE = "pointer.json"
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
"""The logger of Ray's notice that a new local instance has token authentication on (quiet runs)."""
WORKER_RESOURCE = "tandem-worker"
"""Custom Ray resource each worker pod offers once, so each training rank lands in its own pod."""

MAX_PENDING_STEPS = 1000
"""Step records kept while nobody reads them (the driver is busy or gone): the newest win."""

SEND_INTERVAL_S = 1.0
"""How often rank 0 sends its buffered step metrics (and learns of a stop request), and the driver drains."""

RAY_ENV: dict[str, str] = {
    # Ray starts its worker processes (the training ranks among them) at nice 15 so that its daemons win
    # on a busy node; in a training pod the ranks are the job, so they run at normal priority (as a plain
    # torch.distributed launch would).
    "RAY_worker_niceness": "0",
    # Ray's own Prometheus metrics (every Ray process records and exports them through the dashboard
    # agent): nobody scrapes them in a TrainingJob, Tandem exports its own (`tandem_train_*`).
    "RAY_enable_metrics_collection": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    # The dashboard agent's node statistics (CPU, memory of every Ray process, for the dashboard's node
    # view) every 30 s instead of 5 s.
    "REPORTER_UPDATE_INTERVAL_MS": "30000",
    # The log monitor (forwards the workers' output to the driver) tails its files every 0.1 s and, with
    # fewer than 1,000 files, also globs the log directory for new ones each time; look for new files
    # once a second instead (their output is read from the start, so nothing is lost).
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "LOG_NAME_UPDATE_INTERVAL_S": "1",
    # Ray Train's preemption watcher, an actor that polls for Ray nodes being drained by a Ray autoscaler:
    # Tandem's pods are never drained that way (a deleted pod gets SIGTERM, which the head relays).
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # No usage reports from training pods.
    "RAY_USAGE_STATS_ENABLED": "0",
}
"""Environment of the Ray processes Tandem starts for training (a variable already set wins)."""


def apply_ray_env(environ: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Add `RAY_ENV` to `environ` (default: this process's environment) where not set; returns it.

    Ray processes read these at start (they inherit the environment of the process that starts them),
    and Ray Train reads its own in the driver, so call this before `ray.init` / `ray start`.
    """
    env = os.environ if environ is None else environ
    for key, value in RAY_ENV.items():
        env.setdefault(key, value)
    return env


@contextmanager
def ray_env() -> Iterator[None]:
    """`apply_ray_env()` for the duration of the block: what it added is removed again at the end."""
    added = [key for key in RAY_ENV if key not in os.environ]
    apply_ray_env()
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@dataclass
class RunOutcome:
    """How the run ended, as seen by the driver."""

    status: str  # completed | stopped | failed
    step: int | None = None
    loss: float | None = None
    error: str | None = None
    checkpoint_uri: str | None = None
    start_step: int | None = None
    #: Early stopping ended the run before maxSteps (status is still "completed").
    early_stopped: bool = False
    #: The lowest evaluation loss of the run and its step (None without evaluation).
    best_eval_loss: float | None = None
    best_eval_step: int | None = None


@dataclass
class Drained:
    """What the mailbox held since the driver last looked."""

    steps: list[dict[str, Any]]
    checkpoints: list[dict[str, Any]]
    final: dict[str, Any] | None
    #: Worker groups that started (the first, then one per Ray Train restart).
    starts: int = 0
    #: The newest GPU sample of each rank that trains on a GPU.
    devices: dict[int, dict[str, float]] = field(default_factory=dict)


class Mailbox:
    """Rank 0 -> driver progress, driver -> ranks stop requests (a Ray actor; plain class for tests)."""

    def __init__(self) -> None:
        self._steps: list[dict[str, Any]] = []
        self._checkpoints: list[dict[str, Any]] = []
        self._final: dict[str, Any] | None = None
        self._stop = False
        self._starts = 0
        self._devices: dict[int, dict[str, float]] = {}
        #: The newest step this worker group's rank 0 delivered (its numbers go back after a restart).
        self._last_step = -1

    def put_start(self) -> None:
        """Rank 0 of a worker group began (Ray Train starts a new group after a rank dies)."""
        self._starts += 1
        self._last_step = -1

    def put_steps(self, steps: list[dict[str, Any]], device: dict[str, float] | None = None) -> bool:
        """Rank 0's step metrics since its last call, and its GPU sample; the reply says whether to stop.

        Steps already delivered are dropped: a call that rank 0 gave up waiting for may still arrive,
        and rank 0 then sends the same steps again with its next batch (each would count twice in the
        step-time histogram)."""
        fresh = [m for m in steps if m["step"] > self._last_step]
        if fresh:
            self._last_step = fresh[-1]["step"]
        self._steps.extend(fresh)
        del self._steps[:-MAX_PENDING_STEPS]
        if device:
            self._devices[0] = device
        return self._stop

    def put_device(self, rank: int, device: dict[str, float]) -> None:
        """Another rank's GPU sample."""
        self._devices[rank] = device

    def put_checkpoint(self, ev: dict[str, Any]) -> None:
        self._checkpoints.append(ev)

    def put_final(self, final: dict[str, Any]) -> None:
        self._final = final

    def drain(self) -> Drained:
        drained = Drained(self._steps, self._checkpoints, self._final, self._starts, self._devices)
        self._steps, self._checkpoints, self._starts, self._devices = [], [], 0, {}
        return drained

    def request_stop(self) -> None:
        self._stop = True


class RayHooks:
    """`loop.Hooks` inside a Ray Train worker.

    Rank 0 keeps its step metrics in a list; a background thread sends them to the mailbox every
    `interval` seconds and learns from the reply whether a stop was requested. The other ranks send
    nothing and never ask: the ranks OR their stop flags at every sync step, so rank 0 knowing suffices.
    A rank on a GPU (`sampler`) adds a sample of it from the same thread (rank 0 with its steps, the
    others in a call of their own), so the training thread never reads the device's state.
    """

    def __init__(
        self,
        mailbox: Any,
        rank: int,
        *,
        interval: float = SEND_INTERVAL_S,
        sampler: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        self.mailbox, self.rank, self.sampler = mailbox, rank, sampler
        self._pending: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._sender: threading.Thread | None = None
        if rank == 0 or sampler is not None:
            self._sender = threading.Thread(
                target=self._send_every, args=(interval,), daemon=True, name="tandem-progress"
            )
            self._sender.start()

    def _sample(self) -> dict[str, float] | None:
        if self.sampler is None:
            return None
        try:
            return self.sampler()
        except Exception:  # a device that cannot be read: no sample (metrics are best-effort)
            log.debug("GPU sample failed", exc_info=True)
            return None

    def _send(self) -> None:
        import ray

        device = self._sample()
        if self.rank != 0:
            if device:
                self.mailbox.put_device.remote(self.rank, device)
            return
        with self._lock:
            batch, self._pending = self._pending, []
        try:
            if ray.get(self.mailbox.put_steps.remote(batch, device), timeout=10):
                self._stop.set()
        except Exception:  # the driver is gone or busy: keep training, and the steps for the next send
            log.debug("progress not delivered (%d steps)", len(batch), exc_info=True)
            with self._lock:
                self._pending[:0] = batch
                del self._pending[:-MAX_PENDING_STEPS]

    def _send_every(self, interval: float) -> None:
        while not self._done.wait(interval):
            self._send()

    def close(self) -> None:
        """Stop the sender after delivering what is left (so the driver sees every step before the end)."""
        if self._sender is not None and not self._done.is_set():
            self._done.set()
            self._sender.join()
            self._send()
        self._done.set()

    def on_step(self, metrics: Any) -> None:
        with self._lock:
            self._pending.append(metrics.to_dict())
            del self._pending[:-MAX_PENDING_STEPS]

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

    from tandem.workloads.train.devices import GpuSampler, gpu_index
    from tandem.workloads.train.loop import DistInfo, run_builtin
    from tandem.workloads.train.session import run_entrypoint

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if config.get("quiet"):
        # A local run's terminal: warnings only. Ray Train gives the root logger a console handler at
        # INFO (so basicConfig does nothing), and some of its loggers are named after their files, out
        # of reach of `LoggingConfig`: one logs every `ray.train.report`.
        logging.getLogger().setLevel(logging.WARNING)
    cfg = TrainConfig.from_dict(config["train"])
    ctx = ray.train.get_context()
    dist = DistInfo(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank())
    mailbox = config["mailbox"]
    if dist.rank == 0:
        mailbox.put_start.remote()
    index = gpu_index(cfg.use_gpu, dist.local_rank)
    hooks = RayHooks(mailbox, dist.rank, sampler=None if index is None else GpuSampler(index).sample)
    try:
        if cfg.entrypoint:  # the session API reports its outcome as the built-in trainer does
            result = run_entrypoint(cfg, dist, hooks)
        else:
            result = run_builtin(cfg, dist, hooks, data_root=config.get("data_root"))
        final: dict[str, Any] = {
            "status": result.status,
            "step": result.step,
            "loss": result.loss,
            "start_step": result.start_step,
            "checkpoint_uri": result.checkpoint.uri if result.checkpoint else None,
            "early_stopped": result.early_stopped,
            "best_eval_loss": result.best_eval[1] if result.best_eval else None,
            "best_eval_step": result.best_eval[0] if result.best_eval else None,
        }
    finally:
        hooks.close()
    if dist.rank == 0:
        ray.get(mailbox.put_final.remote(final))


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
    quiet: bool = False,
) -> RunOutcome:
    """Run the job on Ray and wait for it: on the Ray this process is connected to, else on `address`,
    else on a Ray instance of its own, started here and stopped at the end (never one found through
    `RAY_ADDRESS` or an earlier `ray start`: joining it failed, or shared another run's resources, and
    a stale one's address made `tandem train --local` fail with a traceback).

    `quiet` keeps Ray Train's INFO lines (worker group started, every checkpoint reported) out of the
    driver's output, for a terminal with a progress line. `RAY_ENV` is in this process's environment
    meanwhile (a Ray instance started here inherits it).
    """
    with ray_env():
        return _run(
            cfg,
            reporter,
            address=address,
            cluster=cluster,
            stop=stop,
            data_root=data_root,
            num_cpus=num_cpus,
            quiet=quiet,
        )


def _start_ray(cfg: TrainConfig, address: str | None, num_cpus: int | None, *, quiet: bool) -> bool:
    """Connect to `address`, or start a Ray instance of this process's own; False if already connected."""
    import ray

    if ray.is_initialized():
        return False
    if quiet:  # it says token authentication is on, as it should be, on every start
        logging.getLogger(TOKEN_AUTH_LOGGER).setLevel(logging.ERROR)
    ray.init(
        address=address or "local",  # "local": a new instance, whatever RAY_ADDRESS or `ray start` say
        num_cpus=None if address else (num_cpus or max(2, cfg.num_workers)),
        log_to_driver=True,
        configure_logging=False,
    )
    return True


def _run(
    cfg: TrainConfig,
    reporter: ProgressReporter,
    *,
    address: str | None,
    cluster: bool,
    stop: threading.Event | None,
    data_root: str | None,
    num_cpus: int | None,
    quiet: bool,
) -> RunOutcome:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started = _start_ray(cfg, address, num_cpus, quiet=quiet)
    try:
        mailbox: Any = ray.remote(num_cpus=0)(Mailbox).remote()
        if cfg.checkpoint_dir:
            storage = ckpt_storage(cfg.checkpoint_dir)
        else:
            storage = str(Path(tempfile.gettempdir()) / "tandem-ray-train")
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={
                "train": cfg.to_dict(),
                "mailbox": mailbox,
                "data_root": data_root,
                "quiet": quiet,
            },
            torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
            scaling_config=scaling_config(cfg, cluster=cluster),
            run_config=RunConfig(
                name=f"{cfg.job_name}-attempt-{cfg.attempt}-{os.getpid()}-{time.time_ns()}",
                storage_path=storage,
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                # Ray Train v2's RunConfig (what runs) has it; mypy resolves the name to v1's.
                logging_config=LoggingConfig(log_level="WARNING" if quiet else "INFO"),  # type: ignore[call-arg]
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
        groups = 0
        order = InStepOrder()
        while True:
            thread.join(timeout=SEND_INTERVAL_S)
            # Liveness before the drain: once fit() has returned, every rank has delivered its last steps,
            # checkpoints and final record, so this drain is the last one needed. (Checked after the
            # drain, a run ending between the two lost what the ranks sent in that window.)
            finished = not thread.is_alive()
            if stop is not None and stop.is_set() and not stop_sent:
                mailbox.request_stop.remote()
                stop_sent = True
            drained: Drained = ray.get(mailbox.drain.remote())
            final = drained.final
            for _ in range(drained.starts):
                if groups:  # every worker group after the first is a restart
                    reporter.restarted()
                groups += 1
            for rank, sample in sorted(drained.devices.items()):
                reporter.device(rank, sample)
            events = order.feed(drained) + (order.rest() if finished else [])
            for kind, item in events:
                if kind == "checkpoint":
                    reporter.checkpoint(item)
                else:
                    reporter.step(item)
            if finished:
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
            early_stopped=bool(final.get("early_stopped")),
            best_eval_loss=final.get("best_eval_loss"),
            best_eval_step=final.get("best_eval_step"),
        )
    finally:
        if started:
            ray.shutdown()


class InStepOrder:
    """Puts the mailbox's checkpoint events after the steps they follow.

    Rank 0 sends a checkpoint event at once but its steps once a second, so a drain often holds the
    checkpoint at step N before step N itself (or without it: it comes with the next drain). Passed on
    as drained, the progress line showed step N with step 1's loss, or named a checkpoint its step count
    had not reached. A checkpoint is held until a step at or past it arrives (or the run ends); the
    steps keep their order (after a Ray Train restart their numbers go back).
    """

    def __init__(self) -> None:
        self._held: list[dict[str, Any]] = []

    def feed(self, drained: Drained) -> list[tuple[str, dict[str, Any]]]:
        self._held += drained.checkpoints
        out: list[tuple[str, dict[str, Any]]] = []
        for m in drained.steps:
            # Just before the step it was taken at: the record of step N names the checkpoint of N.
            out += self._release(before=m["step"] + 1)
            out.append(("step", m))
        return out

    def rest(self) -> list[tuple[str, dict[str, Any]]]:
        """The checkpoints still held (the run ended)."""
        return self._release(before=None)

    def _release(self, *, before: int | None) -> list[tuple[str, dict[str, Any]]]:
        """The held checkpoints (in order) of steps below `before` (all with None)."""
        out: list[tuple[str, dict[str, Any]]] = []
        while self._held and (before is None or self._held[0]["step"] < before):
            out.append(("checkpoint", self._held.pop(0)))
        return out


def ckpt_storage(checkpoint_dir: str) -> str:
    """Ray Train's run storage (pointer checkpoints, run state): `.ray-train` inside the checkpoint root."""
    from tandem.workloads.train.checkpoint import uri_to_path

    path = uri_to_path(checkpoint_dir) / ".ray-train"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)
