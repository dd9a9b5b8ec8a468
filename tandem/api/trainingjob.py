"""The TrainingJob resource: distributed PyTorch training on a gang-scheduled Ray cluster."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import ClassVar, Final, Literal

from pydantic import Field, computed_field

from tandem.api.common import (
    API_VERSION,
    CONDITIONS_LIST_EXTRA,
    DNS_SUBDOMAIN_PATTERN,
    GPU_PRODUCT_DESCRIPTION,
    LABEL_VALUE_PATTERN,
    URI_PATTERN,
    ApiModel,
    Condition,
    FreeForm,
    NodeSelector,
    ObjectMeta,
    Precision,
    Resources,
    Rule,
    SpecModel,
    StatusModel,
    Tolerations,
    display_fraction,
    display_usd,
    gpu_product_rule,
)

KIND: Final = "TrainingJob"
PLURAL: Final = "trainingjobs"
SINGULAR: Final = "trainingjob"
SHORT_NAMES = ("tj",)

ENTRYPOINT_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"

# ------------------------------------------------------------------------------------------------
# Spec
# ------------------------------------------------------------------------------------------------


class ModelSize(StrEnum):
    """Size of the built-in GPT: `tiny` (smoke tests, CPU), `small`, `medium`, `124m` (GPT-2 small)."""

    TINY = "tiny"
    SMALL = "small"
    MEDIUM = "medium"
    GPT2_124M = "124m"


class Dataset(SpecModel):
    """Where the training text comes from."""

    uri: str = Field(max_length=2048, pattern=URI_PATTERN)
    """`pvc://CLAIM/PATH` (the claim is mounted), `file:///PATH` (inside the pod) or `s3://BUCKET/KEY`
    (downloaded by the training driver with the pod's AWS credentials; see docs/training.md)."""


class BuiltinTrainer(SpecModel):
    """Train one of Tandem's built-in models; no code of your own."""

    model: Literal["gpt"] = "gpt"
    """Model family. Only `gpt` (a decoder-only transformer) for now."""
    size: ModelSize = ModelSize.TINY
    """Model size."""
    dataset: Dataset
    """Training data."""
    max_steps: int = Field(default=2000, ge=1)
    """Optimizer steps to train for; the job succeeds when it reaches them."""
    learning_rate: float = Field(default=3e-4, gt=0, le=1)
    """Peak learning rate (AdamW, cosine decay)."""


class Trainer(SpecModel):
    """What to train: exactly one of `builtin` or `entrypoint`."""

    builtin: BuiltinTrainer | None = None
    """A built-in model and data set."""
    entrypoint: str | None = Field(default=None, max_length=256, pattern=ENTRYPOINT_PATTERN)
    """Your training loop, `package.module:function`, importable in the image; called once per worker
    with the `config` object."""
    config: FreeForm | None = None
    """Free-form settings passed to `entrypoint` as a dict; kept as written."""

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            rule="has(self.builtin) != has(self.entrypoint)",
            message="spec.trainer: set exactly one of spec.trainer.builtin (a built-in model) "
            "or spec.trainer.entrypoint (your own training function)",
            check=lambda t: (t.builtin is None) != (t.entrypoint is None),
        ),
        Rule(
            rule="!has(self.config) || has(self.entrypoint)",
            message="spec.trainer.config is passed to spec.trainer.entrypoint: set an entrypoint or "
            "remove config (built-in trainers take their settings from spec.trainer.builtin)",
            check=lambda t: t.config is None or t.entrypoint is not None,
            field_path=".config",
            reason="FieldValueForbidden",
        ),
    )


