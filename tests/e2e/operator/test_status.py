"""The operator on a real control plane: examples apply, status and printer columns fill, events post."""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from operator_process import OperatorProcess, wait_for

from tandem.devinstall import Kubectl

EXAMPLES = Path(__file__).resolve().parents[3] / "manifests" / "examples"
STATUS_SECONDS = 30


def _get(kubectl: Kubectl, namespace: str, kind: str, name: str) -> dict[str, Any]:
    return dict(json.loads(kubectl.run("get", kind, name, "-n", namespace, "-o", "json")))


def _observed(kubectl: Kubectl, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    """The object once the operator has reconciled its current generation, else None."""
    obj = _get(kubectl, namespace, kind, name)
    status = obj.get("status") or {}
    return obj if status.get("observedGeneration") == obj["metadata"]["generation"] else None


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
    kubectl.run("apply", "-n", namespace, "-f", str(EXAMPLES))
    names = {"trainingjob": ["gpt-tiny", "gpt-124m"], "inferenceservice": ["embeddings", "gpt-tiny"]}
    for kind, objects in names.items():
        for name in objects:
            wait_for(partial(_observed, kubectl, namespace, kind, name), STATUS_SECONDS, f"{kind} {name}")

    jobs = {row["NAME"]: row for row in _table(kubectl, namespace, "tj")}
    assert list(jobs["gpt-tiny"]) == [
        "NAME", "PHASE", "WORKERS", "STEP", "LOSS", "CHECKPOINT", "RESTARTS", "COST", "AGE",
    ]  # fmt: skip
    assert jobs["gpt-tiny"]["PHASE"] == "Pending"
    assert jobs["gpt-tiny"]["WORKERS"] == "0/2"
    assert jobs["gpt-tiny"]["STEP"] == "0/200"
    assert jobs["gpt-tiny"]["RESTARTS"] == "0"
    assert jobs["gpt-tiny"]["COST"] == "$0.00"

    services = {row["NAME"]: row for row in _table(kubectl, namespace, "tisvc")}
    assert list(services["embeddings"]) == ["NAME", "PHASE", "READY", "MODEL", "RPS", "P99", "COST/H", "AGE"]
    assert services["embeddings"]["PHASE"] == "Pending"
    assert services["gpt-tiny"]["MODEL"].startswith("gpt-tiny")
    assert services["embeddings"]["READY"].startswith("0/")
    assert services["embeddings"]["COST/H"].startswith("$")


@pytest.mark.usefixtures("operator")
def test_status_follows_spec_changes_with_conditions_and_events(kubectl: Kubectl, namespace: str) -> None:
    kubectl.run("apply", "-n", namespace, "-f", str(EXAMPLES / "trainingjob-gpt-tiny.yaml"))
    first = wait_for(lambda: _observed(kubectl, namespace, "tj", "gpt-tiny"), STATUS_SECONDS, "first status")
    accepted = {c["type"]: c for c in first["status"]["conditions"]}["Accepted"]
    assert accepted["status"] == "True"
    assert accepted["observedGeneration"] == first["metadata"]["generation"]

    kubectl.run(
        "patch",
        "tj",
        "gpt-tiny",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"workers":{"replicas":4}}}',
    )
    second = wait_for(
        lambda: _observed(kubectl, namespace, "tj", "gpt-tiny"), STATUS_SECONDS, "updated status"
    )
    assert second["metadata"]["generation"] == first["metadata"]["generation"] + 1
    assert second["status"]["workersDisplay"] == "0/4"

    kubectl.run("patch", "tj", "gpt-tiny", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    wait_for(
        lambda: (
            (_observed(kubectl, namespace, "tj", "gpt-tiny") or {}).get("status", {}).get("phase")
            == "Suspended"
        ),
        STATUS_SECONDS,
        "phase Suspended",
    )
    events = json.loads(
        kubectl.run(
            "get", "events", "-n", namespace, "--field-selector=involvedObject.name=gpt-tiny", "-o", "json"
        )
    )["items"]
    reasons = {event["reason"] for event in events}
    assert {"Pending", "Suspended"} <= reasons, reasons


@pytest.mark.usefixtures("operator")
def test_scale_subresource_sets_the_replica_count(kubectl: Kubectl, namespace: str) -> None:
    kubectl.run("apply", "-n", namespace, "-f", str(EXAMPLES / "inferenceservice-embeddings.yaml"))
    wait_for(lambda: _observed(kubectl, namespace, "tisvc", "embeddings"), STATUS_SECONDS, "first status")
    kubectl.run("scale", "tisvc", "embeddings", "-n", namespace, "--replicas=2")
    scaled = wait_for(
        lambda: _observed(kubectl, namespace, "tisvc", "embeddings"), STATUS_SECONDS, "scaled status"
    )
    assert scaled["spec"]["replicas"]["count"] == 2
    assert scaled["status"]["replicas"]["desired"] == 2
    assert scaled["status"]["selector"] == "tandem.dev/inferenceservice=embeddings"


def test_operator_exports_reconcile_metrics(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str
) -> None:
    kubectl.run("apply", "-n", namespace, "-f", str(EXAMPLES / "inferenceservice-embeddings.yaml"))
    wait_for(lambda: _observed(kubectl, namespace, "tisvc", "embeddings"), STATUS_SECONDS, "status")
    metrics = operator.metrics()
    assert re.search(r'tandem_operator_reconcile_total\{kind="InferenceService",result="ok"\} [1-9]', metrics)
    assert 'tandem_operator_reconcile_duration_seconds_bucket{kind="InferenceService"' in metrics
