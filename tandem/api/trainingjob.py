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
    CostStatus,
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
from tandem.api.finetuning import FineTuning
from tandem.api.tracking import Tracking

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


class DataFormat(StrEnum):
    """How the data set's files are read."""

    AUTO = "auto"
    """By suffix: `.bin` token files, `.jsonl` JSON lines, anything else text."""
    TEXT = "text"
    """UTF-8 text through the tokenizer (a directory's files joined with a document separator)."""
    JSONL = "jsonl"
    """One JSON object per line; its `textField` string is one document, tokenized."""
    TOKENS = "tokens"
    """Token ids already tokenized: nanoGPT's headerless `.bin` files of `tokenDtype` integers."""


class TokenDtype(StrEnum):
    """Integer type of a token file: `uint16` (nanoGPT, vocabularies up to 65,536) or `uint32`."""

    UINT16 = "uint16"
    UINT32 = "uint32"


class Validation(SpecModel):
    """Held-out data for evaluation: exactly one of `uri` or `fraction`."""

    uri: str | None = Field(default=None, max_length=2048, pattern=URI_PATTERN)
    """A separate data set read like the training one (same format, dtype and tokenizer), e.g. nanoGPT's
    `val.bin`."""
    fraction: float | None = Field(default=None, gt=0, le=0.5)
    """Hold out this share of the training tokens, taken from their end (never trained on)."""

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            rule="has(self.uri) != has(self.fraction)",
            message="spec.trainer.builtin.dataset.validation: set exactly one of uri (a held-out data "
            "set) or fraction (a share of the training data held out)",
            check=lambda v: (v.uri is None) != (v.fraction is None),
        ),
    )


_TOKEN_FILES_CEL = "(self.format == 'tokens' || (self.format == 'auto' && self.uri.endsWith('.bin')))"


class Dataset(SpecModel):
    """Where the training data comes from and how it is read."""

    uri: str = Field(max_length=2048, pattern=URI_PATTERN)
    """`pvc://CLAIM/PATH` (the claim is mounted), `file:///PATH` (inside the pod) or `s3://BUCKET/KEY`
    (downloaded by the training driver with the pod's AWS credentials; see docs/training.md); a file or
    a directory of files, or `tandem://corpus` (a small generated corpus)."""
    format: DataFormat = DataFormat.AUTO
    """`auto` (by suffix: `.bin` tokens, `.jsonl` JSON lines, else text), `text`, `jsonl` or `tokens`."""
    token_dtype: TokenDtype = TokenDtype.UINT16
    """Integer type of token files (`format: tokens`): `uint16` as nanoGPT writes them, or `uint32`. Raw
    `.bin` files carry no header, so the spec says what they hold."""
    vocab_size: int | None = Field(default=None, ge=1, le=2**32)
    """Token ids the data uses (ids are below it), e.g. 50257 for GPT-2's tokens. The model's embedding
    table is this rounded up to a multiple of 64. Unset: the tokenizer's vocabulary (token files need
    one of the two)."""
    tokenizer: str | None = Field(default=None, max_length=2048, pattern=URI_PATTERN)
    """A Hugging Face `tokenizer.json` (same URI schemes) for text and JSONL data, copied into every
    checkpoint; `tandem tokenizer train` makes one from a corpus. Unset: the byte tokenizer (259 ids)."""
    text_field: str = Field(default="text", min_length=1, max_length=256)
    """The key of each JSONL line's text."""
    validation: Validation | None = None
    """Held-out data for `evaluation`."""

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            rule=f"!{_TOKEN_FILES_CEL} || has(self.vocabSize) || has(self.tokenizer)",
            message="spec.trainer.builtin.dataset.vocabSize: token files carry no vocabulary: set "
            "vocabSize (e.g. 50257 for GPT-2's tokens) or the tokenizer that made them",
            check=lambda d: not d.token_files or d.vocab_size is not None or d.tokenizer is not None,
            field_path=".vocabSize",
            reason="FieldValueRequired",
        ),
    )

    @property
    def token_files(self) -> bool:
        """True when the data set is read as token ids (`format: tokens`, or `auto` and `.bin`)."""
        return self.format == DataFormat.TOKENS or (
            self.format == DataFormat.AUTO and self.uri.endswith(".bin")
        )


