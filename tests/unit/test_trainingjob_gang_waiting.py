"""Why a gang waits under coscheduling (config.gangScheduler coscheduling): the scheduler's reason, from
its pods' PodScheduled condition, in the TrainingJob's Scheduled condition and one event per reason.

The message below is what scheduler-plugins v0.33.5's Coscheduling wrote into a waiting pod on the dev
cluster (two jobs each needing the 16 kwok GPUs; the first one bound). The condition also names the
TrainingJobs whose pods hold what the gang lacks on the nodes it could use (tandem.operator.trainingjob
.holders), from the operator's pod cache."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tandem.api.trainingjob import TrainingJobSpec, TrainingJobStatus
from tandem.operator.cost import Amounts, Container, Prices
from tandem.operator.kube import MESSAGE_LIMIT
from tandem.operator.trainingjob import builders, holders
from tandem.operator.trainingjob.observe import ClusterView, ObservedNode, ObservedPod, resource_gap
from tandem.operator.trainingjob.reconcile import GANG_WAITING, Decision, Job, decide

T0 = datetime(2026, 12, 5, 23, 0, tzinfo=UTC)
NOW = T0 + timedelta(seconds=30)  # past the scheduling hold, well within the gang timeout
SCHEDULER = "scheduler-plugins-scheduler"
SEEN = (
    "0/3 nodes are available: resource gap: map[nvidia.com/gpu:{{16 0} {<nil>}  DecimalSI}]. preemption: "
    "0/3 nodes are available: 3 Preemption is not helpful for scheduling., PodGroup ml/b-1 gets rejected "
    "due to Pod {pod} is unschedulable even after PostFilter"
)
SPEC: dict[str, Any] = {
    "trainer": {"builtin": {"size": "tiny", "dataset": {"uri": "file:///d"}}},
    "workers": {"replicas": 2, "resources": {"gpu": 8}},
    "scheduling": {"gangTimeoutSeconds": 900},
}
NODES = ClusterView(
    nodes={
        f"g{i}": ObservedNode(f"g{i}", ready=True, gpus=8, product=None, unschedulable=False) for i in (0, 1)
    },
    gpus_in_use=dict,
)
JOB = Job("b", "ml", "uid", 1, TrainingJobSpec.model_validate(SPEC), "img", gang_scheduler_name=SCHEDULER)


def pod(name: str, role: str, message: str, node: str | None = None) -> ObservedPod:
    return ObservedPod(
        name=f"b-1-{name}",
        role=role,
        attempt=1,
        index=None if role == "head" else int(name.rsplit("-", 1)[1]),
        phase="Pending" if node is None else "Running",
        node=node,
        ready=False,
        deleting=False,
        created=T0,
        started=None,
        gpus=0 if role == "head" else 8,
        failure="",
        scheduler_message=message,
        progress=None,
        spec_hash=builders.pod_spec_hash(JOB.spec),
        ip=None,
        containers=(),
    )


def waiting_gang(message: str = SEEN) -> list[ObservedPod]:
    return [
        pod("head", "head", message.replace("{pod}", "b-1-head")),
        pod("worker-0", "worker", message.replace("{pod}", "b-1-worker-0")),
        pod("worker-1", "worker", message.replace("{pod}", "b-1-worker-1")),
    ]


def tick(status: dict[str, Any], pods: list[ObservedPod], job: Job = JOB) -> Decision:
    prices = Prices({}, gpu_default=1.0, cpu_per_vcpu_hour=0.0, ram_per_gib_hour=0.0)
    return decide(job, TrainingJobStatus.model_validate(status), pods, NODES, NOW, prices)


def scheduled(decision: Decision) -> tuple[str, str]:
    (condition,) = [c for c in decision.status.conditions if c.type == "Scheduled"]
    return condition.reason, condition.message


SCHEDULING = {"phase": "Scheduling", "attempt": 1}


def test_the_waiting_gangs_condition_says_what_the_group_lacks_in_the_schedulers_words() -> None:
    decision = tick(SCHEDULING, waiting_gang())
    reason, message = scheduled(decision)
    assert reason == GANG_WAITING
    assert message.startswith("waiting for the PodGroup's 3 members to fit together (3 unbound)")
    assert "the cluster is short of 16 nvidia.com/gpu" in message
    # The head's own words (stable from one pass to the next), under the scheduler's name.
    assert f"{SCHEDULER}: 0/3 nodes are available" in message
    assert "due to Pod b-1-head is unschedulable" in message
    assert decision.status.phase == "Scheduling"
    assert [(e.reason, e.type) for e in decision.events] == [(GANG_WAITING, "Normal")]
    assert decision.events[0].message == f"gang 1: {message}"


def test_the_same_reason_is_told_once_and_a_new_one_again() -> None:
    first = tick(SCHEDULING, waiting_gang())
    again = tick(first.status.to_dict(), waiting_gang())
    assert scheduled(again) == scheduled(first)
    assert again.events == []
    other = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu, PodGroup ml/b-1 rejected ({pod})"
    changed = tick(first.status.to_dict(), waiting_gang(other))
    reason, message = scheduled(changed)
    assert (reason, "short of" in message) == (GANG_WAITING, False)
    assert "3 Insufficient nvidia.com/gpu" in message
    assert [e.reason for e in changed.events] == [GANG_WAITING]


def test_before_the_scheduler_has_tried_the_condition_keeps_waiting_for_the_pods() -> None:
    status = {
        **SCHEDULING,
        "conditions": [
            {"type": "Scheduled", "status": "False", "reason": "Scheduling", "message": "waiting for 3 pods"}
        ],
    }
    decision = tick(status, waiting_gang(message=""))
    assert scheduled(decision) == ("Scheduling", "waiting for 3 pods")
    assert decision.events == []


def test_without_coscheduling_nothing_changes_before_the_gang_timeout() -> None:
    status = {
        **SCHEDULING,
        "conditions": [
            {"type": "Scheduled", "status": "False", "reason": "Scheduling", "message": "waiting for 3 pods"}
        ],
    }
    decision = tick(status, waiting_gang(), job=replace(JOB, gang_scheduler_name=None))
    assert scheduled(decision) == ("Scheduling", "waiting for 3 pods")
    assert decision.events == []


def test_a_huge_scheduler_message_is_bounded() -> None:
    """A scheduler lists every node's verdict: at thousands of nodes the condition must still fit."""
    huge = "0/5000 nodes are available: " + "node-x: Insufficient nvidia.com/gpu, " * 5000 + "{pod}"
    decision = tick(SCHEDULING, waiting_gang(huge))
    _, message = scheduled(decision)
    assert len(message) <= MESSAGE_LIMIT
    assert message.startswith("waiting for the PodGroup's 3 members")
    assert "more characters" in message
    assert all(len(e.message) <= MESSAGE_LIMIT for e in decision.events)


