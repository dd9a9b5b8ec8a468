"""`spec.tracking`: the run's metrics in TensorBoard event files and in MLflow, written by the driver.

The driver (the head pod, or `tandem train --local`) already receives every step's metrics and every
checkpoint from rank 0 (`ray_runner`), for the built-in trainer and for user loops on the session API
alike; `ProgressReporter` hands them to a `Tracker` too. So tracking costs the training ranks nothing,
and the two kinds of run are tracked the same way.

- `TensorBoardTracker`: tensorboardX's `SummaryWriter` (MIT; already a dependency of Ray Train; no
  TensorFlow) into `tensorboard/` of the checkpoint root, one event file per attempt; TensorBoard joins
  them by step, so a resumed job reads as one run. The writer queues and flushes on its own thread.
- `MLflowTracker`: the MLflow client (`mlflow-skinny`, Apache-2.0), on a thread of its own with a
  queue, because a tracking server that is slow or away (its client retries for minutes) must never
  hold up the driver's progress loop. One MLflow run per checkpoint root (found again by its tag), so
  every attempt and resume continues the same run.

A tracker that fails logs a warning and never stops training. Nothing heavy is imported until a tracker
is opened.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import queue
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from tandem.api.tracking import TENSORBOARD_DIR
from tandem.errors import UserError

if TYPE_CHECKING:
    from tandem.api.tracking import Tracking
    from tandem.workloads.train.config import TrainConfig

log = logging.getLogger(__name__)

#: Step-metric field -> the scalar's name in TensorBoard and MLflow.
STEP_SCALARS: Final = {
    "loss": "train/loss",
    "lr": "train/learning_rate",
    "tokens_per_second": "train/tokens_per_second",
    "samples_per_second": "train/samples_per_second",
    "step_seconds": "train/step_seconds",
    "grad_norm": "train/grad_norm",
    "mfu": "train/mfu",
    "data_wait_seconds": "train/data_wait_seconds",
    "eval_loss": "eval/loss",
}
#: Rates and the learning rate are left out when 0: a user loop that does not report them.
_ZERO_MEANS_UNSET: Final = {"lr", "tokens_per_second", "samples_per_second"}

#: MLflow's tag naming the checkpoint root a run belongs to (how a later attempt finds the run again).
MLFLOW_RUN_TAG: Final = "tandem.checkpoints"
#: MLflow's limit of metrics in one `log_batch` call.
MLFLOW_BATCH: Final = 1000
#: The end states of MLflow runs, by how the Tandem run ended.
MLFLOW_STATUS: Final = {"completed": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}


def scalars(m: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of one step's metrics (`loop.StepMetrics.to_dict()`), by tracking name."""
    out: dict[str, float] = {}
    for key, name in STEP_SCALARS.items():
        value = m.get(key)
        if value is None or (key in _ZERO_MEANS_UNSET and value == 0):
            continue
        out[name] = float(value)
    for key, value in (m.get("extra") or {}).items():
        out[str(key)] = float(value)
    return out


class Tracker(Protocol):
    """Receives what the driver's `ProgressReporter` receives."""

    def step(self, m: Mapping[str, Any]) -> None: ...

    def checkpoint(self, ev: Mapping[str, Any]) -> None: ...

    def close(self, status: str) -> None:
        """The run ended (`completed`, `stopped` or `failed`): write out what is left."""


# ------------------------------------------------------------------------------------------------
# From the spec
# ------------------------------------------------------------------------------------------------


def tracking_config(tracking: Tracking, checkpoint_dir: str | None, job_name: str) -> dict[str, Any]:
    """The `TrainConfig` fields of `spec.tracking`, checked (a `UserError` naming the field)."""
    fields: dict[str, Any] = {}
    if tracking.tensorboard:
        if not checkpoint_dir:
            raise UserError(
                "spec.tracking.tensorboard: TensorBoard event files are written next to the checkpoints, "
                "and this job has none: set spec.checkpoint, or spec.tracking.tensorboard: false"
            )
        root = checkpoint_dir.removeprefix("file://")
        fields["tensorboard_dir"] = str(Path(root) / TENSORBOARD_DIR)
    if tracking.mlflow is not None:
        if importlib.util.find_spec("mlflow") is None:
            raise UserError(
                "spec.tracking.mlflow: the MLflow client is not installed where the driver runs; "
                "install mlflow-skinny in the training image (pip install mlflow-skinny), or remove "
                "spec.tracking.mlflow"
            )
        fields["mlflow_uri"] = tracking.mlflow.tracking_uri
        fields["mlflow_experiment"] = tracking.mlflow.experiment or job_name
    return fields


