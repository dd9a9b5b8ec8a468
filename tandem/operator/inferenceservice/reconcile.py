"""InferenceService state machine as a pure function: (service, status, observations, now) -> decision.

Phases, from the Deployment and its pods: Pending (no model yet, or no replica bound), Loading (replicas
bound, none ready: the model is loading), Ready (at least one replica serves), Suspended (scaled to
zero on purpose, everything else kept), Failed (a replica cannot start: crash loop, bad image, or the
rollout exceeded its deadline; an invalid spec is Failed too, set by the handler).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from tandem.api.common import Condition, find_condition, set_condition
from tandem.api.inferenceservice import (
    ConditionType,
    FineTunedFrom,
    InferenceServicePhase,
    InferenceServiceSpec,
    InferenceServiceStatus,
    ReplicaCounts,
    RolloutPolicy,
    ServedModel,
    ServingCost,
    ServingMetrics,
)
from tandem.operator import cost
from tandem.operator.config import OperatorSettings
from tandem.operator.controller_common import accepted
from tandem.operator.cost_usage import UsageSnapshot
from tandem.operator.inferenceservice import builders, lineage
from tandem.operator.inferenceservice.builders import SERVICE_LABEL, ModelTarget, Service
from tandem.operator.inferenceservice.observe import (
    ObservedDeployment,
    ObservedReplica,
    ObservedTrainingJob,
)
from tandem.operator.kube import bounded

__all__ = ["SERVICE_LABEL", "Decision", "Event", "Observed", "ScalingInfo", "decide"]

Phase = InferenceServicePhase
#: With rollout `manual`: True while the referenced TrainingJob has a newer checkpoint than the one served.
NEW_CHECKPOINT_AVAILABLE = "NewCheckpointAvailable"


@dataclass(frozen=True)
class Event:
    """A Kubernetes event to post on the InferenceService."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class ScalingInfo:
    """The autoscaler's last word, for the ScalingActive condition."""

    active: bool
    reason: str
    message: str


@dataclass(frozen=True)
class Observed:
    """Everything one reconcile looks at besides the spec and status."""

    deployment: ObservedDeployment | None = None
    replicas: Sequence[ObservedReplica] = ()
    training_job: ObservedTrainingJob | None = None
    #: Kinds of the create-if-absent children that exist (Service, PodDisruptionBudget, ServiceMonitor).
    children: frozenset[str] = frozenset()
    service_monitor_crd: bool = False
    scaling: ScalingInfo | None = None
    #: The containers' measured usage for the cost model (None: requests only).
    usage: UsageSnapshot | None = None


