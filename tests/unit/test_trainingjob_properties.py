"""Property-based: any TrainingJob the models admit, however hostile (huge or odd label values, any
toleration key, any image string, long names, garbage progress records, huge scheduler messages),
goes through the builders and the state machine without a crash, with every status it writes valid
for the API model and every condition message bounded, and without a loop: once its gang exists the
reconcile creates nothing more, and the clock never asks for it again at once.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tandem.api.trainingjob import TrainingJobPhase, TrainingJobSpec, TrainingJobStatus
from tandem.operator.cost import Prices
from tandem.operator.kube import MESSAGE_LIMIT
from tandem.operator.trainingjob import builders
from tandem.operator.trainingjob.controller import recheck_in
from tandem.operator.trainingjob.observe import ClusterView, ObservedNode, observe_pod
from tandem.operator.trainingjob.reconcile import Decision, Job, decide, refused

T0 = datetime(2026, 12, 5, 20, 0, tzinfo=UTC)
PRICES = Prices({}, gpu_default=2.0, cpu_per_vcpu_hour=0.0, ram_per_gib_hour=0.0)
NODES = ClusterView(
    nodes={
        f"n{i}": ObservedNode(f"n{i}", ready=True, gpus=8, product="H100", unschedulable=False)
        for i in range(4)
    },
    gpus_in_use=lambda: {},
)
DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
label_keys = st.one_of(
    st.from_regex(rf"\A{LABEL_NAME}\Z"), st.from_regex(rf"\A{DNS_LABEL}(\.{DNS_LABEL})?/{LABEL_NAME}\Z")
)
label_values = st.one_of(st.just(""), st.from_regex(rf"\A{LABEL_NAME}\Z"))
hostile_text = st.one_of(st.text(max_size=300), st.integers(1, 200_000).map(lambda n: "x" * n))


@st.composite
def hostile_specs(draw: st.DrawFn) -> dict[str, Any]:
    gpus = draw(st.integers(0, 8))
    workers: dict[str, Any] = {
        "replicas": draw(st.integers(1, 32)),
        "resources": {"gpu": gpus},
        "nodeSelector": draw(st.dictionaries(label_keys, label_values, max_size=4)),
        "tolerations": draw(
            st.lists(
                st.fixed_dictionaries(
                    {"key": st.text(min_size=1, max_size=316), "operator": st.just("Exists")}
                ),
                max_size=3,
            )
        ),
    }
    if gpus and draw(st.booleans()):
        workers["gpuProduct"] = draw(st.from_regex(rf"\A{LABEL_NAME}\Z"))
    spec: dict[str, Any] = {
        "trainer": {"builtin": {"size": "tiny", "dataset": {"uri": "tandem://corpus"}, "maxSteps": 100}},
        "workers": workers,
        "batch": {"perDevice": draw(st.integers(1, 64))},
        "scheduling": {"gangTimeoutSeconds": draw(st.integers(1, 3600))},
    }
    if draw(st.booleans()):
        spec["image"] = draw(st.text(min_size=1, max_size=500))
    return spec


def observed(manifest: dict[str, Any], node: str, progress: str | None, now: datetime) -> Any:
    """The pod as the watch would show it once the scheduler bound it and it runs."""
    pod = copy.deepcopy(manifest)
    pod["metadata"]["creationTimestamp"] = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    if progress is not None and pod["metadata"]["labels"][builders.LABEL_ROLE] == "head":
        pod["metadata"]["annotations"][builders.PROGRESS_ANNOTATION] = progress
    pod["spec"]["nodeName"] = node
    pod["status"] = {
        "phase": "Running",
        "podIP": "10.0.0.1",
        "startTime": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "conditions": [{"type": "Ready", "status": "True"}],
    }
    return observe_pod(pod)


def assert_writable(decision: Decision) -> None:
    """What the operator would write is valid for the API model, messages bounded."""
    stored = TrainingJobStatus.model_validate(decision.status.to_dict())
    for condition in stored.conditions:
        assert len(condition.message) <= MESSAGE_LIMIT
    if stored.last_failure is not None:
        assert len(stored.last_failure.message or "") <= MESSAGE_LIMIT


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=hostile_specs(),
    name=st.from_regex(rf"\A{DNS_LABEL}(\.{DNS_LABEL}){{0,3}}\Z"),
    progress=st.one_of(st.none(), hostile_text),
)
def test_any_admitted_job_reconciles_to_a_fixed_point_without_crashing(
    raw: dict[str, Any], name: str, progress: str | None
) -> None:
    try:
        spec = TrainingJobSpec.model_validate(raw)
    except ValidationError:
        assume(False)  # refused by the models (and by the CRD): never reaches a reconcile
    job = Job(name, "ns", "uid", 1, spec, spec.image or "img")
    status: dict[str, Any] = {}
    pods: list[Any] = []
    now = T0
    created_pods: list[int] = []
    for _ in range(6):
        current = TrainingJobStatus.model_validate(status)
        decision = decide(job, current, pods, NODES, now, PRICES)
        # decide works on a shallow copy of the status it is given: it must change nothing in it.
        assert current.to_dict() == TrainingJobStatus.model_validate(status).to_dict()
        assert_writable(decision)
        new = [m for m in decision.create if m["kind"] == "Pod"]
        created_pods.append(len(new))
        pods = [p for p in pods if p.name not in decision.delete]
        pods += [observed(m, f"n{i % 4}", progress, now) for i, m in enumerate(new)]
        status = decision.status.to_dict()
        later = recheck_in(decision, retry=False)
        assert later is None or later > 0  # never a hot loop
        now += timedelta(seconds=3)
    assert created_pods[0] == spec.workers.replicas + 1  # the whole gang at once
    assert sum(created_pods[1:]) == 0  # and nothing after: no loop
    assert status["phase"] == TrainingJobPhase.RUNNING


@settings(max_examples=40, deadline=None)
@given(raw=hostile_specs(), message=hostile_text)
def test_any_refusal_gives_a_writable_failed_status_and_nothing_is_created_again(
    raw: dict[str, Any], message: str
) -> None:
    try:
        spec = TrainingJobSpec.model_validate(raw)
    except ValidationError:
        assume(False)
    job = Job("job", "ns", "uid", 1, spec, "img")
    first = decide(job, TrainingJobStatus(), [], NODES, T0, PRICES)
    failed = refused(job, first.status, message, T0)
    again = decide(
        job, TrainingJobStatus.model_validate(failed.to_dict()), [], NODES, T0 + timedelta(hours=1), PRICES
    )
    assert_writable(again)
    assert again.status.phase is TrainingJobPhase.FAILED
    assert again.create == []