def open_tracker(cfg: TrainConfig) -> Tracker | None:
    """The run's trackers (None when `spec.tracking` asks for none). Opened before Ray starts, so an
    unwritable event-file folder is an error naming the field, not a traceback mid-run."""
    trackers: list[Tracker] = []
    if cfg.tensorboard_dir:
        trackers.append(TensorBoardTracker(Path(cfg.tensorboard_dir), job=cfg.job_name, attempt=cfg.attempt))
    if cfg.mlflow_uri:
        trackers.append(
            MLflowTracker(
                cfg.mlflow_uri,
                experiment=cfg.mlflow_experiment or cfg.job_name,
                run_name=cfg.job_name,
                key=cfg.checkpoint_dir,
                params=run_params(cfg),
            )
        )
    return Trackers(trackers) if trackers else None


def run_params(cfg: TrainConfig) -> dict[str, str]:
    """What MLflow records as the run's parameters: the settings that say what was trained."""
    params: dict[str, Any] = {
        "job": cfg.job_name,
        "workers": cfg.num_workers,
        "precision": str(cfg.precision),
        "seed": cfg.seed,
        "batch.global": cfg.global_batch,
        "batch.perDevice": cfg.per_device_batch,
    }
    if cfg.entrypoint:
        params["entrypoint"] = cfg.entrypoint
        params |= {f"config.{k}": v for k, v in cfg.user_config.items() if not isinstance(v, dict | list)}
    else:
        params |= {
            "model": f"gpt-{cfg.model_size}",
            "dataset": cfg.dataset_uri,
            "maxSteps": cfg.max_steps,
            "learningRate": cfg.learning_rate,
            "sequenceLength": cfg.seq_len,
            "warmupSteps": cfg.warmup_steps,
            "weightDecay": cfg.weight_decay,
        }
    return {k: str(v)[:500] for k, v in params.items()}  # MLflow's limit on a parameter's value


