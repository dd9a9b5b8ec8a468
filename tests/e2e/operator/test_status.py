"""The operator on a real control plane: examples apply, status and printer columns fill, events post."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import pytest
from kubeobjects import events, get, items, observed, status_of
from operator_process import OperatorProcess, wait_for

from tandem.devinstall import Kubectl, install_example_volumes
from tandem.operator import cost
from tandem.operator.config import OperatorSettings

EXAMPLES = Path(__file__).resolve().parents[3] / "manifests" / "examples"
STATUS_SECONDS = 30


def _phase_is(kubectl: Kubectl, namespace: str, name: str, phase: str) -> bool:
    return status_of(kubectl, namespace, "tj", name).get("phase") == phase


def _table(kubectl: Kubectl, namespace: str, kind: str) -> list[dict[str, str]]:
    """`kubectl get` as rows keyed by column header, cut at the headers' positions (cells may be empty)."""
    lines = kubectl.run("get", kind, "-n", namespace).rstrip().splitlines()
    starts = [match.start() for match in re.finditer(r"\S+", lines[0])]
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    header = [lines[0][start:end].strip() for start, end in bounds]
    return [
        {name: line[start:end].strip() for name, (start, end) in zip(header, bounds, strict=True)}
        for line in lines[1:]
    ]


@pytest.mark.usefixtures("operator")
def test_examples_apply_and_show_printer_columns(kubectl: Kubectl, namespace: str) -> None:
    install_example_volumes(kubectl, namespace)
    kubectl.run("apply", "-n", namespace, "-f", str(EXAMPLES))
    names = {"trainingjob": ["gpt-tiny", "gpt-124m"], "inferenceservice": ["embeddings", "gpt-tiny"]}
    for kind, objects in names.items():
        for name in objects:
            wait_for(partial(observed, kubectl, namespace, kind, name), STATUS_SECONDS, f"{kind} {name}")

    wait_for(
        partial(_phase_is, kubectl, namespace, "gpt-tiny", "Running"), STATUS_SECONDS, "gpt-tiny Running"
    )
    # Running once every pod is bound; readiness can trail binding by a reconcile.
    wait_for(
        lambda: status_of(kubectl, namespace, "tj", "gpt-tiny").get("workersDisplay") == "2/2",
        STATUS_SECONDS,
        "both gpt-tiny workers ready",
    )
    jobs = {row["NAME"]: row for row in _table(kubectl, namespace, "tj")}
    assert list(jobs["gpt-tiny"]) == [
        "NAME", "PHASE", "WORKERS", "STEP", "LOSS", "CHECKPOINT", "RESTARTS", "COST", "AGE",
    ]  # fmt: skip
    assert jobs["gpt-tiny"]["PHASE"] == "Running"
    assert jobs["gpt-tiny"]["WORKERS"] == "2/2"
    assert jobs["gpt-tiny"]["STEP"] == "0/200"
    assert jobs["gpt-tiny"]["RESTARTS"] == "0"
    assert jobs["gpt-tiny"]["COST"].startswith("$0.0")  # CPU and memory for a few seconds

    wait_for(
        lambda: status_of(kubectl, namespace, "tisvc", "embeddings").get("phase") == "Ready",
        STATUS_SECONDS,
        "the embeddings service Ready (one replica on an H100 node)",
    )
    services = {row["NAME"]: row for row in _table(kubectl, namespace, "tisvc")}
    assert list(services["embeddings"]) == ["NAME", "PHASE", "READY", "MODEL", "RPS", "P99", "COST/H", "AGE"]
    assert services["embeddings"]["PHASE"] == "Ready"
    assert services["embeddings"]["READY"] == "1/1"
    assert services["embeddings"]["MODEL"] == "pvc://models/minilm-l6/"
    # One replica on an H100 node: $4.00 for the GPU, plus its CPU and memory requests (OpenCost's prices).
    (replica,) = items(kubectl, namespace, "pods", "-l=tandem.dev/inferenceservice=embeddings")
    rate = cost.pod_rate(cost.containers_of(replica), "NVIDIA-H100-80GB-HBM3", OperatorSettings().prices())
    assert rate.gpus == 1
    assert services["embeddings"]["COST/H"] == f"${rate.usd_per_hour:,.2f}"
    # The service that serves gpt-tiny's checkpoints waits for the first one, and says so.
    assert services["gpt-tiny"]["MODEL"].startswith("gpt-tiny")
    assert services["gpt-tiny"]["PHASE"] == "Pending"


