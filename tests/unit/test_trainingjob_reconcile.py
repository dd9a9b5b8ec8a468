"""The TrainingJob state machine as a pure function: observations in, decisions out, no clock."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from tandem.api.common import find_condition
from tandem.api.trainingjob import ConditionType, TrainingJobPhase, TrainingJobSpec, TrainingJobStatus
from tandem.api.trainingrun import TrainingRun
from tandem.operator.controller_common import CREATE_REFUSED
from tandem.operator.cost import Amounts, Container, Prices
from tandem.operator.kube import MESSAGE_LIMIT
from tandem.operator.trainingjob import builders
from tandem.operator.trainingjob.observe import ClusterView, ObservedNode, ObservedPod
from tandem.operator.trainingjob.reconcile import (
    SCHEDULING_HOLD_SECONDS,
    Decision,
    Job,
    backoff_seconds,
    decide,
    refused,
)

T0 = datetime(2026, 11, 26, 4, 0, tzinfo=UTC)
#: $2 per GPU-hour, CPU and memory free: the GPU arithmetic of the tests stays readable.
PRICES = Prices({}, gpu_default=2.0, cpu_per_vcpu_hour=0.0, ram_per_gib_hour=0.0)
SPEC: dict[str, Any] = {
    "trainer": {"builtin": {"size": "tiny", "dataset": {"uri": "file:///d"}, "maxSteps": 1000}},
    "workers": {"replicas": 2, "resources": {"gpu": 4}, "gpuProduct": "H100"},
    "batch": {"perDevice": 4},
    "checkpoint": {"storage": {"uri": "file:///c"}},
    "failurePolicy": {"maxRestarts": 2, "backoffSeconds": 10},
    "scheduling": {"gangTimeoutSeconds": 60},
}
NODES = ClusterView(
    nodes={
        "g0": ObservedNode("g0", ready=True, gpus=8, product="H100", unschedulable=False),
        "g1": ObservedNode("g1", ready=True, gpus=8, product="H100", unschedulable=False),
        "c0": ObservedNode("c0", ready=True, gpus=0, product=None, unschedulable=False),
    },
    gpus_in_use=lambda: {"g0": 4, "g1": 6},  # g0: our own worker-0 (see the gang-timeout test)
)


def job(**spec: Any) -> Job:
    return Job("gpt", "ml", "uid", 1, TrainingJobSpec.model_validate({**SPEC, **spec}), "img")


def pod(
    name: str, attempt: int = 1, node: str | None = "g0", phase: str = "Running", **extra: Any
) -> ObservedPod:
    role = "head" if name.endswith("head") else "worker"
    return ObservedPod(
        name=f"gpt-{attempt}-{name}",
        role=role,
        attempt=attempt,
        index=None if role == "head" else int(name[-1]),
        phase=phase,
        node=node if role == "worker" else ("c0" if node else None),
        ready=phase == "Running" and node is not None,
        deleting=False,
        created=T0,
        started=T0 if node else None,
        gpus=4 if role == "worker" else 0,
        failure=extra.pop("failure", ""),
        scheduler_message=extra.pop("scheduler_message", ""),
        progress=extra.pop("progress", None),
        spec_hash=extra.pop("spec_hash", builders.pod_spec_hash(job().spec)),
        ip=extra.pop("ip", f"10.0.0.{attempt}" if phase == "Running" and node is not None else None),
        containers=(Container(Amounts(gpus=4)),) if role == "worker" else (),
    )


def gang(attempt: int = 1, **extra: Any) -> list[ObservedPod]:
    return [pod("head", attempt), pod("worker-0", attempt), pod("worker-1", attempt, node="g1", **extra)]


def tick(
    status: dict[str, Any], pods: list[ObservedPod], now: datetime = T0, the_job: Job | None = None
) -> Decision:
    return decide(the_job or job(), TrainingJobStatus.model_validate(status), pods, NODES, now, PRICES)


def test_a_new_job_creates_its_whole_gang_at_once() -> None:
    decision = tick({}, [])
    children = [(m["kind"], m["metadata"]["name"]) for m in decision.create]
    assert children == [
        ("ServiceAccount", "gpt-trainer"),
        ("Role", "gpt-trainer"),
        ("RoleBinding", "gpt-trainer"),
        ("Pod", "gpt-1-head"),
        ("Pod", "gpt-1-worker-0"),
        ("Pod", "gpt-1-worker-1"),
    ]
    assert decision.status.phase == "Scheduling"
    assert decision.status.attempt == 1
    assert decision.status.start_time == T0
    assert [e.reason for e in decision.events] == ["Scheduling"]


def test_a_new_gangs_status_and_events_wait_a_moment_for_it_to_bind() -> None:
    """Creating a gang writes nothing yet: most gangs bind within a second, and then go to Running
    in one status write and one event instead of two of each."""
    created = tick({}, [])
    assert created.hold
    assert created.due_in == SCHEDULING_HOLD_SECONDS
    # Seen again within the hold, not yet bound: still nothing to write, same wake-up.
    unbound = [pod("head", node=None, phase="Pending"), pod("worker-0", node=None, phase="Pending")]
    soon = T0 + timedelta(seconds=1)
    waiting = tick({}, [*unbound, pod("worker-1", node=None, phase="Pending")], now=soon)
    assert waiting.hold
    assert waiting.due_in == SCHEDULING_HOLD_SECONDS - 1
    assert waiting.create == []


def test_a_gang_bound_within_the_hold_goes_to_running_in_one_write_and_one_event() -> None:
    decision = tick({}, gang(), now=T0 + timedelta(seconds=1))
    assert not decision.hold
    assert decision.status.phase == "Running"
    assert decision.status.attempt == 1
    assert decision.status.start_time == T0  # when the gang was created, not when it was seen
    conditions = {c.type: c.status for c in decision.status.conditions or []}
    assert conditions == {"Accepted": "True", "Scheduled": "True", "Running": "True"}
    assert [(e.type, e.reason, e.message) for e in decision.events] == [
        ("Normal", "Running", "gang 1: 3 pods created together; all 3 pods bound")
    ]


def test_a_gang_still_unbound_after_the_hold_shows_scheduling() -> None:
    unbound = [pod(name, node=None, phase="Pending") for name in ("head", "worker-0", "worker-1")]
    decision = tick({}, unbound, now=T0 + timedelta(seconds=SCHEDULING_HOLD_SECONDS))
    assert not decision.hold
    assert decision.status.phase == "Scheduling"
    assert [e.reason for e in decision.events] == ["Scheduling"]
    assert decision.due_in == 60 - SCHEDULING_HOLD_SECONDS  # now the gang timeout


def test_a_restarted_gang_bound_at_once_says_where_it_resumes_from() -> None:
    recovering = {
        "phase": "Recovering",
        "attempt": 1,
        "restarts": 1,
        "lastCheckpoint": {"step": 100, "uri": "file:///c/step-100"},
    }
    created = tick(recovering, [])
    assert created.hold
    assert next(m["metadata"]["name"] for m in created.create if m["kind"] == "Pod") == "gpt-2-head"
    bound = tick(recovering, gang(attempt=2), now=T0 + timedelta(seconds=1))
    assert not bound.hold
    assert bound.status.phase == "Running"
    assert [e.message for e in bound.events] == [
        "gang 2: 3 pods created together, resuming from file:///c/step-100; all 3 pods bound"
    ]


def test_pods_not_yet_seen_are_created_again_idempotently() -> None:
    decision = tick({"phase": "Scheduling", "attempt": 1}, [pod("head")])
    assert [m["metadata"]["name"] for m in decision.create if m["kind"] == "Pod"] == [
        "gpt-1-worker-0",
        "gpt-1-worker-1",
    ]
    assert decision.status.attempt == 1


def test_all_bound_is_running_and_counts_ready_workers() -> None:
    decision = tick({"phase": "Scheduling", "attempt": 1}, gang())
    assert decision.status.phase == "Running"
    assert decision.status.workers is not None
    assert decision.status.workers.ready == 2
    assert [(m["kind"], m["metadata"]["name"]) for m in decision.create] == [
        ("Service", "gpt-head"),
        ("EndpointSlice", "gpt-head"),
    ]


def test_the_head_service_and_its_endpoint_are_asked_for_once_the_head_pod_has_an_ip() -> None:
    unaddressed = [pod("head", node=None, phase="Pending"), pod("worker-0"), pod("worker-1", node="g1")]
    assert tick({"phase": "Scheduling", "attempt": 1}, unaddressed).create == []
    bound_no_ip = [pod("head", ip=None), pod("worker-0"), pod("worker-1", node="g1")]
    decision = tick({"phase": "Scheduling", "attempt": 1}, bound_no_ip)
    assert decision.status.phase == "Running"
    assert decision.create == []
    service, endpoints = tick({"phase": "Running", "attempt": 1}, gang()).create
    assert service["kind"] == "Service"
    assert "selector" not in service["spec"]  # the operator publishes the head itself
    assert service["metadata"]["ownerReferences"][0]["uid"] == "uid"
    assert endpoints["kind"] == "EndpointSlice"
    assert endpoints["metadata"]["labels"]["kubernetes.io/service-name"] == "gpt-head"
    assert endpoints["endpoints"] == [
        {
            "addresses": ["10.0.0.1"],
            "conditions": {"ready": True},
            "targetRef": {"kind": "Pod", "name": "gpt-1-head", "namespace": "ml"},
        }
    ]
    failed_head = [pod("head", phase="Failed"), pod("worker-0"), pod("worker-1", node="g1")]
    assert not any(
        m["kind"] == "Service" for m in tick({"phase": "Running", "attempt": 1}, failed_head).create
    )


def test_a_restart_empties_the_head_endpoint_until_the_next_head_has_an_ip() -> None:
    """Workers of the next gang must not dial the deleted head (its IP may be reused)."""
    restart = tick({"phase": "Running", "attempt": 1}, gang(failure="exit 137", phase="Failed"))
    assert restart.status.phase == "Recovering"
    (endpoints,) = [m for m in restart.create if m["kind"] == "EndpointSlice"]
    assert endpoints["endpoints"] == []
    later = tick({"phase": "Running", "attempt": 2}, gang(attempt=2))
    (endpoints,) = [m for m in later.create if m["kind"] == "EndpointSlice"]
    assert endpoints["endpoints"][0]["targetRef"]["name"] == "gpt-2-head"
    assert endpoints["endpoints"][0]["addresses"] == ["10.0.0.2"]


def test_gang_timeout_deletes_every_pod_and_says_what_is_missing() -> None:
    pods = [
        pod("head"),
        pod("worker-0"),
        pod("worker-1", node=None, phase="Pending", scheduler_message="0/3 nodes"),
    ]
    waiting = tick({"phase": "Scheduling", "attempt": 1}, pods, now=T0 + timedelta(seconds=59))
    assert waiting.status.phase == "Scheduling"
    assert waiting.delete == []
    decision = tick({"phase": "Scheduling", "attempt": 1}, pods, now=T0 + timedelta(seconds=60))
    assert decision.status.phase == "Pending"
    assert sorted(decision.delete) == ["gpt-1-head", "gpt-1-worker-0", "gpt-1-worker-1"]
    scheduled = next(c for c in decision.status.conditions if c.type == "Scheduled")
    assert scheduled.reason == "Unschedulable"
    # g0 holds 4 of our own GPUs (freed by the retry), g1 has 2 free: 8 + 2.
    assert (
        "needs 8 nvidia.com/gpu (2 workers x 4) on nodes with nvidia.com/gpu.product=H100"
        in scheduled.message
    )
    assert "10 free on 2 ready nodes" in scheduled.message
    assert "scheduler: 0/3 nodes" in scheduled.message
    assert decision.status.next_attempt_time == T0 + timedelta(seconds=70)
    assert decision.status.restarts == 0


def test_backoff_is_respected_before_the_next_gang() -> None:
    status = {"phase": "Pending", "attempt": 1, "nextAttemptTime": (T0 + timedelta(seconds=10)).isoformat()}
    assert tick(status, [], now=T0 + timedelta(seconds=9)).create == []
    assert (
        len([m for m in tick(status, [], now=T0 + timedelta(seconds=10)).create if m["kind"] == "Pod"]) == 3
    )


def test_a_failed_worker_restarts_from_the_last_checkpoint_with_backoff() -> None:
    status = {
        "phase": "Running",
        "attempt": 1,
        "lastCheckpoint": {"step": 500, "uri": "file:///c/step-500"},
    }
    decision = tick(status, gang(failure="exit 137", phase="Failed"))
    assert decision.status.phase == "Recovering"
    assert decision.status.restarts == 1
    assert decision.status.last_failure is not None
    assert decision.status.last_failure.reason == "WorkerFailed"
    assert sorted(decision.delete) == ["gpt-1-head", "gpt-1-worker-0", "gpt-1-worker-1"]
    assert decision.status.next_attempt_time == T0 + timedelta(seconds=10)
    warning = next(e for e in decision.events if e.type == "Warning")
    assert "restart 1/2 in 10s, resume from step 500" in warning.message

    recovering = decision.status.to_dict()
    later = tick(recovering, [], now=T0 + timedelta(seconds=10))
    head = next(m for m in later.create if m["metadata"]["name"] == "gpt-2-head")
    env = {e["name"]: e["value"] for e in head["spec"]["containers"][0]["env"] if "value" in e}
    assert TrainingRun.from_env(env).resume_from == "file:///c/step-500"
    assert later.status.attempt == 2


def test_restarts_back_off_exponentially_and_cap() -> None:
    assert [backoff_seconds(10, n) for n in range(4)] == [10, 20, 40, 80]
    assert backoff_seconds(10, 20) == 900


def test_no_restarts_left_fails_the_job_and_frees_workers() -> None:
    decision = tick({"phase": "Running", "attempt": 3, "restarts": 2}, gang(3, phase="Failed"))
    assert decision.status.phase == "Failed"
    assert decision.status.restarts == 2
    assert decision.status.completion_time == T0
    assert any(c.type == "Failed" and c.status == "True" for c in decision.status.conditions)


def test_a_vanished_pod_or_a_notready_node_restarts() -> None:
    vanished = tick({"phase": "Running", "attempt": 1}, gang()[:2])
    assert vanished.status.last_failure is not None
    assert vanished.status.last_failure.reason == "PodDeleted"
    sick = replace(NODES, nodes={**NODES.nodes, "g1": replace(NODES.nodes["g1"], ready=False)})
    decision = decide(
        job(),
        TrainingJobStatus.model_validate({"phase": "Running", "attempt": 1}),
        gang(),
        sick,
        T0,
        PRICES,
    )
    assert decision.status.last_failure is not None
    assert decision.status.last_failure.reason == "NodeNotReady"


def test_head_success_completes_and_keeps_only_the_head() -> None:
    pods = [pod("head", phase="Succeeded"), pod("worker-0"), pod("worker-1")]
    decision = tick({"phase": "Running", "attempt": 1}, pods)
    assert decision.status.phase == "Succeeded"
    assert sorted(decision.delete) == ["gpt-1-worker-0", "gpt-1-worker-1"]


def test_ttl_deletes_a_finished_job_once_due() -> None:
    done = {"phase": "Succeeded", "attempt": 1, "completionTime": T0.isoformat()}
    the_job = job(ttlSecondsAfterFinished=30)
    assert not tick(done, [], now=T0 + timedelta(seconds=29), the_job=the_job).delete_job
    assert tick(done, [], now=T0 + timedelta(seconds=30), the_job=the_job).delete_job


def test_deadline_fails_a_running_job() -> None:
    status = {"phase": "Running", "attempt": 1, "startTime": T0.isoformat()}
    decision = tick(status, gang(), now=T0 + timedelta(seconds=100), the_job=job(activeDeadlineSeconds=100))
    assert decision.status.phase == "Failed"
    assert decision.status.last_failure is not None
    assert decision.status.last_failure.reason == "DeadlineExceeded"


def test_suspend_deletes_pods_and_resume_starts_a_new_gang() -> None:
    suspended = tick({"phase": "Running", "attempt": 1}, gang(), the_job=job(suspend=True))
    assert suspended.status.phase == "Suspended"
    assert len(suspended.delete) == 3
    resumed = tick(suspended.status.to_dict(), [])
    assert resumed.status.phase == "Scheduling"
    assert resumed.status.attempt == 2


def test_a_spec_change_replaces_the_gang_without_counting_a_restart() -> None:
    decision = tick({"phase": "Running", "attempt": 1}, gang(), the_job=job(precision="fp16"))
    assert decision.status.phase == "Pending"
    assert decision.status.restarts == 0
    assert len(decision.delete) == 3


def test_pods_of_older_attempts_are_deleted() -> None:
    decision = tick({"phase": "Running", "attempt": 2}, [*gang(2), pod("worker-0", attempt=1)])
    assert decision.delete == ["gpt-1-worker-0"]
    assert decision.status.phase == "Running"


def test_progress_record_is_folded_into_status() -> None:
    record = {
        "step": 120,
        "totalSteps": 1000,
        "loss": 2.123456,
        "evalLoss": 2.345678,
        "evalStep": 100,
        "checkpoint": {"step": 100, "uri": "file:///c/100"},
    }
    pods = [pod("head", progress=json.dumps(record)), *gang()[1:]]
    decision = tick({"phase": "Running", "attempt": 1}, pods)
    wire = decision.status.to_dict()
    assert wire["stepDisplay"] == "120/1000"
    assert wire["progress"]["loss"] == 2.1235
    assert (wire["progress"]["evalLoss"], wire["progress"]["evalStep"]) == (2.3457, 100)
    assert wire["lastCheckpoint"]["step"] == 100
    assert any(c.type == "CheckpointAvailable" for c in decision.status.conditions)


def test_malformed_progress_warns_and_keeps_the_last_good_values() -> None:
    pods = [pod("head", progress='{"step": "many"}'), *gang()[1:]]
    decision = tick({"phase": "Running", "attempt": 1, "progress": {"step": 7, "totalSteps": 1000}}, pods)
    assert decision.status.progress is not None
    assert decision.status.progress.step == 7
    assert [e.reason for e in decision.events] == ["BadProgress"]


def test_cost_accrues_for_running_gpu_pods_every_30_seconds() -> None:
    start = {
        "phase": "Running",
        "attempt": 1,
        "cost": {"gpuHours": 1.0, "usd": 2.0, "lastUpdateTime": T0.isoformat()},
    }
    steady = tick(start, gang()).status.to_dict()
    quiet = tick(steady, gang(), now=T0 + timedelta(seconds=10))
    assert quiet.status.to_dict() == steady  # nothing changed: no status write every tick
    hour = tick(steady, gang(), now=T0 + timedelta(hours=1))
    assert hour.status.cost is not None
    assert hour.status.cost.gpu_hours == 1.0 + 8  # two workers x 4 GPUs for an hour
    assert hour.status.cost.usd == 2.0 + 8 * 2.0
    assert hour.status.to_dict()["costDisplay"] == "$18.00"
    assert hour.status.cost.allocation == "requests"  # no usage measured here: priced by requests


def test_pods_made_by_an_operator_that_died_before_writing_status_are_adopted() -> None:
    decision = tick({}, [pod("head"), pod("worker-0")])
    assert decision.status.phase == "Scheduling"
    assert decision.status.attempt == 1
    assert decision.delete == []
    assert [m["metadata"]["name"] for m in decision.create if m["kind"] == "Pod"] == ["gpt-1-worker-1"]


def test_the_decision_says_when_the_clock_alone_will_change_it() -> None:
    """The operator wakes a job then (and on changes), not on a fixed tick."""
    # A gang waiting to be bound: its timeout (60 s from the pods' creation).
    waiting = [
        pod("head"),
        replace(pod("worker-0"), gpus=0, containers=()),
        pod("worker-1", node=None, phase="Pending"),
    ]
    scheduling = {"phase": "Scheduling", "attempt": 1}
    assert tick(scheduling, waiting, now=T0 + timedelta(seconds=20)).due_in == 40
    # A backoff before the next gang.
    backoff = {"phase": "Pending", "attempt": 1, "nextAttemptTime": (T0 + timedelta(seconds=10)).isoformat()}
    assert tick(backoff, [], now=T0 + timedelta(seconds=4)).due_in == 6
    # A running gang holding GPUs: the next cost write, 30 s after the last one.
    running = tick(scheduling, gang()).status.to_dict()
    assert tick(running, gang(), now=T0 + timedelta(seconds=10)).due_in == 20
    # ... or the deadline, if that comes first.
    started = {**running, "startTime": T0.isoformat()}
    deadline = job(activeDeadlineSeconds=15)
    assert tick(started, gang(), now=T0 + timedelta(seconds=10), the_job=deadline).due_in == 5
    # A running gang without GPUs: nothing is due; only a change will matter.
    cpu_gang = [replace(p, gpus=0, containers=()) for p in gang()]
    cpu_running = tick(scheduling, cpu_gang).status.to_dict()
    assert tick(cpu_running, cpu_gang, now=T0 + timedelta(seconds=10)).due_in is None
    # A finished job: its TTL, if it has one.
    done = {"phase": "Succeeded", "attempt": 1, "completionTime": T0.isoformat()}
    assert tick(done, [], now=T0 + timedelta(seconds=5), the_job=job(ttlSecondsAfterFinished=30)).due_in == 25
    assert tick(done, [], now=T0 + timedelta(seconds=5)).due_in is None


# -- a child the API server refuses for good: Failed with one bounded condition, no retry loop ------

REFUSAL = (
    "the API server refused Pod gpt-1-worker-0 (Invalid, field spec.nodeSelector): "
    'Pod "gpt-1-worker-0" is invalid: spec.nodeSelector: Invalid value: "' + "x" * 100_000 + '"'
)


def refused_status(generation: int = 1) -> TrainingJobStatus:
    scheduling = tick({}, []).status  # the pass that created the gang (attempt 1, Scheduling)
    return refused(replace(job(), generation=generation), scheduling, REFUSAL, T0)


def test_a_refused_child_fails_the_job_with_a_bounded_condition_naming_the_field() -> None:
    status = refused_status()
    assert status.phase is TrainingJobPhase.FAILED
    failed = find_condition(status.conditions, ConditionType.FAILED)
    scheduled = find_condition(status.conditions, ConditionType.SCHEDULED)
    assert failed is not None
    assert scheduled is not None
    assert (failed.status, failed.reason, scheduled.status, scheduled.reason) == (
        "True",
        CREATE_REFUSED,
        "False",
        CREATE_REFUSED,
    )
    assert "field spec.nodeSelector" in failed.message
    assert len(failed.message) <= MESSAGE_LIMIT
    assert status.last_failure is not None
    assert len(status.last_failure.message or "") <= MESSAGE_LIMIT
    # The status round-trips through the API model (a 1 MiB message once failed every status write).
    TrainingJobStatus.model_validate(status.to_dict())


def test_a_refused_job_creates_nothing_again_while_its_spec_is_unchanged() -> None:
    status = refused_status().to_dict()
    for later in (timedelta(0), timedelta(minutes=10)):
        decision = tick(status, [], T0 + later)
        assert decision.create == []
        assert decision.status.phase is TrainingJobPhase.FAILED
        assert decision.due_in is None or decision.due_in > 0  # no clock-driven retry either


def test_a_refused_jobs_leftover_pods_are_deleted_not_recreated() -> None:
    decision = tick(refused_status().to_dict(), gang())
    assert not [m for m in decision.create if m["kind"] == "Pod"]


def test_a_new_generation_of_the_spec_tries_again_with_a_new_gang() -> None:
    status = refused_status(generation=1).to_dict()
    decision = tick(status, [], the_job=replace(job(), generation=2))
    pods = [m["metadata"]["name"] for m in decision.create if m["kind"] == "Pod"]
    assert pods == ["gpt-2-head", "gpt-2-worker-0", "gpt-2-worker-1"]
    assert decision.status.phase is TrainingJobPhase.SCHEDULING
    failed = find_condition(decision.status.conditions, ConditionType.FAILED)
    assert failed is not None
    assert failed.status == "False"
    assert decision.status.completion_time is None
