"""The children an attempt gets beyond its pods when the operator's settings ask for them: a
NetworkPolicy per job (config.networkPolicy) and a PodGroup per attempt with the pods sent to the
coscheduling scheduler (config.gangScheduler coscheduling). Off by default: nothing changes."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from tandem.api.trainingjob import TrainingJobSpec, TrainingJobStatus
from tandem.api.trainingrun import METRICS_PORT
from tandem.operator.config import OperatorSettings
from tandem.operator.cost import Prices
from tandem.operator.trainingjob import builders, podgroup
from tandem.operator.trainingjob.observe import ClusterView, ObservedNode, ObservedPod
from tandem.operator.trainingjob.reconcile import Decision, Job, decide

T0 = datetime(2026, 12, 5, 23, 0, tzinfo=UTC)
SPEC: dict[str, Any] = {
    "trainer": {"builtin": {"size": "tiny", "dataset": {"uri": "file:///d"}}},
    "workers": {"replicas": 2, "resources": {"gpu": 4}},
    "scheduling": {"gangTimeoutSeconds": 60},
}
NODES = ClusterView(
    nodes={"g0": ObservedNode("g0", ready=True, gpus=8, product=None, unschedulable=False)},
    gpus_in_use=dict,
)


def job(**spec: Any) -> Job:
    return Job("gpt", "ml", "uid", 1, TrainingJobSpec.model_validate({**SPEC, **spec}), "img")


def head_pod() -> ObservedPod:
    """The head of attempt 1, seen Pending: its workers are still to be created."""
    return ObservedPod(
        name="gpt-1-head",
        role="head",
        attempt=1,
        index=None,
        phase="Pending",
        node=None,
        ready=False,
        deleting=False,
        created=T0,
        started=None,
        gpus=0,
        failure="",
        scheduler_message="",
        progress=None,
        spec_hash=builders.pod_spec_hash(job().spec),
        ip=None,
        containers=(),
    )


def tick(status: dict[str, Any], pods: list[ObservedPod], the_job: Job | None = None) -> Decision:
    prices = Prices({}, gpu_default=1.0, cpu_per_vcpu_hour=0.0, ram_per_gib_hour=0.0)
    return decide(the_job or job(), TrainingJobStatus.model_validate(status), pods, NODES, T0, prices)


COSCHEDULING = replace(job(), gang_scheduler_name="scheduler-plugins-scheduler")


def _kinds(create: list[dict[str, Any]]) -> list[str]:
    return [m["kind"] for m in create]


def test_defaults_add_no_policy_no_podgroup_and_keep_the_default_scheduler() -> None:
    settings = OperatorSettings()
    assert settings.network_policy is False
    assert settings.gang_scheduler == "none"
    decision = tick({}, [])
    assert "NetworkPolicy" not in _kinds(decision.create)
    assert "PodGroup" not in _kinds(decision.create)
    assert all("schedulerName" not in m["spec"] for m in decision.create if m["kind"] == "Pod")


def test_a_network_policy_comes_before_the_pods_and_admits_only_the_jobs_own_pods() -> None:
    decision = tick({}, [], the_job=replace(job(), network_policy=True))
    kinds = _kinds(decision.create)
    assert kinds.index("NetworkPolicy") < kinds.index("Pod")
    (policy,) = [m for m in decision.create if m["kind"] == "NetworkPolicy"]
    own = {"matchLabels": {builders.LABEL_JOB: "gpt"}}
    assert policy["spec"]["podSelector"] == own
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    # Every port from the job's own pods; from anywhere else only the metrics port.
    assert policy["spec"]["ingress"] == [
        {"from": [{"podSelector": own}]},
        {"ports": [{"port": METRICS_PORT, "protocol": "TCP"}]},
    ]
    # The selector matches every pod of the gang and no pod of another job.
    for made in (m for m in decision.create if m["kind"] == "Pod"):
        assert made["metadata"]["labels"][builders.LABEL_JOB] == "gpt"
    other = builders.network_policy("other", "u2", "ml")
    assert other["spec"]["podSelector"] != policy["spec"]["podSelector"]
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "uid"


def test_coscheduling_makes_a_podgroup_per_attempt_named_as_the_pods_label() -> None:
    decision = tick({}, [], the_job=COSCHEDULING)
    kinds = _kinds(decision.create)
    assert kinds.index("PodGroup") < kinds.index("Pod")
    (group,) = [m for m in decision.create if m["kind"] == "PodGroup"]
    pods = [m for m in decision.create if m["kind"] == "Pod"]
    assert {p["metadata"]["labels"][builders.LABEL_POD_GROUP] for p in pods} == {group["metadata"]["name"]}
    assert group["apiVersion"] == "scheduling.x-k8s.io/v1alpha1"
    assert group["spec"]["minMember"] == len(pods) == 3
    assert group["spec"]["scheduleTimeoutSeconds"] == 60  # the job's gangTimeoutSeconds
    assert group["spec"]["minResources"]["nvidia.com/gpu"] == "8"  # 2 workers x 4
    assert {p["spec"]["schedulerName"] for p in pods} == {"scheduler-plugins-scheduler"}


def test_pods_created_again_keep_their_group_and_scheduler() -> None:
    decision = tick({"phase": "Scheduling", "attempt": 1}, [head_pod()], the_job=COSCHEDULING)
    assert "PodGroup" in _kinds(decision.create)
    pods = [m for m in decision.create if m["kind"] == "Pod"]
    assert [p["metadata"]["name"] for p in pods] == ["gpt-1-worker-0", "gpt-1-worker-1"]
    assert {p["spec"]["schedulerName"] for p in pods} == {"scheduler-plugins-scheduler"}


def test_a_scheduler_named_in_the_spec_wins() -> None:
    spec = {"scheduling": {"schedulerName": "volcano", "gangTimeoutSeconds": 60}}
    decision = tick({}, [], the_job=replace(COSCHEDULING, spec=job(**spec).spec))
    assert {m["spec"]["schedulerName"] for m in decision.create if m["kind"] == "Pod"} == {"volcano"}


def test_gang_resources_add_up_head_and_every_worker() -> None:
    spec = TrainingJobSpec.model_validate(
        {
            "trainer": {"entrypoint": "t:main"},
            "head": {"resources": {"cpu": "500m", "memory": "1Gi"}},
            "workers": {"replicas": 3, "resources": {"cpu": "2", "memory": "512Mi", "gpu": 2}},
        }
    )
    assert podgroup.gang_resources(spec) == {
        "cpu": "6500m",
        "memory": str(1024**3 + 3 * 512 * 1024**2),
        "nvidia.com/gpu": "6",
    }
