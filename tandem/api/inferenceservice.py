"""The InferenceService resource: autoscaled GPU model-server replicas with dynamic batching."""

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
    ApiModel,
    CheckpointSelector,
    Condition,
    CostStatus,
    NodeSelector,
    ObjectMeta,
    Resources,
    Rule,
    SpecModel,
    StatusModel,
    Tolerations,
    display_fraction,
    display_usd,
    gpu_product_rule,
)
from tandem.api.serving import Batching, ModelSettings, Runtime, ServingPrecision, default_of

KIND: Final = "InferenceService"
PLURAL: Final = "inferenceservices"
SINGULAR: Final = "inferenceservice"
SHORT_NAMES = ("tisvc",)

#: Where a model can be loaded from.
MODEL_URI_PATTERN = r"^(pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?/.+|file:///.+|s3://[^/]+/.+)$"
TRAININGJOB_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"

# ------------------------------------------------------------------------------------------------
# Spec
# ------------------------------------------------------------------------------------------------


class TrainingJobRef(SpecModel):
    """A checkpoint of a TrainingJob in the same namespace."""

    name: str = Field(max_length=63, pattern=TRAININGJOB_NAME_PATTERN)
    """Name of the TrainingJob."""
    checkpoint: CheckpointSelector = "latest"
    """`latest` (follow the newest complete checkpoint) or a step number (pinned)."""


class ModelSource(SpecModel):
    """The model to serve: exactly one of `uri` or `trainingJobRef`."""

    uri: str | None = Field(default=None, max_length=2048, pattern=MODEL_URI_PATTERN)
    """`pvc://CLAIM/PATH` (the claim is mounted read-only), `file:///PATH` (inside the image) or
    `s3://BUCKET/KEY` (every object under the prefix KEY/, or the single object KEY, downloaded by each
    replica into an emptyDir before it starts serving)."""
    training_job_ref: TrainingJobRef | None = None
    """Serve a checkpoint of a TrainingJob; the service then records which run and step it serves."""
    credentials_secret: str | None = Field(default=None, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """For an `s3://` uri: a Secret in the service's namespace whose keys become the replicas'
    environment (envFrom): `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`, optionally
    `AWS_ENDPOINT_URL` (S3-compatible storage such as MinIO) and `AWS_REGION`. Unset: the credentials
    the pod has otherwise (e.g. a service account bound to a cloud role)."""

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            rule="has(self.uri) != has(self.trainingJobRef)",
            message="spec.model: set exactly one of spec.model.uri (a stored model) or "
            "spec.model.trainingJobRef (a TrainingJob's checkpoint)",
            check=lambda m: (m.uri is None) != (m.training_job_ref is None),
        ),
        Rule(
            rule="!has(self.credentialsSecret) || (has(self.uri) && self.uri.startsWith('s3://'))",
            message="spec.model.credentialsSecret is used only for s3:// models: set spec.model.uri "
            "to s3://BUCKET/KEY or remove credentialsSecret",
            check=lambda m: m.credentials_secret is None or (m.uri or "").startswith("s3://"),
            field_path=".credentialsSecret",
            reason="FieldValueForbidden",
        ),
    )


class Replicas(SpecModel):
    """Replica bounds, and the requested count that the scale subresource reads and writes."""

    min: int = Field(default=1, ge=0, le=1000)
    """Fewest replicas; 0 lets an idle service scale to zero."""
    max: int = Field(default=1, ge=1, le=1000)
    """Most replicas."""
    count: int = Field(default=1, ge=0, le=100_000)
    """Requested replica count, clamped by the operator to [min, max]. The scale subresource reads and
    writes it (specReplicasPath): `kubectl scale`, an HPA or KEDA set it; with autoscaling.mode
    `builtin` the operator's own autoscaler writes its decisions here too."""

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            rule="self.min <= self.max",
            message="spec.replicas.min must be <= spec.replicas.max (raise max or lower min)",
            check=lambda r: r.min <= r.max,
            field_path=".min",
        ),
    )

    def clamp(self, wanted: int | None = None) -> int:
        """`wanted` (default: count) clamped to [min, max]: the replicas to run."""
        return max(self.min, min(self.max, self.count if wanted is None else wanted))


class AutoscalingMode(StrEnum):
    """Who scales the service."""

    BUILTIN = "builtin"
    EXTERNAL = "external"


class ScalingMetric(StrEnum):
    """The load signal the built-in autoscaler tracks, per replica."""

    CONCURRENCY = "concurrency"
    QUEUE_DEPTH = "queueDepth"
    RPS = "rps"
    LATENCY_P99 = "latencyP99"


