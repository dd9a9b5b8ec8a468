"""TrainingJob state machine as a pure function: (spec, status, observed pods and nodes, now) -> decision.

Phases: Pending -> Scheduling (gang created, waiting for every pod to be bound) -> Running ->
Succeeded; a failed, vanished or stranded pod sends Running or Scheduling to Recovering (restart with
backoff, resuming from the last checkpoint) or, past maxRestarts, to Failed. A gang that is not fully
bound within gangTimeoutSeconds is deleted whole and retried with backoff (Pending/Unschedulable).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from tandem.api.common import Condition, find_condition, set_condition
from tandem.api.trainingjob import (
    CheckpointInfo,
    ConditionType,
    FailureInfo,
    Progress,
    TrainingCost,
    TrainingJobPhase,
    TrainingJobSpec,
    TrainingJobStatus,
    WorkerCounts,
)
from tandem.operator import cost

#: A job the API server refused a child of for good (422, 403, 400) stays Failed with this reason
#: until its spec changes (a new generation); then it starts a new gang.
from tandem.operator.controller_common import CREATE_REFUSED, accepted
from tandem.operator.cost_usage import UsageSnapshot
from tandem.operator.gpu import GPU_PRODUCT_LABEL, GPU_RESOURCE
from tandem.operator.kube import bounded
from tandem.operator.trainingjob import builders, holders, podgroup
from tandem.operator.trainingjob.observe import ClusterView, ObservedPod, resource_gap

Phase = TrainingJobPhase
MAX_BACKOFF_SECONDS = 900
#: While nothing else changes, the running cost is written at most this often.
COST_REFRESH_SECONDS = 30
#: A gang's Scheduling status and event wait this long after its pods are created: a gang the
#: scheduler binds meanwhile (on nodes with room, within a second even at 2,500 pods) goes to Running
#: in one status write and one event instead of two of each. A gang still unbound then shows
#: Scheduling, this much later.
SCHEDULING_HOLD_SECONDS = 2.0
#: The Scheduled condition's reason while a gang waits for its PodGroup to fit (gangScheduler
#: coscheduling), with the scheduler's own words in its message.
GANG_WAITING = "GangWaiting"
#: How much of the scheduler's message the condition quotes (it names every node's verdict), so that
#: the rest of the message survives the condition's bound (kube.MESSAGE_LIMIT).
SCHEDULER_HINT_LIMIT = 640


@dataclass(frozen=True)
class Event:
    """A Kubernetes event to post on the TrainingJob."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class Decision:
    """What one reconcile wants done: the new status, children to create or delete, events."""

    status: TrainingJobStatus
    #: Children that must exist as given: pods not observed, and other children (the handler writes
    #: those it has not yet seen in place in this form).
    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    delete_job: bool = False
    #: The status and events of this pass are provisional: a gang created moments ago and not yet
    #: bound (see SCHEDULING_HOLD_SECONDS). Create the children; write and post nothing yet.
    hold: bool = False
    #: Seconds until the clock alone changes the decision (a timeout, a backoff, a deadline, the TTL,
    #: the next cost write); None when only a change of the job, its pods or nodes will.
    due_in: float | None = None
    #: What the job's pods on nodes cost per hour now (for the operator's cost metrics).
    rate: cost.Rate = field(default_factory=cost.Rate)


@dataclass(frozen=True)
class Job:
    """The TrainingJob being reconciled: identity, validated spec, image, and the operator's choices for
    its children (settings networkPolicy, gangScheduler/gangSchedulerName)."""

    name: str
    namespace: str
    uid: str
    generation: int
    spec: TrainingJobSpec
    image: str
    network_policy: bool = False
    #: The coscheduling scheduler's profile when gangScheduler is coscheduling (a PodGroup per
    #: attempt), else None.
    gang_scheduler_name: str | None = None