@pytest.mark.parametrize(
    ("message", "gap"),
    [
        (SEEN, {"nvidia.com/gpu": "16"}),
        (
            "resource gap: map[cpu:{{1500 -3} {<nil>} 1500m DecimalSI} "
            "memory:{{4294967296 0} {<nil>}  BinarySI}]",
            {"cpu": "1.5", "memory": "4294967296"},
        ),
        ("0/3 nodes are available: 3 Insufficient nvidia.com/gpu.", {}),
        ("", {}),
    ],
)
def test_the_resource_gap_is_read_from_gos_quantity_map(message: str, gap: dict[str, str]) -> None:
    assert resource_gap(message) == gap


# -- who holds what the gang waits for ---------------------------------------------------------------


def holding(job: str, node: str, gpus: int, phase: str = "Running", role: str = "worker") -> ObservedPod:
    """A pod of another TrainingJob bound to `node`, holding `gpus`."""
    return replace(pod("worker-0", "worker", ""), name=f"{job}-1-{role}", node=node, gpus=gpus, phase=phase)


def view(
    pods: list[tuple[tuple[str, str], ObservedPod]], products: tuple[str | None, ...] = (None, None)
) -> ClusterView:
    nodes = {
        f"g{i}": ObservedNode(f"g{i}", ready=True, gpus=8, product=product, unschedulable=False)
        for i, product in enumerate(products)
    }
    return ClusterView(nodes=nodes, gpus_in_use=dict, job_pods=lambda: pods)