@dataclass
class Decision:
    """What one reconcile wants done."""

    status: InferenceServiceStatus
    #: The Deployment to server-side apply (None: it is already as wanted, or there is no model yet).
    apply: dict[str, Any] | None = None
    create: list[dict[str, Any]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    #: What the replicas on nodes cost per hour now, and how it was allocated.
    rate: cost.Rate = field(default_factory=cost.Rate)


#: While the replicas on nodes stay the same, the spend so far is written at most this often.
COST_REFRESH_SECONDS = 30


def replicas_rate(
    spec: InferenceServiceSpec,
    replicas: Sequence[ObservedReplica],
    prices: cost.Prices,
    usage: UsageSnapshot | None = None,
    namespace: str = "",
) -> cost.Rate:
    """What the replicas on nodes cost per hour (one not yet scheduled costs nothing). GPUs are priced
    by the product the spec asks for, which is where its nodeSelector puts them; vCPUs and memory at
    max(request, the replica's measured usage in `usage`)."""
    total = cost.Rate()
    for replica in replicas:
        if replica.on_node:
            used = usage.for_pod(namespace, replica.name) if usage else None
            total += cost.pod_rate(replica.containers, spec.gpu_product, prices, used)
    return total


def serving_cost(
    previous: ServingCost | None, rate: cost.Rate, metrics: ServingMetrics | None, now: datetime
) -> ServingCost:
    """The spend so far (the previous rate ran since the last update), the rate from now on, and the
    cost per million requests and tokens at the observed load. The spend moves when the rate
    changes, or every COST_REFRESH_SECONDS, so the status is not rewritten on every reconcile."""
    previous = previous or ServingCost()
    since = previous.last_update_time or now
    elapsed = (now - since).total_seconds()
    hourly = round(rate.usd_per_hour, 4)
    changed = hourly != previous.hourly_usd or rate.gpus != (previous.gpus or 0)
    spend = cost.Spend(previous.usd or 0.0, (previous.gpu_hours or 0.0) * cost.SECONDS_PER_HOUR)
    last_update = since
    if changed or elapsed >= COST_REFRESH_SECONDS:
        ran = cost.Rate(previous.hourly_usd or 0.0, previous.gpus or 0)
        spend, last_update = spend.plus(ran, elapsed), now

    def per_million(per_second: float | None) -> float | None:
        value = cost.per_million(hourly, per_second)
        return None if value is None else round(value, 4)

    return ServingCost().model_copy(
        update={
            "hourly_usd": hourly,
            "gpus": rate.gpus,
            "usd": round(spend.usd, 6),
            "gpu_hours": round(spend.gpu_seconds / cost.SECONDS_PER_HOUR, 6),
            "last_update_time": last_update,
            "allocation": cost.allocation(rate),
            "usd_per_million_requests": per_million(metrics.rps if metrics else None),
            "usd_per_million_tokens": per_million(metrics.tokens_per_second if metrics else None),
        }
    )


class _Machine:
    def __init__(
        self,
        service: Service,
        generation: int,
        current: InferenceServiceStatus,
        observed: Observed,
        now: datetime,
        settings: OperatorSettings,
    ) -> None:
        self.service = service
        self.spec = service.spec
        self.generation = generation
        self.observed = observed
        self.now = now
        self.settings = settings
        self.decision = Decision(status=current.model_copy(deep=True))

    @property
    def status(self) -> InferenceServiceStatus:
        return self.decision.status

    def set(self, **fields: Any) -> None:
        self.decision.status = self.status.model_copy(update=fields)

    def condition(self, type_: str, status: Literal["True", "False"], reason: str, message: str) -> None:
        new = Condition(
            type=type_,
            status=status,
            reason=reason,
            message=bounded(message),
            observed_generation=self.generation,
            last_transition_time=self.now,
        )
        self.set(conditions=set_condition(self.status.conditions, new))

    def event(self, reason: str, message: str, warning: bool = False) -> None:
        self.decision.events.append(Event("Warning" if warning else "Normal", reason, message))

    def phase(self, phase: InferenceServicePhase, message: str, warning: bool = False) -> None:
        if self.status.phase != phase:
            self.event(phase.value, message, warning)
        self.set(phase=phase)

    # -- the pass ---------------------------------------------------------------------------------

    def run(self) -> Decision:
        name, namespace = self.service.name, self.service.namespace
        desired = builders.replicas(self.spec)
        previous = self.status.replicas.desired if self.status.replicas else None
        self.set(
            observed_generation=self.generation,
            url=builders.url(name, namespace),
            selector=builders.selector(name),
            conditions=accepted(self.generation, self.status.conditions),
        )
        if previous is not None and previous != desired:
            self.set(last_scale_time=self.now)
        self.children()
        resolution = lineage.resolve(self.spec, self.observed.training_job, self.observed.deployment)
        self.model_condition(resolution)
        if resolution.target is not None:
            self.deployment(resolution.target, desired)
        self.set_phase(resolution, desired)
        self.served_model()
        dep = self.observed.deployment
        ready = min(dep.ready_replicas, desired) if dep else 0
        self.set(replicas=ReplicaCounts(desired=desired, ready=ready))
        rate = replicas_rate(
            self.spec,
            self.observed.replicas,
            self.settings.prices(),
            self.observed.usage,
            self.service.namespace,
        )
        self.decision.rate = rate
        self.set(cost=serving_cost(self.status.cost, rate, self.status.metrics, self.now))
        self.scaling_condition()
        return self.decision

    def children(self) -> None:
        wanted = builders.children(self.service, self.observed.service_monitor_crd)
        self.decision.create += [c for c in wanted if c["kind"] not in self.observed.children]

    def deployment(self, target: ModelTarget, desired: int) -> None:
        manifest = builders.deployment(self.service, target, desired)
        dep = self.observed.deployment
        if (
            dep is not None
            and dep.spec_hash == manifest["metadata"]["annotations"][builders.ANNOTATION_SPEC_HASH]
        ):
            return
        self.decision.apply = manifest
        if dep is None:
            self.event(
                "Created", f"Deployment {self.service.name}: {desired} replicas of {lineage.describe(target)}"
            )
        elif dep.model_uri != target.uri:
            was = f"step {dep.checkpoint_step}" if dep.checkpoint_step is not None else dep.model_uri
            self.event("RollingOut", f"rolling out {lineage.describe(target)} (was {was})")

    def model_condition(self, resolution: lineage.Resolution) -> None:
        if resolution.resolved:
            self.condition(ConditionType.MODEL_RESOLVED, "True", resolution.reason, resolution.message)
        else:
            old = find_condition(self.status.conditions, ConditionType.MODEL_RESOLVED)
            if old is None or old.message != resolution.message:
                self.event(resolution.reason, resolution.message, warning=True)
            self.condition(ConditionType.MODEL_RESOLVED, "False", resolution.reason, resolution.message)
        ref = self.spec.model.training_job_ref
        if (
            ref is None
            or ref.checkpoint != "latest"
            or self.spec.rollout.on_new_checkpoint is RolloutPolicy.AUTO
        ):
            self.set(conditions=[c for c in self.status.conditions if c.type != NEW_CHECKPOINT_AVAILABLE])
            return
        if resolution.newer_step is not None:
            old = find_condition(self.status.conditions, NEW_CHECKPOINT_AVAILABLE)
            message = (
                f"TrainingJob {ref.name} wrote checkpoint step {resolution.newer_step}; rollout is manual: "
                f"pin spec.model.trainingJobRef.checkpoint to {resolution.newer_step} (or set "
                "spec.rollout.onNewCheckpoint to auto) to serve it"
            )
            if old is None or old.status != "True" or old.message != message:
                self.event(NEW_CHECKPOINT_AVAILABLE, message)
            self.condition(NEW_CHECKPOINT_AVAILABLE, "True", "NewerCheckpoint", message)
        else:
            self.condition(
                NEW_CHECKPOINT_AVAILABLE, "False", "ServingLatest", "serving the newest checkpoint"
            )

    def set_phase(self, resolution: lineage.Resolution, desired: int) -> None:
        dep = self.observed.deployment
        live = [r for r in self.observed.replicas if not r.deleting]
        ready = dep.ready_replicas if dep else 0
        failing = next((r.fatal for r in live if r.fatal), "") or (dep.progress_failure if dep else "")
        if self.spec.suspend:
            self.ready("False", "Suspended", "spec.suspend is true: scaled to zero, everything else kept")
            self.phase(Phase.SUSPENDED, "suspended: scaled to zero replicas")
        elif resolution.target is None:
            self.ready("False", resolution.reason, resolution.message)
            self.phase(Phase.PENDING, resolution.message)
        elif desired == 0:
            self.ready("False", "ScaledToZero", "spec.replicas.count is 0")
            self.phase(Phase.PENDING, "scaled to zero replicas")
        elif ready >= 1:
            message = f"{min(ready, desired)}/{desired} replicas ready"
            reason = "ReplicasReady" if ready >= desired else "ScalingUp"
            if dep is not None and not dep.rolled_out and dep.updated_replicas < dep.replicas:
                reason, message = "RollingOut", f"{message}; {dep.updated_replicas} on the new version"
            self.ready("True", reason, message)
            self.phase(Phase.READY, f"serving: {message}")
        elif failing:
            self.ready("False", "ReplicaFailed", failing)
            self.phase(Phase.FAILED, f"no replica can start: {failing}", warning=True)
        elif any(r.bound for r in live):
            message = f"0/{desired} replicas ready: loading the model"
            self.ready("False", "Loading", message)
            self.phase(Phase.LOADING, message)
        elif live and all(r.unschedulable for r in live):
            message = f"0/{desired} replicas scheduled: {live[0].unschedulable}"
            self.ready("False", "Unschedulable", message)
            self.phase(Phase.PENDING, message)
        else:
            message = f"creating {desired} replicas"
            self.ready("False", "Creating", message)
            self.phase(Phase.PENDING, message)
        if self.status.phase is Phase.FAILED:
            self.condition(ConditionType.FAILED, "True", "ReplicaFailed", failing)
        elif find_condition(self.status.conditions, ConditionType.FAILED) is not None:
            self.condition(ConditionType.FAILED, "False", "Recovered", "no replica is failing")

    def ready(self, status: Literal["True", "False"], reason: str, message: str) -> None:
        self.condition(ConditionType.READY, status, reason, message)

    def served_model(self) -> None:
        """`status.model` is what the replicas run: updated once a rollout completes."""
        dep = self.observed.deployment
        if dep is not None and dep.model_uri and dep.rolled_out and self.decision.apply is None:
            self.set(
                model=ServedModel(
                    uri=dep.model_uri,
                    training_job=dep.training_job,
                    checkpoint_step=dep.checkpoint_step,
                    base=self.base_of(dep.training_job),
                )
            )
        elif self.status.model is None:  # nothing served yet: show at least where the model comes from
            ref = self.spec.model.training_job_ref
            name = ref.name if ref else None
            self.set(model=ServedModel(uri=self.spec.model.uri, training_job=name, base=self.base_of(name)))

    def base_of(self, training_job: str | None) -> FineTunedFrom | None:
        """The base checkpoint of the served TrainingJob when it fine-tuned one (lineage: both models)."""
        job = self.observed.training_job
        return job.base if job is not None and training_job and job.name == training_job else None

    def scaling_condition(self) -> None:
        autoscaling = self.spec.autoscaling
        if self.spec.suspend:
            self.condition(ConditionType.SCALING_ACTIVE, "False", "Suspended", "suspended: not scaling")
        elif autoscaling is None:
            self.condition(
                ConditionType.SCALING_ACTIVE,
                "False",
                "FixedReplicas",
                "no spec.autoscaling: spec.replicas.count clamped to [min, max]",
            )
        elif autoscaling.mode.value == "external":
            self.condition(
                ConditionType.SCALING_ACTIVE,
                "True",
                "External",
                "spec.replicas.count is left to an HPA or KEDA (scale subresource)",
            )
        elif self.observed.scaling is not None:
            info = self.observed.scaling
            self.condition(
                ConditionType.SCALING_ACTIVE, "True" if info.active else "False", info.reason, info.message
            )
        else:
            self.condition(
                ConditionType.SCALING_ACTIVE, "False", "NoMetrics", "waiting for the first metrics"
            )


def decide(
    service: Service,
    generation: int,
    current: InferenceServiceStatus,
    observed: Observed,
    now: datetime,
    settings: OperatorSettings,
) -> Decision:
    """One level-based reconcile of an InferenceService. Pure: no I/O, no clock."""
    return _Machine(service, generation, current, observed, now, settings).run()