class ProgressReport(BaseModel):
    """The training driver's progress record (annotation `tandem.dev/progress` on the head pod)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    step: int = Field(ge=0)
    total_steps: int | None = Field(default=None, ge=0)
    epoch: int | None = Field(default=None, ge=0)
    loss: float | None = None
    samples_per_second: float | None = Field(default=None, ge=0)
    tokens_per_second: float | None = Field(default=None, ge=0)
    eta_seconds: int | None = Field(default=None, ge=0)
    eval_loss: float | None = None
    eval_step: int | None = Field(default=None, ge=0)
    checkpoint: CheckpointInfo | None = None


def backoff_seconds(base: int, exponent: int) -> int:
    """base x 2^exponent, capped at 15 minutes."""
    return int(min(base * 2 ** max(exponent, 0), MAX_BACKOFF_SECONDS))


def _condition(
    type_: str, status: Literal["True", "False"], reason: str, message: str, job: Job, now: datetime
) -> Condition:
    return Condition(
        type=type_,
        status=status,
        reason=reason,
        message=bounded(message),
        observed_generation=job.generation,
        last_transition_time=now,
    )


class _Machine:
    """One reconcile pass. Methods mutate `self.status` and collect actions into the decision."""

    def __init__(
        self,
        job: Job,
        current: TrainingJobStatus,
        pods: Sequence[ObservedPod],
        cluster: ClusterView,
        now: datetime,
        prices: cost.Prices,
        usage: UsageSnapshot | None = None,
    ) -> None:
        self.job = job
        self.spec = job.spec
        self.now = now
        self.prices = prices
        self.usage = usage
        self.cluster = cluster
        self.original = current
        self.pods = [p for p in pods if not p.deleting]
        self.attempt = max([current.attempt or 0, *(p.attempt for p in pods)])
        self.current = [p for p in self.pods if p.attempt == self.attempt]
        # A shallow copy: every change goes through `set` (model_copy with an update) and the
        # condition helpers return new lists, so nothing of `current` is changed in place; a deep
        # copy was 40% of a reconcile's own CPU.
        self.decision = Decision(status=current.model_copy())
        #: The event of a phase change made in this pass (folded into the next one, if any).
        self.phase_event: Event | None = None
        self.decision.delete += [p.name for p in self.pods if p.attempt < self.attempt]  # stragglers

    # -- status helpers ---------------------------------------------------------------------------

    @property
    def status(self) -> TrainingJobStatus:
        return self.decision.status

    def set(self, **fields: Any) -> None:
        self.decision.status = self.status.model_copy(update=fields)

    def condition(self, type_: str, status: Literal["True", "False"], reason: str, message: str) -> None:
        self.set(
            conditions=set_condition(
                self.status.conditions, _condition(type_, status, reason, message, self.job, self.now)
            )
        )

    def event(self, reason: str, message: str, warning: bool = False) -> None:
        self.decision.events.append(Event("Warning" if warning else "Normal", reason, message))

    def phase(self, phase: TrainingJobPhase, message: str, warning: bool = False) -> None:
        if self.status.phase != phase:
            passed = self.phase_event
            if passed is not None:  # a phase entered and left in this pass: one event tells both
                self.decision.events.remove(passed)
                gang = f"gang {self.attempt}: "
                if passed.message.startswith(gang):
                    message = message.removeprefix(gang)
                message = f"{passed.message}; {message}"
                warning = warning or passed.type == "Warning"
            self.event(phase.value, message, warning)
            self.phase_event = self.decision.events[-1]
        self.set(phase=phase)

    # -- the passes -------------------------------------------------------------------------------

    def run(self) -> Decision:
        spec = self.spec
        total = spec.trainer.builtin.max_steps if spec.trainer.builtin else None
        progress = self.status.progress or Progress(step=0)
        self.set(
            observed_generation=self.job.generation,
            attempt=self.attempt,
            restarts=self.status.restarts or 0,
            progress=progress.model_copy(update={"total_steps": progress.total_steps or total}),
            cost=self.status.cost or TrainingCost(gpu_hours=0.0, usd=0.0, last_update_time=self.now),
            conditions=accepted(self.job.generation, self.status.conditions),
        )
        self.fold_progress()
        self.step()
        self.head_service()
        self.set(
            workers=WorkerCounts(
                desired=spec.workers.replicas,
                ready=sum(1 for p in self.current if p.role == "worker" and p.ready and not self.deleted(p)),
            )
        )
        self.accrue_cost()
        self.decision.hold = self.held()
        self.decision.due_in = self.due_in()
        return self.decision

    def held(self) -> bool:
        """A gang created less than SCHEDULING_HOLD_SECONDS ago, not yet bound, of an attempt the
        stored status has not recorded: its Scheduling status waits (the next pass decides anew)."""
        return (
            self.status.phase is Phase.SCHEDULING
            and self.attempt > (self.original.attempt or 0)
            and self.now - self.gang_created() < timedelta(seconds=SCHEDULING_HOLD_SECONDS)
        )

    def due_in(self) -> float | None:
        status, spec = self.status, self.spec
        due: list[datetime] = []
        if status.next_attempt_time is not None:
            due.append(status.next_attempt_time)
        finished = status.phase is not None and status.phase.finished
        if finished:
            ttl, done = spec.ttl_seconds_after_finished, status.completion_time
            if ttl is not None and done is not None:
                due.append(done + timedelta(seconds=ttl))
        else:
            if spec.active_deadline_seconds is not None and status.start_time is not None:
                due.append(status.start_time + timedelta(seconds=spec.active_deadline_seconds))
            if status.phase is Phase.SCHEDULING and self.current:
                due.append(self.gang_created() + timedelta(seconds=spec.scheduling.gang_timeout_seconds))
            if self.decision.rate.usd_per_hour > 0 and status.cost is not None:  # set by accrue_cost
                written = status.cost.last_update_time or self.now
                due.append(written + timedelta(seconds=COST_REFRESH_SECONDS))
        if self.decision.hold:
            due.append(self.gang_created() + timedelta(seconds=SCHEDULING_HOLD_SECONDS))
        if not due:
            return None
        return max((min(due) - self.now).total_seconds(), 0.0)

    def head_service(self) -> None:
        """Ask for the head's Service and its endpoint once the current head pod has an IP.

        A headless name resolves to nothing before that anyway, so workers see no difference, and no
        Service exists for a gang that never binds. The operator writes what it has not yet written
        in this form (see controller.apply), so asking on every reconcile costs no API call.
        """
        head = next((p for p in self.current if p.role == "head"), None)
        if head is not None and head.ip is not None and not self.deleted(head) and not head.failed:
            job = self.job
            self.decision.create.append(builders.head_service(job.name, job.uid, job.namespace))
            self.decision.create.append(
                builders.head_endpoints(job.name, job.uid, job.namespace, head.name, head.ip)
            )

    def deleted(self, pod: ObservedPod) -> bool:
        return pod.name in self.decision.delete

    def step(self) -> None:
        if self.refusal_outdated():
            self.phase(Phase.PENDING, "the spec changed after the API server refused its pods: trying again")
            self.condition(ConditionType.FAILED, "False", "SpecChanged", "trying again with the new spec")
            self.set(completion_time=None)
        phase = self.status.phase
        if phase is not None and phase.finished:
            self.finished()
            return
        if self.deadline_exceeded():
            return
        if self.spec.suspend:
            self.delete_current()
            self.set(next_attempt_time=None)
            self.phase(Phase.SUSPENDED, "suspended: pods deleted, status and checkpoints kept")
            self.condition(ConditionType.RUNNING, "False", "Suspended", "spec.suspend is true")
            return
        if phase in (Phase.SCHEDULING, Phase.RUNNING) and self.spec_changed():
            return
        if phase in (None, Phase.PENDING, Phase.RECOVERING, Phase.SUSPENDED):
            self.start_gang()
        elif phase is Phase.SCHEDULING:
            self.scheduling()
        elif phase is Phase.RUNNING:
            self.running()

    def refusal_outdated(self) -> bool:
        """Failed because the API server refused a child of an older generation of the spec."""
        failure = self.status.last_failure
        if self.status.phase is not Phase.FAILED or failure is None or failure.reason != CREATE_REFUSED:
            return False
        failed = find_condition(self.status.conditions, ConditionType.FAILED)
        return failed is not None and (failed.observed_generation or 0) < self.job.generation

    def spec_changed(self) -> bool:
        """A spec edit that reshapes the pods replaces the gang; it does not count as a restart."""
        wanted = builders.pod_spec_hash(self.spec)
        if all(p.spec_hash == wanted for p in self.current):
            return False
        self.delete_current()
        self.set(next_attempt_time=None)
        self.phase(Phase.PENDING, "the spec changed: replacing the gang (resuming from the last checkpoint)")
        self.condition(
            ConditionType.RUNNING, "False", "SpecChanged", "replacing the gang after a spec change"
        )
        return True

    def start_gang(self) -> None:
        resume = self.status.last_checkpoint.uri if self.status.last_checkpoint else None
        resumed = f", resuming from {resume}" if resume else ""
        if self.current:
            if self.attempt > (self.original.attempt or 0):
                # Pods of an attempt the status has not recorded: a gang created in the last pass
                # (its status held, see SCHEDULING_HOLD_SECONDS), or by an operator that died between
                # creating them and writing status. Take them on rather than start over.
                created = self.gang_created()
                self.set(
                    attempt=self.attempt, next_attempt_time=None, start_time=self.status.start_time or created
                )
                self.gang_scheduling(len(self.current), len(self.expected_names()), resumed)
                self.scheduling()
                return
            self.delete_current()  # the last gang is still being torn down
            return
        due = self.status.next_attempt_time
        if due is not None and self.now < due:
            return
        attempt = self.attempt + 1
        self.decision.create += self.companions(attempt)
        self.decision.create += builders.gang(
            self.spec,
            job=self.job.name,
            uid=self.job.uid,
            namespace=self.job.namespace,
            attempt=attempt,
            image=self.job.image,
            resume_from=resume,
            scheduler_name=self.job.gang_scheduler_name,
        )
        self.attempt = attempt
        self.set(attempt=attempt, next_attempt_time=None, start_time=self.status.start_time or self.now)
        pods = self.spec.workers.replicas + 1
        self.gang_scheduling(pods, pods, resumed)

    def companions(self, attempt: int) -> list[dict[str, Any]]:
        """What an attempt's pods need to exist first: the job's identity, its NetworkPolicy and the
        attempt's PodGroup (the last two when the operator's settings ask for them)."""
        job = self.job
        made = builders.trainer_identity(job.name, job.uid, job.namespace, attempt)
        if job.network_policy:
            made.append(builders.network_policy(job.name, job.uid, job.namespace))
        if job.gang_scheduler_name:
            made.append(
                podgroup.pod_group(
                    self.spec, job=job.name, uid=job.uid, namespace=job.namespace, attempt=attempt
                )
            )
        return made

    def gang_scheduling(self, created: int, expected: int, resumed: str) -> None:
        """The current gang's pods exist (`created` of `expected`): Scheduling until all are bound."""
        self.phase(Phase.SCHEDULING, f"gang {self.attempt}: {created} pods created together{resumed}")
        self.condition(
            ConditionType.SCHEDULED, "False", "Scheduling", f"waiting for {expected} pods to be bound"
        )

    def expected_names(self) -> list[str]:
        names = [builders.head_pod_name(self.job.name, self.attempt)]
        names += [
            builders.worker_pod_name(self.job.name, self.attempt, i)
            for i in range(self.spec.workers.replicas)
        ]
        return names

    def scheduling(self) -> None:
        if self.gang_broken():
            return
        present = {p.name: p for p in self.current}
        missing = [name for name in self.expected_names() if name not in present]
        if missing:  # not yet seen, or deleted by someone: creating again is idempotent
            self.decision.create += self.companions(self.attempt)
            gang = builders.gang(
                self.spec,
                job=self.job.name,
                uid=self.job.uid,
                namespace=self.job.namespace,
                attempt=self.attempt,
                image=self.job.image,
                resume_from=self.status.last_checkpoint.uri if self.status.last_checkpoint else None,
                scheduler_name=self.job.gang_scheduler_name,
            )
            self.decision.create += [pod for pod in gang if pod["metadata"]["name"] in missing]
        if not missing and all(p.bound for p in self.current):
            self.condition(ConditionType.SCHEDULED, "True", "AllBound", f"all {len(self.current)} pods bound")
            self.phase(Phase.RUNNING, f"gang {self.attempt}: all {len(self.current)} pods bound")
            self.condition(ConditionType.RUNNING, "True", "GangBound", "the Ray cluster is running")
            self.set(next_attempt_time=None)
            return
        if self.now - self.gang_created() >= timedelta(seconds=self.spec.scheduling.gang_timeout_seconds):
            self.unschedulable()
        elif self.job.gang_scheduler_name:
            self.gang_waiting()

    def gang_waiting(self) -> None:
        """Under coscheduling, why the gang waits, in the scheduler's words: the plugin writes them into
        each pod's PodScheduled condition (the PodGroup's status is left to scheduler-plugins' own
        controller, which may not run). The Scheduled condition carries them, and an event tells each
        new reason once."""
        unbound = [p for p in self.current if not p.bound]
        told = sorted((p for p in unbound if p.scheduler_message), key=lambda p: (p.role != "head", p.name))
        if not told:
            return  # not tried yet: the condition keeps "waiting for N pods to be bound"
        members = len(self.expected_names())
        hint = told[0].scheduler_message
        parts = [f"waiting for the PodGroup's {members} members to fit together ({len(unbound)} unbound)"]
        gap = resource_gap(hint)
        if gap:
            short = ", ".join(f"{amount} {name}" for name, amount in sorted(gap.items()))
            parts.append(f"the cluster is short of {short} for the whole group")
        lacking = holders.lacking(hint)
        if lacking:
            parts.append(self.holders(lacking))
        parts.append(f"{self.job.gang_scheduler_name}: {bounded(hint, SCHEDULER_HINT_LIMIT)}")
        message = bounded("; ".join(parts))
        before = find_condition(self.original.conditions, ConditionType.SCHEDULED)
        if before is None or before.reason != GANG_WAITING or before.message != message:
            self.event(GANG_WAITING, bounded(f"gang {self.attempt}: {message}"))
        self.condition(ConditionType.SCHEDULED, "False", GANG_WAITING, message)

    def holders(self, lacking: list[str]) -> str:
        """Which TrainingJobs hold what the gang lacks on the nodes it could use (from the pod cache)."""
        nodes = self.cluster.nodes
        product = self.spec.workers.gpu_product
        candidates = {name: holders.candidate_nodes(nodes, name, product) for name in lacking}
        found = holders.holders(
            self.cluster.job_pods(), lacking, candidates, (self.job.namespace, self.job.name)
        )
        return holders.holders_message(found, lacking, len(set().union(*candidates.values())))

    def gang_created(self) -> datetime:
        """When the current gang's first pod was created (its gang timeout counts from then)."""
        return min((p.created for p in self.current if p.created), default=self.now)

    def unschedulable(self) -> None:
        message = self.unschedulable_message()
        retries = max(self.attempt - 1 - (self.status.restarts or 0), 0)
        delay = backoff_seconds(max(self.spec.failure_policy.backoff_seconds, 1), retries)
        self.delete_current()
        self.set(next_attempt_time=self.now + timedelta(seconds=delay))
        self.phase(
            Phase.PENDING,
            f"gang {self.attempt} not bound within {self.spec.scheduling.gang_timeout_seconds}s: "
            f"{message}; retry in {delay}s",
            warning=True,
        )
        self.condition(ConditionType.SCHEDULED, "False", "Unschedulable", message)

    def unschedulable_message(self) -> str:
        workers = self.spec.workers
        gpus = workers.resources.gpu
        parts = []
        if gpus:
            own: dict[str, int] = {}
            for pod in self.current:
                if pod.node:
                    own[pod.node] = own.get(pod.node, 0) + pod.gpus
            free, nodes = self.cluster.free_gpus(workers.gpu_product, ignore=own)
            where = (
                f"nodes with {GPU_PRODUCT_LABEL}={workers.gpu_product}"
                if workers.gpu_product
                else "GPU nodes"
            )
            parts.append(
                f"needs {workers.replicas * gpus} {GPU_RESOURCE} "
                f"({workers.replicas} workers x {gpus}) on {where}; {free} free on {nodes} ready nodes"
            )
        unbound = [p for p in self.current if not p.bound]
        parts.append(f"{len(unbound)} of {len(self.expected_names())} pods unbound")
        hint = next((p.scheduler_message for p in unbound if p.scheduler_message), "")
        if hint:
            parts.append(f"scheduler: {hint}")
        return "; ".join(parts)

    def running(self) -> None:
        head = next((p for p in self.current if p.role == "head"), None)
        if head is not None and head.phase == "Succeeded":
            self.delete_current(keep_head=True)
            self.set(completion_time=self.now, next_attempt_time=None)
            self.phase(Phase.SUCCEEDED, "training finished")
            self.condition(ConditionType.COMPLETE, "True", "Succeeded", "the training driver exited 0")
            self.condition(ConditionType.RUNNING, "False", "Completed", "training finished")
            return
        if self.gang_broken():
            return
        missing = sorted(set(self.expected_names()) - {p.name for p in self.current})
        if missing:
            self.restart("PodDeleted", f"pod {missing[0]} disappeared")

    def gang_broken(self) -> bool:
        """Restart when a pod failed or its node is gone or NotReady; True if it did."""
        for pod in self.current:
            if pod.failed:
                self.restart(
                    f"{pod.role.capitalize()}Failed",
                    f"pod {pod.name} failed: {pod.failure or 'no reason given'}",
                )
                return True
            node = self.cluster.nodes.get(pod.node) if pod.node else None
            if pod.node and self.cluster.nodes and node is None:
                self.restart("NodeLost", f"node {pod.node} of pod {pod.name} is gone")
                return True
            if node is not None and not node.ready:
                self.restart("NodeNotReady", f"node {pod.node} of pod {pod.name} is NotReady")
                return True
        return False

    def restart(self, reason: str, message: str) -> None:
        self.delete_current()
        self.set(last_failure=FailureInfo(reason=reason, message=bounded(message), time=self.now))
        restarts = self.status.restarts or 0
        limit = self.spec.failure_policy.max_restarts
        if restarts >= limit:
            self.set(completion_time=self.now, next_attempt_time=None)
            self.phase(Phase.FAILED, f"{message}; no restarts left (maxRestarts {limit})", warning=True)
            self.condition(ConditionType.FAILED, "True", reason, message)
            self.condition(ConditionType.RUNNING, "False", reason, message)
            return
        delay = backoff_seconds(self.spec.failure_policy.backoff_seconds, restarts)
        checkpoint = self.status.last_checkpoint
        resume = (
            f"resume from step {checkpoint.step} ({checkpoint.uri})"
            if checkpoint and checkpoint.uri
            else "start from scratch (no checkpoint yet)"
        )
        self.set(restarts=restarts + 1, next_attempt_time=self.now + timedelta(seconds=delay))
        self.decision.status = self.status.model_copy(update={"phase": Phase.RECOVERING})
        self.event(reason, f"{message}; restart {restarts + 1}/{limit} in {delay}s, {resume}", warning=True)
        self.condition(ConditionType.RUNNING, "False", reason, message)

    def deadline_exceeded(self) -> bool:
        limit = self.spec.active_deadline_seconds
        started = self.status.start_time
        if limit is None or started is None or self.now - started < timedelta(seconds=limit):
            return False
        message = f"running longer than spec.activeDeadlineSeconds ({limit}s)"
        self.delete_current()
        self.set(
            completion_time=self.now,
            next_attempt_time=None,
            last_failure=FailureInfo(reason="DeadlineExceeded", message=message, time=self.now),
        )
        self.phase(Phase.FAILED, message, warning=True)
        self.condition(ConditionType.FAILED, "True", "DeadlineExceeded", message)
        self.condition(ConditionType.RUNNING, "False", "DeadlineExceeded", message)
        return True

    def finished(self) -> None:
        """Free every pod that still holds resources (keep the head for its logs); honour the TTL."""
        self.delete_current(keep_head=True)
        ttl = self.spec.ttl_seconds_after_finished
        done = self.status.completion_time
        if ttl is not None and done is not None and self.now - done >= timedelta(seconds=ttl):
            self.decision.delete_job = True
            self.event("Deleted", f"finished {ttl}s ago (spec.ttlSecondsAfterFinished)")

    def delete_current(self, keep_head: bool = False) -> None:
        for pod in self.current:
            if keep_head and pod.role == "head":
                continue
            if pod.name not in self.decision.delete:
                self.decision.delete.append(pod.name)
            if pod.role == "head" and pod.ip is not None:
                self.unpublish_head()

    def unpublish_head(self) -> None:
        """Empty the head Service's endpoints: workers of the next gang must not dial a deleted head."""
        job = self.job
        empty = builders.head_endpoints(job.name, job.uid, job.namespace, None, None)
        if empty not in self.decision.create:
            self.decision.create.append(empty)

    # -- progress and cost ------------------------------------------------------------------------

    def fold_progress(self) -> None:
        head = next((p for p in self.pods if p.role == "head" and p.attempt == self.attempt), None)
        if head is None or not head.progress:
            return
        try:
            report = ProgressReport.model_validate(json.loads(head.progress))
        except (ValueError, ValidationError) as error:
            detail = str(error).splitlines()[0][:200]
            self.event(
                "BadProgress",
                f"ignoring malformed {builders.PROGRESS_ANNOTATION} on {head.name}: {detail}",
                warning=True,
            )
            return
        previous = self.status.progress or Progress()
        self.set(
            progress=Progress(
                step=report.step,
                total_steps=report.total_steps or previous.total_steps,
                epoch=report.epoch,
                loss=round(report.loss, 4) if report.loss is not None else None,
                samples_per_second=round(report.samples_per_second, 2)
                if report.samples_per_second is not None
                else None,
                tokens_per_second=round(report.tokens_per_second, 1)
                if report.tokens_per_second is not None
                else None,
                eta_seconds=report.eta_seconds,
                eval_loss=round(report.eval_loss, 4) if report.eval_loss is not None else None,
                eval_step=report.eval_step,
            )
        )
        checkpoint = report.checkpoint
        known = self.status.last_checkpoint
        if (
            checkpoint is not None
            and checkpoint.uri
            and (known is None or (checkpoint.step or 0) > (known.step or -1))
        ):
            self.set(last_checkpoint=checkpoint)
            self.condition(
                ConditionType.CHECKPOINT_AVAILABLE,
                "True",
                "Saved",
                f"step {checkpoint.step} at {checkpoint.uri}",
            )
            self.event("Checkpoint", f"checkpoint at step {checkpoint.step}: {checkpoint.uri}")

    def pod_rates(self) -> list[tuple[ObservedPod, cost.Rate]]:
        """The pods on nodes and what each costs per hour (tandem.operator.cost; GPUs priced by the
        node's product label, else by the product the spec asks for)."""
        rates = []
        for pod in self.pods:
            if not cost.on_node(pod.phase, pod.node):
                continue
            node = self.cluster.nodes.get(pod.node) if pod.node else None
            product = node.product if node and node.product else self.spec.workers.gpu_product
            used = self.usage.for_pod(self.job.namespace, pod.name) if self.usage else None
            rates.append((pod, cost.pod_rate(pod.containers, product, self.prices, used)))
        return rates

    def accrue_cost(self) -> None:
        """GPU-hours and USD of the pods on nodes since the last update; written every 30 s or on change."""
        rates = self.pod_rates()
        self.decision.rate = sum((rate for _, rate in rates), cost.Rate())
        so_far = self.status.cost or TrainingCost(gpu_hours=0.0, usd=0.0)
        since = so_far.last_update_time or self.now
        changed = self.status.model_copy(update={"cost": None}) != self.original.model_copy(
            update={"cost": None}
        )
        if not changed and (self.now - since).total_seconds() < COST_REFRESH_SECONDS:
            return
        spend = cost.Spend(so_far.usd or 0.0, (so_far.gpu_hours or 0.0) * cost.SECONDS_PER_HOUR)
        before = spend
        for pod, rate in rates:
            start = max(since, pod.started or since)
            spend = spend.plus(rate, (self.now - start).total_seconds())
        if not changed and spend == before:
            return  # nothing accrued (nothing priced on a node): no status write just to move the clock
        self.set(
            cost=TrainingCost(
                gpu_hours=round(spend.gpu_seconds / cost.SECONDS_PER_HOUR, 6),
                usd=round(spend.usd, 6),
                last_update_time=self.now,
                allocation=cost.allocation(self.decision.rate),
            )
        )