@pytest.mark.usefixtures("operator")
def test_status_follows_spec_changes_with_conditions_and_events(kubectl: Kubectl, namespace: str) -> None:
    install_example_volumes(kubectl, namespace)
    kubectl.run("apply", "-n", namespace, "-f", str(EXAMPLES / "trainingjob-gpt-tiny.yaml"))
    first = wait_for(lambda: observed(kubectl, namespace, "tj", "gpt-tiny"), STATUS_SECONDS, "first status")
    accepted = {c["type"]: c for c in first["status"]["conditions"]}["Accepted"]
    assert accepted["status"] == "True"
    assert accepted["observedGeneration"] == first["metadata"]["generation"]

    wait_for(partial(_phase_is, kubectl, namespace, "gpt-tiny", "Running"), STATUS_SECONDS, "Running")

    replicas = '{"spec":{"workers":{"replicas":4}}}'
    kubectl.run("patch", "tj", "gpt-tiny", "-n", namespace, "--type=merge", "-p", replicas)
    wait_for(
        lambda: status_of(kubectl, namespace, "tj", "gpt-tiny").get("workersDisplay") == "4/4",
        STATUS_SECONDS,
        "4 of 4 workers after the spec change",
    )
    second = get(kubectl, namespace, "tj", "gpt-tiny")
    assert second["metadata"]["generation"] == first["metadata"]["generation"] + 1
    assert second["status"]["observedGeneration"] == second["metadata"]["generation"]
    assert second["status"]["restarts"] == 0  # a spec change replaces the gang; it is no failure
    assert second["status"]["attempt"] == 2

    kubectl.run("patch", "tj", "gpt-tiny", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    wait_for(partial(_phase_is, kubectl, namespace, "gpt-tiny", "Suspended"), STATUS_SECONDS, "Suspended")
    said = [(event["reason"], event["message"]) for event in events(kubectl, namespace, "gpt-tiny")]
    assert {"Running", "Pending", "Suspended"} <= {reason for reason, _ in said}, said
    # A gang bound within moments of its creation is told in one event, not a Scheduling and a Running.
    assert ("Running", "gang 2: 5 pods created together; all 5 pods bound") in said, said


@pytest.mark.usefixtures("operator")
def test_scale_subresource_sets_the_replica_count(kubectl: Kubectl, namespace: str) -> None:
    kubectl.run("apply", "-n", namespace, "-f", str(EXAMPLES / "inferenceservice-embeddings.yaml"))
    wait_for(lambda: observed(kubectl, namespace, "tisvc", "embeddings"), STATUS_SECONDS, "first status")
    kubectl.run("scale", "tisvc", "embeddings", "-n", namespace, "--replicas=2")
    scaled = wait_for(
        lambda: observed(kubectl, namespace, "tisvc", "embeddings"), STATUS_SECONDS, "scaled status"
    )
    assert scaled["spec"]["replicas"]["count"] == 2
    assert scaled["status"]["replicas"]["desired"] == 2
    assert scaled["status"]["selector"] == "tandem.dev/inferenceservice=embeddings"


def test_operator_exports_reconcile_metrics(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    kubectl.run("apply", "-n", namespace, "-f", str(EXAMPLES / "inferenceservice-embeddings.yaml"))
    wait_for(lambda: observed(kubectl, namespace, "tisvc", "embeddings"), STATUS_SECONDS, "status")
    metrics = operator.metrics()
    assert re.search(r'tandem_operator_reconcile_total\{kind="InferenceService",result="ok"\} [1-9]', metrics)
    assert 'tandem_operator_reconcile_duration_seconds_bucket{kind="InferenceService"' in metrics