def waiting_message(cluster: ClusterView, job: Job = JOB) -> str:
    prices = Prices({}, gpu_default=1.0, cpu_per_vcpu_hour=0.0, ram_per_gib_hour=0.0)
    status = TrainingJobStatus.model_validate(SCHEDULING)
    gang = [replace(p, spec_hash=builders.pod_spec_hash(job.spec)) for p in waiting_gang()]
    reason, message = scheduled(decide(job, status, gang, cluster, NOW, prices))
    assert reason == GANG_WAITING
    return message


def test_the_waiting_gang_names_the_training_job_holding_its_gpus() -> None:
    running = [
        (("ml", "a"), holding("a", "g0", 8)),
        (("ml", "a"), holding("a", "g1", 8, role="worker-1")),
        (("ml", "a"), holding("a", "g0", 0, role="head")),
    ]
    message = waiting_message(view(running))
    assert "held on its 2 candidate nodes by TrainingJob ml/a (16 nvidia.com/gpu on 2 nodes)" in message
    # Before the scheduler's own words, so the condition's bound never cuts the holder off.
    assert message.index("ml/a") < message.index(f"{SCHEDULER}: ")


def test_only_live_pods_of_other_jobs_on_the_nodes_it_could_use_count() -> None:
    pods = [
        (("ml", "b"), replace(pod("worker-0", "worker", ""), node="g0", phase="Running")),  # its own
        (("ml", "done"), holding("done", "g0", 8, phase="Succeeded")),  # finished: holds nothing
        (("ml", "elsewhere"), holding("elsewhere", "g1", 8)),  # on a node of another product
        (("other", "a"), holding("a", "g0", 8)),  # same name, other namespace: another job
    ]
    spec = {**SPEC, "workers": {**SPEC["workers"], "gpuProduct": "H100"}}
    job = replace(JOB, spec=TrainingJobSpec.model_validate(spec))
    message = waiting_message(view(pods, products=("H100", "A100")), job)
    assert "held on its 1 candidate node by TrainingJob other/a (8 nvidia.com/gpu on 1 node)" in message
    for absent in ("ml/b ", "ml/done", "ml/elsewhere"):
        assert absent not in message


def test_many_holders_are_named_largest_first_and_counted_beyond_five() -> None:
    pods = [(("ml", f"j{i}"), holding(f"j{i}", f"g{i % 2}", 1 + i)) for i in range(8)]
    message = waiting_message(view(pods))
    named = "ml/j7 (8 nvidia.com/gpu on 1 node), ml/j6 (7 nvidia.com/gpu on 1 node), ml/j5"
    assert f"held on its 2 candidate nodes by TrainingJobs {named}" in message
    assert "ml/j3 (4 nvidia.com/gpu on 1 node) and 3 more" in message
    assert "ml/j2 " not in message


def test_when_no_training_job_holds_it_the_message_says_so() -> None:
    message = waiting_message(view([]))
    assert "no TrainingJob holds nvidia.com/gpu on its 2 candidate nodes" in message


def test_thousands_of_holders_keep_the_condition_bounded() -> None:
    pods = [
        (("a-very-long-namespace-name" * 2, f"job-{i:05d}"), holding(f"j{i}", "g0", 1)) for i in range(5000)
    ]
    message = waiting_message(view(pods))
    assert len(message) <= MESSAGE_LIMIT
    assert "and 4995 more" in message


@pytest.mark.parametrize(
    ("message", "resources"),
    [
        (SEEN, ["nvidia.com/gpu"]),
        (
            "0/3 nodes are available: 2 Insufficient nvidia.com/gpu, 1 Insufficient cpu.",
            ["cpu", "nvidia.com/gpu"],
        ),
        ("0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector.", []),
    ],
)
def test_what_the_pods_wait_for_is_read_from_the_schedulers_words(message: str, resources: list[str]) -> None:
    assert holders.lacking(message) == resources


def test_cpu_and_memory_holders_are_read_from_the_pods_requests() -> None:
    requests = (Container(Amounts(cpu=2.0, memory_bytes=4 * 2**30)), Container(Amounts(cpu=0.5)))
    holder = replace(holding("a", "g0", 0), containers=requests)
    candidates = {"cpu": {"g0"}, "memory": {"g0"}}
    found = holders.holders([(("ml", "a"), holder)], ["cpu", "memory"], candidates, ("ml", "b"))
    assert holders.holders_message(found, ["cpu", "memory"], 1) == (
        "held on its 1 candidate node by TrainingJob ml/a (2.5 cpu, 4 GiB memory on 1 node)"
    )