class LRDecay(StrEnum):
    """How the learning rate falls after warmup, from `learningRate` to `minLearningRate`."""

    COSINE = "cosine"
    LINEAR = "linear"
    CONSTANT = "constant"


class Optimizer(SpecModel):
    """AdamW and its learning-rate schedule: linear warmup, then decay to the minimum at maxSteps."""

    warmup_steps: int | None = Field(default=None, ge=0)
    """Steps of linear warmup from 0 to `learningRate`. Unset: min(100, maxSteps / 10), at least 1."""
    decay: LRDecay = LRDecay.COSINE
    """`cosine`, `linear` or `constant` (stays at `learningRate`) after warmup."""
    min_learning_rate: float | None = Field(default=None, ge=0, le=1)
    """The learning rate at maxSteps (not above `learningRate`). Unset: `learningRate` / 10."""
    beta1: float = Field(default=0.9, ge=0, lt=1)
    """AdamW's first-moment decay."""
    beta2: float = Field(default=0.95, ge=0, lt=1)
    """AdamW's second-moment decay."""
    weight_decay: float = Field(default=0.1, ge=0, le=10)
    """Decoupled weight decay, applied to matrices only (not to norms, biases or position-free vectors)."""
    max_grad_norm: float = Field(default=1.0, ge=0)
    """Clip the gradients' global L2 norm to this; 0 turns clipping off."""


class EarlyStopping(SpecModel):
    """End the job (successfully) when the evaluation loss stops improving."""

    patience: int = Field(ge=1, le=10000)
    """Evaluations in a row without an improvement of more than `minDelta` before the job ends."""
    min_delta: float = Field(default=0.0, ge=0)
    """How much lower than the best so far an evaluation loss must be to count as an improvement."""


class Evaluation(SpecModel):
    """Evaluation on the held-out data (`dataset.validation`), reported as `status.progress.evalLoss`."""

    interval_steps: int = Field(default=200, ge=1)
    """Evaluate every this many optimizer steps, and at the end."""
    batches: int = Field(default=20, ge=1, le=100000)
    """Batches of `batch.perDevice` samples each worker evaluates (the same samples every time)."""
    keep_best: bool = False
    """Checkpoint at every evaluation that improves on the best loss, and keep that checkpoint beside
    the newest `checkpoint.keep` (needs `spec.checkpoint`)."""
    early_stopping: EarlyStopping | None = None
    """Stop when the evaluation loss stops improving."""


class Strategy(StrEnum):
    """How the built-in trainer spreads the model over the workers."""

    DDP = "ddp"
    """Distributed data parallel: every worker holds the whole model, gradients are all-reduced. The
    model, its gradients and AdamW's state must fit on one GPU."""
    FSDP = "fsdp"
    """Fully sharded data parallel (PyTorch's FSDP2, per transformer block): parameters, gradients and
    optimizer state are split over the workers and gathered block by block, so a model that does not
    fit on one GPU trains on several. Checkpoints keep the same (unsharded) format."""


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
    """Peak learning rate (AdamW; the schedule is `optimizer`'s)."""
    sequence_length: int | None = Field(default=None, ge=8, le=131072)
    """Tokens per training sample (the model's context length). Unset: the size's (tiny 128, small
    256, medium 512, 124m 1024)."""
    optimizer: Optimizer = Field(default_factory=Optimizer)
    """AdamW settings and the learning-rate schedule."""
    compile: bool = False
    """Compile the model with `torch.compile` (faster steps on GPUs after a minute of compiling)."""
    evaluation: Evaluation | None = None
    """Periodic evaluation on held-out data. Unset: none."""
    fine_tuning: FineTuning | None = None
    """Start from a pretrained checkpoint (all weights, or a LoRA adapter). Unset: random weights."""

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            rule="!has(self.evaluation) || has(self.dataset.validation)",
            message="spec.trainer.builtin.evaluation needs held-out data: set "
            "spec.trainer.builtin.dataset.validation (a uri or a fraction)",
            check=lambda b: b.evaluation is None or b.dataset.validation is not None,
            field_path=".dataset.validation",
            reason="FieldValueRequired",
        ),
        Rule(
            rule="!has(self.optimizer) || !has(self.optimizer.minLearningRate) || "
            "self.optimizer.minLearningRate <= (has(self.learningRate) ? self.learningRate : 0.0003)",
            message="spec.trainer.builtin.optimizer.minLearningRate must not be above "
            "spec.trainer.builtin.learningRate (the schedule decays from the peak to the minimum)",
            check=lambda b: (
                b.optimizer.min_learning_rate is None or b.optimizer.min_learning_rate <= b.learning_rate
            ),
            field_path=".optimizer.minLearningRate",
        ),
    )