class Workers(SpecModel):
    """The training worker pods (one Ray worker and one DDP rank each)."""

    replicas: int = Field(default=1, ge=1, le=1024)
    """Number of workers; all start together (gang scheduling) or none does."""
    resources: Resources = Field(default_factory=Resources)
    """Resources of each worker."""
    gpu_product: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        pattern=LABEL_VALUE_PATTERN,
        description=GPU_PRODUCT_DESCRIPTION,
    )
    node_selector: NodeSelector | None = None
    """Node labels a worker pod needs."""
    tolerations: Tolerations | None = None
    """Taints the worker pods tolerate (GPU nodes are often tainted)."""

    cel_rules: ClassVar[tuple[Rule, ...]] = (gpu_product_rule("spec.workers."),)


class Head(SpecModel):
    """The Ray head pod, which coordinates the workers and runs no training itself."""

    resources: Resources = Field(default_factory=Resources)
    """Resources of the head pod (no GPU needed)."""


class Batch(SpecModel):
    """Batch sizes, in samples. Gradient accumulation steps = global / (perDevice x workers.replicas)."""

    global_: int | None = Field(default=None, alias="global", ge=1)
    """Samples per optimizer step over all workers. Unset: perDevice x workers.replicas (no
    accumulation). Must be a multiple of perDevice x workers.replicas."""
    per_device: int = Field(default=8, ge=1, le=65536)
    """Samples per forward/backward pass on one worker."""


class CheckpointStorage(SpecModel):
    """Where checkpoints go: exactly one of `pvc` or `uri`. Must be shared by all workers."""

    pvc: str | None = Field(default=None, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """Name of a PersistentVolumeClaim (ReadWriteMany) in the job's namespace."""
    uri: str | None = Field(default=None, max_length=2048, pattern=URI_PATTERN)
    """A `file:///PATH` directory on a shared volume that every pod of the job mounts (e.g. through
    the image or a node mount). Object storage (`s3://`) is not supported for checkpoints."""

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            rule="has(self.pvc) != has(self.uri)",
            message="spec.checkpoint.storage: set exactly one of spec.checkpoint.storage.pvc "
            "(a PersistentVolumeClaim name) or spec.checkpoint.storage.uri",
            check=lambda s: (s.pvc is None) != (s.uri is None),
        ),
        Rule(
            rule="!has(self.uri) || self.uri.startsWith('file:///')",
            message="spec.checkpoint.storage.uri: checkpoints are written to a shared file system, "
            "not object storage (s3:// and other schemes are not supported): use a pvc "
            "(spec.checkpoint.storage.pvc) or a file:///PATH that every pod mounts",
            check=lambda s: s.uri is None or s.uri.startswith("file:///"),
            field_path=".uri",
        ),
        Rule(
            rule="self == oldSelf",
            message="spec.checkpoint.storage is immutable: the job resumes from checkpoints already "
            "written there (create a new TrainingJob to use other storage)",
            check=None,
        ),
    )


class Checkpoint(SpecModel):
    """Checkpointing; the job resumes from the latest complete checkpoint after any failure."""

    storage: CheckpointStorage
    """Where checkpoints are written."""
    every_steps: int = Field(default=500, ge=1)
    """Checkpoint every this many optimizer steps (and at the end)."""
    every_minutes: int | None = Field(default=None, ge=1, le=1440)
    """Also checkpoint when this many minutes passed since the last checkpoint."""
    keep: int = Field(default=3, ge=1, le=100)
    """Number of most recent checkpoints kept; older ones are deleted."""


class FailurePolicy(SpecModel):
    """What happens when a pod fails: the whole gang restarts from the latest checkpoint."""

    max_restarts: int = Field(default=5, ge=0, le=1000)
    """Gang restarts before the job is marked Failed."""
    backoff_seconds: int = Field(default=10, ge=0, le=3600)
    """Delay before the first restart; doubles on each further restart (capped at 10 minutes)."""