class Trackers:
    """Several trackers as one; one that raises is logged and the others go on."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def _each(self, method: str, arg: Any) -> None:
        for t in self.trackers:
            try:
                getattr(t, method)(arg)
            except Exception as exc:  # tracking must never stop training
                log.warning("%s.%s failed: %s", type(t).__name__, method, exc)

    def step(self, m: Mapping[str, Any]) -> None:
        self._each("step", m)

    def checkpoint(self, ev: Mapping[str, Any]) -> None:
        self._each("checkpoint", ev)

    def close(self, status: str) -> None:
        self._each("close", status)


# ------------------------------------------------------------------------------------------------
# TensorBoard
# ------------------------------------------------------------------------------------------------


class TensorBoardTracker:
    """Scalars into TensorBoard event files in `logdir` (one file per attempt; same tags every time).

    The writer's thread flushes every `flush_secs`, and once the steps up to a checkpoint have arrived
    (checkpoint events can overtake the step reports before them), so a killed driver loses at most the
    steps after its newest checkpoint, which the resumed run trains and reports again.
    """

    def __init__(self, logdir: Path, *, job: str, attempt: int = 0, flush_secs: int = 2) -> None:
        from tensorboardX import SummaryWriter  # type: ignore[import-untyped]

        try:
            logdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(
                f"spec.tracking.tensorboard: cannot create {logdir} ({exc.strerror}); the checkpoint "
                "storage must be writable by the driver, or set spec.tracking.tensorboard: false"
            ) from None
        self.logdir = logdir
        self._flush_at: int | None = None  # a checkpoint's step, until its step report arrives
        self._writer = SummaryWriter(
            str(logdir), flush_secs=flush_secs, filename_suffix=f".{job}.attempt-{attempt}"
        )

    def step(self, m: Mapping[str, Any]) -> None:
        now = time.time()
        for name, value in scalars(m).items():
            self._writer.add_scalar(name, value, global_step=int(m["step"]), walltime=now)
        if self._flush_at is not None and m["step"] >= self._flush_at:
            self._flush_at = None
            self._writer.flush()

    def checkpoint(self, ev: Mapping[str, Any]) -> None:
        self._flush_at = int(ev["step"])
        now = time.time()
        self._writer.add_scalar(
            "checkpoint/save_seconds", ev["seconds"], global_step=ev["step"], walltime=now
        )
        self._writer.add_scalar("checkpoint/bytes", ev["bytes"], global_step=ev["step"], walltime=now)

    def close(self, status: str) -> None:
        self._writer.close()


# ------------------------------------------------------------------------------------------------
# MLflow
# ------------------------------------------------------------------------------------------------


class MLflowTracker:
    """Metrics into one MLflow run, sent from a background thread in batches.

    `key` (the checkpoint root) tags the run: a later attempt or a resumed local run with the same key
    continues it (status back to RUNNING) instead of starting another. Without a key every run is new.
    """

    def __init__(
        self,
        tracking_uri: str,
        *,
        experiment: str,
        run_name: str,
        key: str | None,
        params: Mapping[str, str] | None = None,
        interval: float = 2.0,
    ) -> None:
        if tracking_uri.startswith("file:"):
            # Asked for in the spec: MLflow refuses its file store unless told that this is wanted.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.tracking_uri, self.experiment, self.run_name, self.key = tracking_uri, experiment, run_name, key
        self.params = dict(params or {})
        self.interval = interval
        self.run_id: str | None = None
        self.errors = 0
        self._queue: queue.SimpleQueue[tuple[str, float, int, int] | None] = queue.SimpleQueue()
        self._status = "completed"
        self._thread = threading.Thread(target=self._run, name="tandem-mlflow", daemon=True)
        self._thread.start()

    def step(self, m: Mapping[str, Any]) -> None:
        ms = int(time.time() * 1000)
        for name, value in scalars(m).items():
            self._queue.put((name, value, ms, int(m["step"])))

    def checkpoint(self, ev: Mapping[str, Any]) -> None:
        ms = int(time.time() * 1000)
        self._queue.put(("checkpoint/save_seconds", float(ev["seconds"]), ms, int(ev["step"])))
        self._queue.put(("checkpoint/bytes", float(ev["bytes"]), ms, int(ev["step"])))

    def close(self, status: str, timeout: float = 60.0) -> None:
        """Send what is queued and end the MLflow run (waits at most `timeout` seconds for the server)."""
        self._status = status
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning(
                "MLflow (%s) did not take the run's last metrics within %.0fs", self.tracking_uri, timeout
            )

    # -- the thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        done = False
        while not done:
            batch, done = self._take()
            if self.run_id is None:
                self._call(lambda: self._start(client), "start the run")
            if self.run_id is not None and batch:
                self._send(client, batch)
        if self.run_id is not None:
            status = MLFLOW_STATUS.get(self._status, "FINISHED")
            self._call(lambda: client.set_terminated(self.run_id, status=status), "end the run")

    def _take(self) -> tuple[list[tuple[str, float, int, int]], bool]:
        """What arrived within one interval (waiting for the first item); True once closed."""
        items: list[tuple[str, float, int, int]] = []
        deadline = time.monotonic() + self.interval
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return items, False
            if item is None:
                return items, True
            items.append(item)

    def _start(self, client: Any) -> None:
        experiment = client.get_experiment_by_name(self.experiment)
        experiment_id = (
            client.create_experiment(self.experiment) if experiment is None else experiment.experiment_id
        )
        run = None
        # MLflow's filter strings have no escapes: quote the key with a quote it does not contain.
        quote = next((q for q in ('"', "'") if self.key and q not in self.key), None)
        if self.key and quote:
            found = client.search_runs(
                [experiment_id],
                filter_string=f"tags.`{MLFLOW_RUN_TAG}` = {quote}{self.key}{quote}",
                max_results=1,
                order_by=["attributes.start_time DESC"],
            )
            run = found[0] if found else None
        if run is None:
            tags = {MLFLOW_RUN_TAG: self.key} if self.key else {}
            run = client.create_run(experiment_id, run_name=self.run_name, tags=tags)
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in self.params.items()]
            for i in range(0, len(params), 100):  # MLflow's limit of parameters per call
                client.log_batch(run.info.run_id, params=params[i : i + 100])
        else:
            client.update_run(run.info.run_id, status="RUNNING")
        self.run_id = run.info.run_id

    def _send(self, client: Any, batch: list[tuple[str, float, int, int]]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(name, value, ms, step) for name, value, ms, step in batch]
        for i in range(0, len(metrics), MLFLOW_BATCH):
            chunk = metrics[i : i + MLFLOW_BATCH]
            self._call(functools.partial(client.log_batch, self.run_id, metrics=chunk), "log metrics")

    def _call(self, fn: Any, what: str) -> None:
        try:
            fn()
        except Exception as exc:  # tracking must never stop training; say so, once in a while
            self.errors += 1
            if self.errors == 1 or self.errors % 100 == 0:
                log.warning(
                    "MLflow (%s): could not %s (%d errors so far): %s",
                    self.tracking_uri,
                    what,
                    self.errors,
                    exc,
                )