class Autoscaling(SpecModel):
    """Scaling on load between replicas.min and replicas.max."""

    mode: AutoscalingMode = AutoscalingMode.BUILTIN
    """`builtin`: the operator scales on live metrics. `external`: the operator leaves
    spec.replicas.count to an HPA or KEDA, through the scale subresource."""
    metric: ScalingMetric = ScalingMetric.CONCURRENCY
    """`concurrency` (in-flight requests), `queueDepth`, `rps` (requests per second) or
    `latencyP99` (milliseconds); all per replica except latency."""
    target: float | None = Field(default=None, gt=0)
    """Target value of the metric per replica. Unset: the operator's default for the metric."""
    stable_window_seconds: int = Field(default=60, ge=1, le=3600)
    """Window the metric is averaged over for normal scaling decisions."""
    panic_window_seconds: int = Field(default=6, ge=1, le=3600)
    """Short window that triggers fast scale-up on a burst; at most stableWindowSeconds."""
    scale_down_delay_seconds: int = Field(default=300, ge=0, le=86400)
    """How long load must stay low before replicas are removed."""
    max_scale_up_rate: float = Field(default=2.0, ge=1, le=1000)
    """Most replicas after one decision, as a multiple of the current count."""

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            rule="self.panicWindowSeconds <= self.stableWindowSeconds",
            message="spec.autoscaling.panicWindowSeconds must be <= spec.autoscaling.stableWindowSeconds",
            check=lambda a: a.panic_window_seconds <= a.stable_window_seconds,
            field_path=".panicWindowSeconds",
        ),
    )


class RolloutPolicy(StrEnum):
    """What to do when the referenced TrainingJob writes a newer checkpoint."""

    AUTO = "auto"
    MANUAL = "manual"


class Rollout(SpecModel):
    """Rolling out new model versions."""

    on_new_checkpoint: RolloutPolicy = RolloutPolicy.AUTO
    """With trainingJobRef.checkpoint `latest`: `auto` rolls out each newer checkpoint;
    `manual` keeps serving the current one until the service's spec changes."""


class InferenceServiceSpec(SpecModel):
    """The desired state of an InferenceService."""

    image: str | None = Field(default=None, min_length=1, max_length=1024)
    """Container image of the model server. Unset: the operator's default serving image."""
    model: ModelSource
    """The model to serve."""
    runtime: Runtime = Runtime.CAUSAL_LM
    """`causal-lm` (text generation), `embeddings`, `torchscript` (a traced module) or `noop` (no model:
    measures the server's own cost)."""
    precision: ServingPrecision = default_of(ModelSettings, "precision")
    """`fp32`, `bf16`, `fp16` or `int8`."""
    batching: Batching = Field(default_factory=Batching)
    """Dynamic batching."""
    resources: Resources = Field(default_factory=Resources)
    """Resources of each replica."""
    gpu_product: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        pattern=LABEL_VALUE_PATTERN,
        description=GPU_PRODUCT_DESCRIPTION,
    )
    node_selector: NodeSelector | None = None
    """Node labels a replica needs."""
    tolerations: Tolerations | None = None
    """Taints the replicas tolerate."""
    replicas: Replicas = Field(default_factory=Replicas)
    """Replica bounds and requested count."""
    autoscaling: Autoscaling | None = None
    """Scaling on load. Unset: a fixed count, replicas.count clamped to [min, max]."""
    rollout: Rollout = Field(default_factory=Rollout)
    """Rolling out new checkpoints."""
    suspend: bool = False
    """True scales to zero and keeps it there; false again restores the replicas."""

    cel_rules: ClassVar[tuple[Rule, ...]] = (gpu_product_rule("spec."),)


# ------------------------------------------------------------------------------------------------
# Status
# ------------------------------------------------------------------------------------------------


class InferenceServicePhase(StrEnum):
    """Where an InferenceService is in its life."""

    PENDING = "Pending"
    LOADING = "Loading"
    READY = "Ready"
    SUSPENDED = "Suspended"
    FAILED = "Failed"


class ConditionType(StrEnum):
    """Condition types of an InferenceService."""

    MODEL_RESOLVED = "ModelResolved"
    READY = "Ready"
    SCALING_ACTIVE = "ScalingActive"
    FAILED = "Failed"


class ReplicaCounts(StatusModel):
    """Replicas wanted and ready."""

    desired: int | None = Field(default=None, ge=0)
    """Replicas the operator is converging to (after clamping and autoscaling)."""
    ready: int | None = Field(default=None, ge=0)
    """Replicas ready to serve (the scale subresource's status.replicas)."""


class FineTunedFrom(StatusModel):
    """The base checkpoint a fine-tuned model started from, as its TrainingJob's spec names it."""

    method: str | None = None
    """`lora` (the replicas load the base and merge the adapter) or `full` (whole fine-tuned weights)."""
    training_job: str | None = None
    """The TrainingJob that wrote the base checkpoint, if the fine-tune named one."""
    checkpoint: str | None = None
    """The base checkpoint as selected: a step, or `latest` (the base job's newest when the fine-tune
    first started; its checkpoints' metadata.json and the server's model metadata name the step)."""
    uri: str | None = None
    """The base checkpoint's URI, when the fine-tune named one."""