class Trainer(SpecModel):
    """What to train: exactly one of `builtin` or `entrypoint`."""

    builtin: BuiltinTrainer | None = None
    """A built-in model and data set."""
    entrypoint: str | None = Field(default=None, max_length=256, pattern=ENTRYPOINT_PATTERN)
    """Your training loop, `package.module:function`, importable in the image; called once per worker
    with the `config` object."""
    config: FreeForm | None = None
    """Free-form settings passed to `entrypoint` as a dict; kept as written."""
    strategy: Strategy = Strategy.DDP
    """How the built-in trainer spreads the model over the workers: `ddp` (each holds the whole model)
    or `fsdp` (parameters, gradients and optimizer state sharded over the workers). `fsdp` is for the
    built-in trainer only, and not with a LoRA fine-tune."""
    deterministic: bool = False
    """Bit-for-bit repeatable training on GPUs: PyTorch's deterministic algorithms (a run that meets an
    operation without one fails, naming it), cuBLAS with a fixed workspace, no cuDNN autotuning. Then
    the same job run twice, or resumed after a failure, ends with the same parameters. Off, GPU kernels
    whose sums use atomics make two runs part in the last bits (by about 4e-5 after 30 steps of GPT
    124M on one H100); on, a step of that model took 17% longer there (41.6 ms against 35.7). CPU runs
    repeat either way."""

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
        Rule(
            rule="!has(self.strategy) || self.strategy == 'ddp' || has(self.builtin)",
            message="spec.trainer.strategy: fsdp shards the built-in trainer's model, and your own "
            "spec.trainer.entrypoint wraps its model itself (TrainContext.prepare_model is DDP): "
            "set strategy to ddp, or shard the model in your code",
            check=lambda t: t.strategy == Strategy.DDP or t.builtin is not None,
            field_path=".strategy",
            reason="FieldValueForbidden",
        ),
        Rule(
            rule="!has(self.strategy) || self.strategy == 'ddp' || !has(self.builtin) || "
            "!has(self.builtin.fineTuning) || !has(self.builtin.fineTuning.lora)",
            message="spec.trainer.strategy: fsdp does not train LoRA adapters (their checkpoints "
            "hold the adapter alone, and the frozen base rarely needs sharding): set strategy to "
            "ddp, or fine-tune all weights (remove spec.trainer.builtin.fineTuning.lora)",
            check=lambda t: (
                t.strategy == Strategy.DDP
                or t.builtin is None
                or t.builtin.fine_tuning is None
                or t.builtin.fine_tuning.lora is None
            ),
            field_path=".strategy",
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
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    """Random seed of the model's initialisation and the data order (a resumed run continues the same
    sequence; CPU runs are reproducible bit for bit)."""
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
    tracking: Tracking | None = None
    """Experiment tracking: TensorBoard event files beside the checkpoints, MLflow. Unset: none."""

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
        Rule(
            rule="!has(self.trainer.builtin) || !has(self.trainer.builtin.evaluation) || "
            "!has(self.trainer.builtin.evaluation.keepBest) || !self.trainer.builtin.evaluation.keepBest "
            "|| has(self.checkpoint)",
            message="spec.trainer.builtin.evaluation.keepBest keeps a checkpoint: set spec.checkpoint "
            "or turn keepBest off",
            check=lambda s: (
                s.trainer.builtin is None
                or s.trainer.builtin.evaluation is None
                or not s.trainer.builtin.evaluation.keep_best
                or s.checkpoint is not None
            ),
            field_path=".trainer.builtin.evaluation.keepBest",
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
    eval_loss: float | None = None
    """Loss on the held-out data at the last evaluation (`spec.trainer.builtin.evaluation`)."""
    eval_step: int | None = Field(default=None, ge=0)
    """Step of the last evaluation."""
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


class TrainingCost(CostStatus):
    """What the job has cost so far, over all attempts (GPUs, vCPUs and memory of its pods on nodes,
    priced by the operator's price table)."""


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