class Scheduling(SpecModel):
    """How the gang of pods is scheduled."""

    gang_timeout_seconds: int = Field(default=300, ge=1, le=86400)
    """How long the gang may wait for all its pods to be scheduled before the attempt is retried."""
    priority_class_name: str | None = Field(default=None, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """PriorityClass of the job's pods."""
    queue_name: str | None = Field(default=None, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """Kueue LocalQueue to admit the job through (sets the `kueue.x-k8s.io/queue-name` label)."""
    scheduler_name: str | None = Field(default=None, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """Scheduler of the job's pods; unset uses the cluster's default scheduler."""


class TrainingJobSpec(SpecModel):
    """The desired state of a TrainingJob."""

    image: str | None = Field(default=None, min_length=1, max_length=1024)
    """Container image of the head and workers. Unset: the operator's default training image."""
    trainer: Trainer
    """What to train."""
    workers: Workers = Field(default_factory=Workers)
    """The worker pods."""
    head: Head = Field(default_factory=Head)
    """The Ray head pod."""
    precision: Precision = Precision.BF16
    """Mixed-precision mode: `fp32`, `bf16` or `fp16` (fp32 master weights in every mode)."""
    batch: Batch = Field(default_factory=Batch)
    """Batch sizes."""
    checkpoint: Checkpoint | None = None
    """Checkpointing. Unset: no checkpoints, so a restart begins again at step 0."""
    failure_policy: FailurePolicy = Field(default_factory=FailurePolicy)
    """Restarts after failures."""
    scheduling: Scheduling = Field(default_factory=Scheduling)
    """Gang scheduling and queueing."""
    suspend: bool = False
    """True stops the pods (after a checkpoint when possible); false again resumes the job."""
    active_deadline_seconds: int | None = Field(default=None, ge=1)
    """Fail the job when it has run this long (seconds since it first started running)."""
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)
    """Delete the finished job (Succeeded or Failed) this many seconds after it finished."""

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            rule="!has(self.batch) || !has(self.batch.global) || "
            "self.batch.global % (self.batch.perDevice * "
            "(has(self.workers) && has(self.workers.replicas) ? self.workers.replicas : 1)) == 0",
            message="spec.batch.global must be a multiple of spec.batch.perDevice x spec.workers.replicas "
            "(gradient accumulation steps = global / (perDevice x replicas)): change one of the three "
            "or leave spec.batch.global unset",
            check=lambda s: (
                s.batch.global_ is None or s.batch.global_ % (s.batch.per_device * s.workers.replicas) == 0
            ),
            field_path=".batch.global",
        ),
    )

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all workers."""
        return self.batch.global_ or self.batch.per_device * self.workers.replicas

    @property
    def accumulation_steps(self) -> int:
        """Gradient accumulation steps per optimizer step."""
        return self.global_batch // (self.batch.per_device * self.workers.replicas)


# ------------------------------------------------------------------------------------------------
# Status
# ------------------------------------------------------------------------------------------------


class TrainingJobPhase(StrEnum):
    """Where a TrainingJob is in its life."""

    PENDING = "Pending"
    SCHEDULING = "Scheduling"
    RUNNING = "Running"
    RECOVERING = "Recovering"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    @property
    def finished(self) -> bool:
        """True for the terminal phases."""
        return self in (TrainingJobPhase.SUCCEEDED, TrainingJobPhase.FAILED)


class ConditionType(StrEnum):
    """Condition types of a TrainingJob."""

    SCHEDULED = "Scheduled"
    RUNNING = "Running"
    CHECKPOINT_AVAILABLE = "CheckpointAvailable"
    COMPLETE = "Complete"
    FAILED = "Failed"


class WorkerCounts(StatusModel):
    """Worker pods wanted and ready."""

    desired: int | None = Field(default=None, ge=0)
    """Workers the current attempt runs (spec.workers.replicas)."""
    ready: int | None = Field(default=None, ge=0)
    """Workers whose pods are ready."""


class Progress(StatusModel):
    """Training progress, as last reported by the training driver."""

    step: int | None = Field(default=None, ge=0)
    """Optimizer steps done."""
    total_steps: int | None = Field(default=None, ge=0)
    """Optimizer steps in the whole run."""
    epoch: int | None = Field(default=None, ge=0)
    """Passes over the data set started (0-based)."""
    loss: float | None = None
    """Training loss of the last step (rounded for display)."""
    samples_per_second: float | None = Field(default=None, ge=0)
    """Throughput over all workers."""
    tokens_per_second: float | None = Field(default=None, ge=0)
    """Throughput over all workers, in tokens (language models)."""
    eta_seconds: int | None = Field(default=None, ge=0)
    """Estimated seconds until totalSteps."""


class CheckpointInfo(StatusModel):
    """The latest complete checkpoint."""

    step: int | None = Field(default=None, ge=0)
    """Step the checkpoint was taken at."""
    uri: str | None = None
    """Where it is."""
    time: datetime | None = None
    """When it was completed."""


class FailureInfo(StatusModel):
    """The last failure that caused a restart or ended the job."""

    reason: str | None = None
    """CamelCase reason, e.g. `WorkerCrashed`, `GangTimeout`, `DeadlineExceeded`."""
    message: str | None = None
    """What happened, in words."""
    time: datetime | None = None
    """When it happened."""


class TrainingCost(StatusModel):
    """What the job has cost so far (GPU time priced by the operator's price table)."""

    gpu_hours: float | None = Field(default=None, ge=0)
    """GPU-hours used, over all attempts."""
    usd: float | None = Field(default=None, ge=0)
    """Cost in US dollars."""
    last_update_time: datetime | None = None
    """When gpuHours and usd were last brought up to date (cost accrues from here)."""


class TrainingJobStatus(StatusModel):
    """The observed state of a TrainingJob, written by the operator.

    The `*Display` fields are computed from the structured ones when the status is serialized; they
    exist only for `kubectl get` columns.
    """

    phase: TrainingJobPhase | None = None
    """Pending, Scheduling, Running, Recovering, Suspended, Succeeded or Failed."""
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra=CONDITIONS_LIST_EXTRA)
    """Standard conditions: Scheduled, Running, CheckpointAvailable, Complete, Failed."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation this status reflects."""
    workers: WorkerCounts | None = None
    """Worker pods wanted and ready."""
    progress: Progress | None = None
    """Training progress."""
    last_checkpoint: CheckpointInfo | None = None
    """The latest complete checkpoint."""
    restarts: int | None = Field(default=None, ge=0)
    """Gang restarts so far."""
    attempt: int | None = Field(default=None, ge=0)
    """Gangs created so far (restarts and scheduling retries); pod names carry it."""
    next_attempt_time: datetime | None = None
    """While Recovering or Pending after a gang timeout: when the next gang is created (backoff)."""
    last_failure: FailureInfo | None = None
    """The last failure."""
    start_time: datetime | None = None
    """When the job first started running."""
    completion_time: datetime | None = None
    """When the job finished (Succeeded or Failed)."""
    cost: TrainingCost | None = None
    """Cost so far."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def workers_display(self) -> str | None:
        """Ready/desired workers, e.g. `2/4` (for `kubectl get`)."""
        if self.workers is None:
            return None
        return display_fraction(self.workers.ready or 0, self.workers.desired)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def step_display(self) -> str | None:
        """Step/totalSteps, e.g. `120/2000` (for `kubectl get`)."""
        if self.progress is None:
            return None
        return display_fraction(self.progress.step, self.progress.total_steps)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def cost_display(self) -> str | None:
        """Cost so far in dollars, e.g. `$1.23` (for `kubectl get`)."""
        return None if self.cost is None else display_usd(self.cost.usd)


# ------------------------------------------------------------------------------------------------
# The resource
# ------------------------------------------------------------------------------------------------


class TrainingJob(ApiModel):
    """A distributed training run: a gang of worker pods on a Ray cluster, checkpointing and resuming."""

    api_version: Literal["tandem.dev/v1alpha1"] = API_VERSION
    kind: Literal["TrainingJob"] = KIND
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: TrainingJobSpec
    status: TrainingJobStatus = Field(default_factory=TrainingJobStatus)