def decide(
    job: Job,
    current: TrainingJobStatus,
    pods: Sequence[ObservedPod],
    cluster: ClusterView,
    now: datetime,
    prices: cost.Prices,
    usage: UsageSnapshot | None = None,
) -> Decision:
    """One level-based reconcile of a TrainingJob. Pure: no I/O, no clock. `usage`: the containers'
    measured usage (tandem.operator.cost_usage), charged where above the requests."""
    return _Machine(job, current, pods, cluster, now, prices, usage).run()


def refused(job: Job, status: TrainingJobStatus, message: str, now: datetime) -> TrainingJobStatus:
    """The status after the API server refused one of the job's children for good (`message` says
    which child and field): Failed, with Failed and Scheduled conditions and `lastFailure` saying so,
    at this generation. Nothing is retried until the spec changes (see `_Machine.refusal_outdated`);
    the caller deletes the gang's pods that were made."""
    message = bounded(message)
    failed = _condition(ConditionType.FAILED, "True", CREATE_REFUSED, message, job, now)
    unscheduled = _condition(ConditionType.SCHEDULED, "False", CREATE_REFUSED, message, job, now)
    conditions = set_condition(set_condition(status.conditions, failed), unscheduled)
    return status.model_copy(
        update={
            "phase": Phase.FAILED,
            "conditions": conditions,
            "observed_generation": job.generation,
            "next_attempt_time": None,
            "completion_time": now,
            "last_failure": FailureInfo(reason=CREATE_REFUSED, message=message, time=now),
        }
    )
