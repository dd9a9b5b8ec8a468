"""Two operator replicas on a real control plane: only the Lease holder reconciles; SIGKILLed while
TrainingJobs are being applied, the standby takes over within the lease duration plus two retry
periods (19 s with the chart's values), with no duplicate pods, no lost status, and every job Running.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from kubeobjects import items, status_of
from operator_process import TAKEOVER_SECONDS, OperatorProcess, start_operator, wait_for

from tandem.devinstall import Kubectl

WAIT = 90
JOBS = 30
#: The Lease the chart's settings name, in the namespace an operator outside a pod uses.
LEASE = ("default", "tandem-operator")
RECONCILES = re.compile(
    r'^tandem_operator_reconcile_total\{kind="TrainingJob",result="ok"\} (\S+)$', re.MULTILINE
)


def job(name: str) -> dict[str, Any]:
    spec = {
        "trainer": {"builtin": {"size": "tiny", "dataset": {"uri": "file:///data/corpus.txt"}}},
        "workers": {"replicas": 1},
        "scheduling": {"gangTimeoutSeconds": 300},
    }
    return {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def holder(kubectl: Kubectl) -> str:
    namespace, name = LEASE
    found = kubectl.run(
        "get", "lease", name, "-n", namespace, "-o", "jsonpath={.spec.holderIdentity}", check=False
    )
    return found.strip()


def reconciles(operator: OperatorProcess) -> float:
    return sum(float(value) for value in RECONCILES.findall(operator.metrics()))


def leads(operator: OperatorProcess) -> bool:
    return "tandem_operator_leader 1.0" in operator.metrics()


def health_where(operator: OperatorProcess, test: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    """The operator's /healthz document once `test` holds for it."""
    document = operator.health()
    return document if test(document) else None


def running(kubectl: Kubectl, namespace: str) -> dict[str, dict[str, Any]]:
    jobs = items(kubectl, namespace, "tj")
    return {
        j["metadata"]["name"]: j.get("status") or {}
        for j in jobs
        if (j.get("status") or {}).get("phase") == "Running"
    }


def test_only_the_leader_reconciles_and_the_standby_takes_over_after_a_sigkill(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess, second_operator: Path
) -> None:
    first = start_operator(operator.kubeconfig, second_operator / "first.log")
    second: OperatorProcess | None = None
    try:
        wait_for(lambda: holder(kubectl) == first.extra_env["POD_NAME"], WAIT, "the first operator to lead")
        second = start_operator(operator.kubeconfig, second_operator / "second.log")
        standby = second
        kubectl.run("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(job("before")))
        wait_for(lambda: "before" in running(kubectl, namespace), WAIT, "the leader to run the first job")
        assert leads(first)
        assert not leads(standby)
        assert reconciles(standby) == 0  # its caches see the job; it does not touch it
        # /healthz: the standby's caches are synced and alive (warm), it has reconciled nothing.
        standby_health = wait_for(
            lambda: health_where(
                standby, lambda h: all(c["synced"] for c in h["TrainingJob"]["caches"].values())
            ),
            WAIT,
            "warm caches",
        )
        assert standby_health["leader"] is False
        assert standby_health["TrainingJob"]["lastReconcileAgeSeconds"] is None
        assert all(c["alive"] for c in standby_health["TrainingJob"]["caches"].values())
        # (kopf answers /healthz from a result up to 10 s old: wait for one from after the reconciles)
        leader_health = wait_for(
            lambda: health_where(first, lambda h: h["TrainingJob"]["lastReconcileAgeSeconds"] is not None),
            WAIT,
            "the leader's last reconcile in /healthz",
        )
        assert leader_health["leader"] is True
        before = {p["metadata"]["name"]: p["metadata"]["uid"] for p in items(kubectl, namespace, "pods")}

        documents = yaml.safe_dump_all([job(f"job-{i}") for i in range(JOBS)])
        kubectl.run("apply", "-n", namespace, "-f", "-", stdin=documents)
        first.kill()  # SIGKILL while it works through the new jobs
        killed = time.monotonic()
        wait_for(
            lambda: holder(kubectl) == standby.extra_env["POD_NAME"], TAKEOVER_SECONDS + 30, "the takeover"
        )
        took = time.monotonic() - killed
        print(f"standby took over {took:.1f} s after the leader's SIGKILL (bound: {TAKEOVER_SECONDS:.0f} s)")
        assert leads(standby)

        wait_for(lambda: len(running(kubectl, namespace)) == JOBS + 1, WAIT * 2, "every job Running")
        statuses = running(kubectl, namespace)
        pods = items(kubectl, namespace, "pods")
        names = sorted(p["metadata"]["name"] for p in pods if not p["metadata"].get("deletionTimestamp"))
        expected = sorted(
            f"{j}-1-{role}"
            for j in ["before", *(f"job-{i}" for i in range(JOBS))]
            for role in ("head", "worker-0")
        )
        assert names == expected  # one gang each, first attempt: nothing made twice, nothing restarted
        assert all(s["attempt"] == 1 and s.get("restarts", 0) == 0 for s in statuses.values())
        after = {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods}
        assert {name: after[name] for name in before} == before  # the running job's pods were left alone
        assert status_of(kubectl, namespace, "tj", "before")["phase"] == "Running"
    finally:
        first.stop()
        if second is not None:
            second.stop()
