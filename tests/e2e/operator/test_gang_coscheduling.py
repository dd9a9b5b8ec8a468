"""Gang admission by scheduler-plugins' coscheduling (operator setting gangScheduler: coscheduling).

Two TrainingJobs that each need every GPU of the cluster's two kwok H100 nodes (2 workers x 8 GPUs),
applied together: with the default scheduler each could bind one worker and hold half the GPUs until
its gang timeout. With the coscheduling scheduler (built from its pinned Go module, run here as a
second scheduler) and a PodGroup per attempt, at no moment do both jobs have a bound pod; one runs,
the other's pods wait for their group, and its Scheduled condition says why in the scheduler's words
and names the job holding the GPUs; when the first job ends, the second starts.

The operator runs with the chart's RBAC and config.networkPolicy on, so the per-job NetworkPolicy and
the PodGroup are made under the permissions an install grants (kwok does not enforce the policy).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubeobjects import get, items, status_of
from operator_process import OperatorProcess, start_operator, wait_for

from tandem.devcluster import gangscheduler
from tandem.devcluster.cluster import ClusterInfo
from tandem.devinstall import Kubectl

WAIT = 120.0
#: Longer than the scheduler's Permit wait (10 s): the waiting gang is retried, and still gets nothing.
CONTENDED_SECONDS = 30.0
GANG = 3  # head + 2 workers
PODGROUP_CRD = "podgroups.scheduling.x-k8s.io"


def _progress(message: str) -> None:
    print(f"[gang-scheduler] {message}", file=sys.__stderr__, flush=True)


@pytest.fixture(scope="module")
def gang_scheduler(
    cluster: ClusterInfo, kubectl: Kubectl, crds: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[gangscheduler.GangScheduler]:
    binary = gangscheduler.ensure_scheduler(_progress)
    kubectl.run("apply", "--server-side", "-f", str(gangscheduler.podgroup_crd()))
    kubectl.run("wait", "--for=condition=Established", "--timeout=60s", f"crd/{PODGROUP_CRD}")
    workdir = tmp_path_factory.mktemp("gang-scheduler")
    with gangscheduler.GangScheduler(binary, cluster.kubeconfig, workdir) as scheduler:
        yield scheduler


@pytest.fixture
def gang_operator(operator: OperatorProcess, second_operator: Path) -> Iterator[OperatorProcess]:
    """The operator with coscheduling and NetworkPolicies on (the session's operator is paused)."""
    env = {
        "TANDEM_GANG_SCHEDULER": "coscheduling",
        "TANDEM_GANG_SCHEDULER_NAME": gangscheduler.SCHEDULER_NAME,
        "TANDEM_NETWORK_POLICY": "true",
    }
    process = start_operator(operator.kubeconfig, second_operator / "gang-operator.log", env)
    try:
        yield process
    finally:
        process.stop()


def job(name: str) -> dict[str, Any]:
    spec = {
        "trainer": {"builtin": {"size": "tiny", "dataset": {"uri": "file:///data/corpus.txt"}}},
        "workers": {"replicas": 2, "resources": {"gpu": 8}},
        # Longer than the test: the waiting gang must start because the first ended, not be recreated.
        "scheduling": {"gangTimeoutSeconds": 900},
    }
    return {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def bound(kubectl: Kubectl, namespace: str) -> dict[str, int]:
    """Bound pods per job (a pod holds its GPUs from the moment it has a node)."""
    counts = {"a": 0, "b": 0}
    for pod in items(kubectl, namespace, "pods"):
        name = pod["metadata"]["labels"].get("tandem.dev/trainingjob")
        if name in counts and pod["spec"].get("nodeName") and not pod["metadata"].get("deletionTimestamp"):
            counts[name] += 1
    return counts


def test_two_jobs_contending_for_all_gpus_never_both_hold_a_partial_gang(
    kubectl: Kubectl,
    namespace: str,
    gang_scheduler: gangscheduler.GangScheduler,
    gang_operator: OperatorProcess,
) -> None:
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump_all([job("a"), job("b")]))
    seen: list[dict[str, int]] = []
    both: list[dict[str, int]] = []  # recorded, not raised: wait_for retries through exceptions

    def check() -> dict[str, int]:
        counts = bound(kubectl, namespace)
        seen.append(counts)
        if counts["a"] and counts["b"]:
            both.append(counts)
        return counts

    def one_whole_gang() -> dict[str, int] | None:
        counts = check()
        return counts if GANG in counts.values() else None

    counts = wait_for(one_whole_gang, WAIT, "one whole gang bound")
    assert not both, f"both jobs had bound pods at once (a partial gang held): {both[:5]}"
    first, second = ("a", "b") if counts["a"] == GANG else ("b", "a")
    wait_for(
        lambda: status_of(kubectl, namespace, "tj", first).get("phase") == "Running", WAIT, f"{first} Running"
    )
    # The other gang waits, whole: nothing of it is bound while the first runs, through Permit retries.
    until = time.monotonic() + CONTENDED_SECONDS
    while time.monotonic() < until:
        assert check()[second] == 0
        time.sleep(0.5)
    assert status_of(kubectl, namespace, "tj", second).get("phase") == "Scheduling"

    # Status says why it waits, in the scheduler's words (the waiting pods' PodScheduled condition).
    def why_waiting() -> dict[str, Any] | None:
        conditions = status_of(kubectl, namespace, "tj", second).get("conditions", [])
        found = next((c for c in conditions if c["type"] == "Scheduled"), None)
        return found if found and found["reason"] == "GangWaiting" else None

    condition = wait_for(why_waiting, WAIT, f"{second}'s Scheduled condition to say why it waits")
    assert condition["status"] == "False"
    assert condition["message"].startswith(f"waiting for the PodGroup's {GANG} members to fit together")
    assert "the cluster is short of 16 nvidia.com/gpu" in condition["message"]
    assert f"{gangscheduler.SCHEDULER_NAME}: 0/" in condition["message"]
    # ... and which job holds the GPUs it waits for, from the operator's pod cache.
    holder = (
        f"held on its 2 candidate nodes by TrainingJob {namespace}/{first} (16 nvidia.com/gpu on 2 nodes)"
    )
    assert holder in condition["message"], condition["message"]
    told = [e for e in items(kubectl, namespace, "events") if e["reason"] == "GangWaiting"]
    assert second in {e["involvedObject"]["name"] for e in told}
    waiting = [
        p for p in items(kubectl, namespace, "pods") if p["metadata"]["name"].startswith(f"{second}-1-")
    ]
    assert len(waiting) == GANG, "the waiting gang's pods exist (created together), unbound"
    assert {p["spec"]["schedulerName"] for p in waiting} == {gangscheduler.SCHEDULER_NAME}

    # What the operator made under the chart's RBAC: one PodGroup per attempt, one NetworkPolicy per job.
    group = get(kubectl, namespace, "podgroup", f"{second}-1")
    assert group["spec"]["minMember"] == GANG
    assert group["spec"]["minResources"]["nvidia.com/gpu"] == "16"
    policy = get(kubectl, namespace, "networkpolicy", f"{first}-ray")
    assert policy["spec"]["podSelector"] == {"matchLabels": {"tandem.dev/trainingjob": first}}

    # The first job ends: the second gang is bound whole and runs.
    kubectl.run("delete", "tj", first, "-n", namespace)
    wait_for(
        lambda: check() and status_of(kubectl, namespace, "tj", second).get("phase") == "Running",
        WAIT,
        f"{second} Running after {first} ended",
    )
    assert check()[second] == GANG
    assert not both, f"both jobs had bound pods at once (a partial gang held): {both[:5]}"
    assert len(seen) > 10, "the invariant was checked only a few times"
