"""Experiment tracking of a TrainingJob: TensorBoard event files and an MLflow run.

`spec.tracking` of a TrainingJob. The training driver (the head) writes what it reports anyway (loss,
learning rate, throughput, gradient norm, evaluation loss, checkpoints, and the scalars a user loop
passes to `TrainContext.report(metrics=...)`), so the built-in trainer and your own code are tracked
alike, and nothing is added to the training ranks' step. Unset: no tracking files, no MLflow calls.
"""

from __future__ import annotations

from pydantic import Field

from tandem.api.common import SpecModel

#: An MLflow tracking server (`http(s)://HOST[:PORT][/PATH]`) or a local store (`file:///PATH`).
TRACKING_URI_PATTERN = r"^(https?://[^\s]+|file:///[^\s]*)$"

#: Where TensorBoard event files go, inside the job's checkpoint storage.
TENSORBOARD_DIR = "tensorboard"


class MLflow(SpecModel):
    """Log the run to MLflow: one MLflow run per TrainingJob, continued by every attempt and resume."""

    tracking_uri: str = Field(max_length=2048, pattern=TRACKING_URI_PATTERN)
    """The tracking server, e.g. `http://mlflow.mlops:5000` (reachable from the head pod; credentials
    from the pod's `MLFLOW_TRACKING_USERNAME`/`_PASSWORD`/`_TOKEN`), or `file:///PATH`, a local store
    on a volume the head mounts (MLflow's file store, which MLflow keeps in maintenance mode)."""
    experiment: str | None = Field(default=None, min_length=1, max_length=256)
    """The MLflow experiment (created when missing). Unset: the TrainingJob's name."""


class Tracking(SpecModel):
    """Where the run's metrics are recorded besides the TrainingJob status and Prometheus."""

    tensorboard: bool = True
    """Write TensorBoard event files to `tensorboard/` in the checkpoint storage (needs
    `spec.checkpoint`; `tensorboard --logdir` on that folder shows every attempt of the job as one run).
    False: none."""
    mlflow: MLflow | None = None
    """Also log to MLflow. Unset: no MLflow."""