class ServedModel(StatusModel):
    """The model the replicas serve now: the lineage link from serving back to training."""

    uri: str | None = None
    """Where the weights were loaded from."""
    training_job: str | None = None
    """The TrainingJob that produced them, if any."""
    checkpoint_step: int | None = Field(default=None, ge=0)
    """The checkpoint step served, if from a TrainingJob."""
    base: FineTunedFrom | None = None
    """When that TrainingJob fine-tuned a pretrained checkpoint: the base it started from."""


class ServingMetrics(StatusModel):
    """Live load, over all replicas (averaged over the autoscaler's stable window)."""

    rps: float | None = Field(default=None, ge=0)
    """Requests per second."""
    latency_p50_ms: float | None = Field(default=None, ge=0)
    """Median request latency, milliseconds."""
    latency_p99_ms: float | None = Field(default=None, ge=0)
    """99th percentile request latency, milliseconds."""
    queue_depth: float | None = Field(default=None, ge=0)
    """Requests waiting for a batch."""
    concurrency: float | None = Field(default=None, ge=0)
    """Requests in flight."""
    tokens_per_second: float | None = Field(default=None, ge=0)
    """Tokens generated per second (causal-lm)."""


class ServingCost(CostStatus):
    """What serving costs (the replicas' GPUs, vCPUs and memory on nodes, priced by the operator's
    price table): the spend so far, and the rate now."""

    hourly_usd: float | None = Field(default=None, ge=0, alias="hourlyUSD")
    """Cost per hour of the current replicas, US dollars."""
    usd_per_million_requests: float | None = Field(default=None, ge=0)
    """Cost per million requests at the current load."""
    usd_per_million_tokens: float | None = Field(default=None, ge=0)
    """Cost per million generated tokens at the current load (causal-lm)."""
    gpus: int | None = Field(default=None, ge=0)
    """GPUs that the replicas on nodes hold now."""


class InferenceServiceStatus(StatusModel):
    """The observed state of an InferenceService, written by the operator.

    The `*Display` fields are computed from the structured ones when the status is serialized; they
    exist only for `kubectl get` columns.
    """

    phase: InferenceServicePhase | None = None
    """Pending, Loading, Ready, Suspended or Failed."""
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra=CONDITIONS_LIST_EXTRA)
    """Standard conditions: ModelResolved, Ready, ScalingActive, Failed."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation this status reflects."""
    url: str | None = None
    """In-cluster URL of the service, e.g. `http://NAME.NAMESPACE.svc` (the Service listens on port 80)."""
    replicas: ReplicaCounts | None = None
    """Replicas wanted and ready."""
    selector: str | None = None
    """Label selector of the replica pods, as a string (the scale subresource's labelSelectorPath,
    which an HPA needs)."""
    model: ServedModel | None = None
    """The model served now."""
    metrics: ServingMetrics | None = None
    """Live load."""
    cost: ServingCost | None = None
    """Serving cost."""
    last_scale_time: datetime | None = None
    """When the replica count last changed."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def replicas_display(self) -> str | None:
        """Ready/desired replicas, e.g. `2/4` (for `kubectl get`)."""
        if self.replicas is None:
            return None
        return display_fraction(self.replicas.ready or 0, self.replicas.desired)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def model_display(self) -> str | None:
        """The served model in short, `TRAININGJOB@STEP` or the URI, and a fine-tune's base after `<-`
        (`chat-lora@300<-gpt@latest`) (for `kubectl get`)."""
        if self.model is None:
            return None
        if self.model.training_job:
            step = "?" if self.model.checkpoint_step is None else str(self.model.checkpoint_step)
            served = f"{self.model.training_job}@{step}"
            base = self.model.base
            if base is not None and base.training_job:
                return f"{served}<-{base.training_job}@{base.checkpoint or '?'}"
            if base is not None and base.uri:
                return f"{served}<-{base.uri}"
            return served
        return self.model.uri

    @computed_field  # type: ignore[prop-decorator]
    @property
    def hourly_cost_display(self) -> str | None:
        """Cost per hour in dollars, e.g. `$2.49` (for `kubectl get`)."""
        return None if self.cost is None else display_usd(self.cost.hourly_usd)


# ------------------------------------------------------------------------------------------------
# The resource
# ------------------------------------------------------------------------------------------------


class InferenceService(ApiModel):
    """A served model: GPU replicas behind one Service, batched and autoscaled."""

    api_version: Literal["tandem.dev/v1alpha1"] = API_VERSION
    kind: Literal["InferenceService"] = KIND
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: InferenceServiceSpec
    status: InferenceServiceStatus = Field(default_factory=InferenceServiceStatus)


# Scale subresource paths (see docs/api.md, "Scale subresource").
SPEC_REPLICAS_PATH = ".spec.replicas.count"
STATUS_REPLICAS_PATH = ".status.replicas.ready"
LABEL_SELECTOR_PATH = ".status.selector"
