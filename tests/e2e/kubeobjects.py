"""Reading objects back through the real kubectl, as a user would."""

from __future__ import annotations

import json
from typing import Any

from tandem.devinstall import Kubectl


def get(kubectl: Kubectl, namespace: str, kind: str, name: str) -> dict[str, Any]:
    return dict(json.loads(kubectl.run("get", kind, name, "-n", namespace, "-o", "json")))


def items(kubectl: Kubectl, namespace: str, kind: str, *selector: str) -> list[dict[str, Any]]:
    return list(json.loads(kubectl.run("get", kind, "-n", namespace, *selector, "-o", "json"))["items"])


def observed(kubectl: Kubectl, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    """The object once the operator has reconciled its current generation, else None."""
    obj = get(kubectl, namespace, kind, name)
    status = obj.get("status") or {}
    return obj if status.get("observedGeneration") == obj["metadata"]["generation"] else None


def status_of(kubectl: Kubectl, namespace: str, kind: str, name: str) -> dict[str, Any]:
    return dict(get(kubectl, namespace, kind, name).get("status") or {})


def events(kubectl: Kubectl, namespace: str, name: str) -> list[dict[str, Any]]:
    return items(kubectl, namespace, "events", f"--field-selector=involvedObject.name={name}")


def priced_job(name: str) -> dict[str, Any]:
    """One worker with 2 H100s, 4 vCPUs and 16 GiB, and a CPU head: what the cost tests price."""
    return {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "trainer": {
                "builtin": {"size": "tiny", "dataset": {"uri": "file:///data/c.txt"}, "maxSteps": 100}
            },
            "workers": {
                "replicas": 1,
                "resources": {"gpu": 2, "cpu": "4", "memory": "16Gi"},
                "gpuProduct": "NVIDIA-H100-80GB-HBM3",
            },
            "checkpoint": {"storage": {"uri": f"file:///checkpoints/{name}"}},
        },
    }
