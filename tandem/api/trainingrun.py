"""The run document: everything a TrainingJob's pod needs, in one versioned, validated object.

The operator builds one `TrainingRun` per attempt and puts it in the pods' environment as
`TANDEM_RUN` (JSON, camelCase); `tandem train head|worker` parses it with this same model. So a field
is declared once (the spec models), defaulted once, and reaches the process under one name: no value
travels in two variables, and a pod never re-derives what the operator decided (world size, where
checkpoints live, which checkpoint to resume from).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Final, Literal

from pydantic import Field, ValidationError

from tandem.api.common import ApiModel, describe_validation_error
from tandem.api.trainingjob import TrainingJobSpec
from tandem.errors import UserError

#: The environment variable that carries the run document into the pods.
RUN_ENV: Final = "TANDEM_RUN"
RUN_KIND: Final = "TrainingRun"
#: Bumped when a change would make an older pod misread a newer document (or the reverse).
RUN_VERSION: Final = "tandem.dev/run/v1"

#: Ray's GCS port on the head, which the workers dial through the head Service.
RAY_GCS_PORT: Final = 6379
#: The driver's Prometheus metrics port on every training pod.
METRICS_PORT: Final = 8080
#: Where `pvc://CLAIM/PATH` data sets are mounted in pods (the driver reads DATA_ROOT/CLAIM/PATH).
DATA_ROOT: Final = "/data"


class TrainingRun(ApiModel):
    """One attempt of a TrainingJob, as its pods receive it."""

    version: Literal["tandem.dev/run/v1"] = RUN_VERSION
    """The document's format; a pod refuses one it does not know."""
    kind: Literal["TrainingRun"] = RUN_KIND
    job_name: str = Field(min_length=1, max_length=253)
    """The TrainingJob's name (labels the metrics, names the progress record)."""
    namespace: str = Field(min_length=1, max_length=63)
    """The TrainingJob's namespace."""
    attempt: int = Field(default=0, ge=0)
    """Which gang this is (0 for the first); restarts and scheduling retries count up."""
    spec: TrainingJobSpec
    """The job's spec, as the API server stored it (defaults applied)."""
    head_address: str = Field(min_length=1, max_length=512)
    """`HOST:PORT` of the Ray head's GCS, as the workers reach it (the head Service)."""
    checkpoint_uri: str | None = None
    """Where this job's checkpoints live, as the pod sees it (`file:///...`); None: no checkpoints."""
    resume_from: str | None = None
    """A checkpoint to start from, chosen by the operator; None: the newest complete one, if any."""
    data_root: str = DATA_ROOT
    """Where `pvc://` data sets are mounted in the pod."""
    metrics_port: int = Field(default=METRICS_PORT, ge=1, le=65535)
    """The driver's Prometheus port."""
    worker_wait_seconds: float = Field(default=600.0, gt=0)
    """How long the head waits for every worker to join, and a worker for the head to appear."""

    def to_env_value(self) -> str:
        """The compact JSON that goes into `TANDEM_RUN`."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TrainingRun:
        """Parse `TANDEM_RUN`; a `UserError` that names the field for a missing or invalid document."""
        env = os.environ if environ is None else environ
        text = env.get(RUN_ENV)
        if not text:
            raise UserError(
                f"missing environment variable {RUN_ENV}: `tandem train head|worker` run in pods the "
                "operator creates; to run a job yourself use `tandem train JOB.yaml --local`"
            )
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise UserError(f"{RUN_ENV} is not valid JSON ({exc})") from None
        if isinstance(data, dict) and data.get("version") not in (None, RUN_VERSION):
            raise UserError(
                f"{RUN_ENV} is a run document of version {data.get('version')!r}, but this image reads "
                f"{RUN_VERSION!r}: run the operator and the workload image of the same Tandem release"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            lines = describe_validation_error(exc)
            raise UserError(f"invalid run document in {RUN_ENV}:\n  " + "\n  ".join(lines)) from None
