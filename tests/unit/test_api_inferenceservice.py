"""InferenceService models: defaults, wire form, cross-field rules, status display fields, examples."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from tandem.api import inferenceservice as isvc
from tandem.api.common import describe_validation_error
from tandem.api.inferenceservice import (
    InferenceService,
    InferenceServicePhase,
    InferenceServiceSpec,
    InferenceServiceStatus,
    Replicas,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"

MINIMAL: dict[str, Any] = {"model": {"uri": "pvc://models/gpt/"}}


def spec_with(**changes: Any) -> dict[str, Any]:
    spec = copy.deepcopy(MINIMAL)
    spec.update(changes)
    return spec


def test_names() -> None:
    assert isvc.KIND == "InferenceService"
    assert isvc.PLURAL == "inferenceservices"
    assert [p.value for p in InferenceServicePhase] == ["Pending", "Loading", "Ready", "Suspended", "Failed"]


def test_defaults() -> None:
    spec = InferenceServiceSpec.model_validate(MINIMAL)
    assert spec.to_dict() == {
        "model": {"uri": "pvc://models/gpt/"},
        "runtime": "causal-lm",
        "precision": "fp32",
        "batching": {
            "maxBatchSize": 32,
            "maxQueueDelayMs": 5,
            "maxQueueSize": 1024,
            "maxConcurrentBatches": 1,
            "requestTimeoutS": 30,
            "maxQueueWaitMs": 1000,
            "workers": 1,
        },
        "resources": {"gpu": 0},
        "replicas": {"min": 1, "max": 1, "count": 1},
        "rollout": {"onNewCheckpoint": "auto"},
        "suspend": False,
    }
    assert spec.autoscaling is None


def test_training_job_ref_defaults_to_latest() -> None:
    spec = InferenceServiceSpec.model_validate({"model": {"trainingJobRef": {"name": "gpt-small"}}})
    assert spec.model.training_job_ref is not None
    assert spec.model.training_job_ref.checkpoint == "latest"
    for step in (1500, "1500"):
        ref = InferenceServiceSpec.model_validate(
            {"model": {"trainingJobRef": {"name": "g", "checkpoint": step}}}
        )
        assert ref.model.training_job_ref is not None
        assert ref.model.training_job_ref.checkpoint == step


def test_camel_case_round_trip() -> None:
    wire = {
        "image": "ghcr.io/example/serve:1",
        "model": {"trainingJobRef": {"name": "gpt-small", "checkpoint": 1500}},
        "runtime": "embeddings",
        "precision": "int8",
        "batching": {
            "maxBatchSize": 16,
            "maxQueueDelayMs": 0,
            "maxQueueSize": 16,
            "preferredBatchSizes": [8, 16],
            "maxConcurrentBatches": 2,
            "requestTimeoutS": 0,
            "maxQueueWaitMs": 250,
            "workers": 4,
        },
        "resources": {"gpu": 1, "cpu": "4", "memory": "16Gi"},
        "gpuProduct": "NVIDIA-L4",
        "nodeSelector": {"pool": "serve"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "replicas": {"min": 0, "max": 8, "count": 3},
        "autoscaling": {
            "mode": "external",
            "metric": "latencyP99",
            "target": 250.0,
            "stableWindowSeconds": 120,
            "panicWindowSeconds": 10,
            "scaleDownDelaySeconds": 0,
            "maxScaleUpRate": 4.0,
        },
        "rollout": {"onNewCheckpoint": "manual"},
        "suspend": True,
    }
    spec = InferenceServiceSpec.model_validate(wire)
    assert spec.to_dict() == wire
    assert InferenceServiceSpec(**spec.model_dump(by_alias=False)) == spec


INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("no model", {"model": {}}, "spec.model.uri"),
    (
        "two models",
        {"model": {"uri": "pvc://m/x", "trainingJobRef": {"name": "gpt"}}},
        "spec.model.trainingJobRef",
    ),
    ("min above max", spec_with(replicas={"min": 3, "max": 2}), "spec.replicas.min"),
    ("min above default max", spec_with(replicas={"min": 2}), "spec.replicas.max"),
    ("negative min", spec_with(replicas={"min": -1, "max": 2}), "min"),
    (
        "panic window above stable",
        spec_with(autoscaling={"stableWindowSeconds": 10, "panicWindowSeconds": 20}),
        "spec.autoscaling.panicWindowSeconds",
    ),
    (
        "queue smaller than batch",
        spec_with(batching={"maxBatchSize": 64, "maxQueueSize": 8}),
        "spec.batching.maxQueueSize",
    ),
    ("gpuProduct without gpu", spec_with(gpuProduct="NVIDIA-H100-80GB-HBM3"), "spec.gpuProduct"),
    ("bad runtime", spec_with(runtime="onnx"), "runtime"),
    ("bad metric", spec_with(autoscaling={"metric": "cpu"}), "metric"),
    ("zero target", spec_with(autoscaling={"target": 0}), "target"),
    ("bad uri", {"model": {"uri": "http://example.com/model"}}, "uri"),
    ("bad checkpoint", {"model": {"trainingJobRef": {"name": "g", "checkpoint": "newest"}}}, "checkpoint"),
    ("negative checkpoint", {"model": {"trainingJobRef": {"name": "g", "checkpoint": -1}}}, "checkpoint"),
    ("unknown field", spec_with(replica={"min": 1}), "replica"),
    (
        "credentials for a pvc model",
        {"model": {"uri": "pvc://m/x", "credentialsSecret": "s3-creds"}},
        "spec.model.credentialsSecret is used only for s3:// models",
    ),
    ("bad secret name", {"model": {"uri": "s3://b/m", "credentialsSecret": "S3_creds"}}, "credentialsSecret"),
]


@pytest.mark.parametrize(("case", "spec", "field"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_spec_is_rejected_naming_the_field(case: str, spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        InferenceServiceSpec.model_validate(spec)
    assert field in "\n".join(describe_validation_error(info.value, prefix="spec.")), case


@pytest.mark.parametrize(
    ("bounds", "wanted", "expected"),
    [
        ({"min": 1, "max": 4}, None, 1),
        ({"min": 2, "max": 4}, None, 2),
        ({"min": 1, "max": 4, "count": 3}, None, 3),
        ({"min": 1, "max": 4, "count": 9}, None, 4),
        ({"min": 0, "max": 4, "count": 0}, None, 0),
        ({"min": 1, "max": 4}, 7, 4),
    ],
)
def test_replicas_clamp(bounds: dict[str, int], wanted: int | None, expected: int) -> None:
    assert Replicas.model_validate(bounds).clamp(wanted) == expected


def test_status_display_fields() -> None:
    status = InferenceServiceStatus.model_validate(
        {
            "phase": "Ready",
            "url": "http://gpt.default.svc:8080",
            "replicas": {"desired": 4, "ready": 2},
            "selector": "tandem.dev/inferenceservice=gpt",
            "model": {"uri": "pvc://ckpt/step-1500", "trainingJob": "gpt-small", "checkpointStep": 1500},
            "metrics": {
                "rps": 41.5,
                "latencyP50Ms": 20.0,
                "latencyP99Ms": 87.2,
                "queueDepth": 1,
                "concurrency": 3,
            },
            "cost": {"hourlyUSD": 2.49, "usdPerMillionRequests": 16.7, "usdPerMillionTokens": 0.2},
            "lastScaleTime": "2025-01-02T03:04:05Z",
        }
    )
    wire = status.to_dict()
    assert wire["replicasDisplay"] == "2/4"
    assert wire["modelDisplay"] == "gpt-small@1500"
    assert wire["hourlyCostDisplay"] == "$2.49"
    assert wire["cost"]["hourlyUSD"] == 2.49
    assert InferenceServiceStatus.model_validate(wire) == status
    by_uri = InferenceServiceStatus.model_validate({"model": {"uri": "pvc://models/minilm/"}})
    assert by_uri.to_dict()["modelDisplay"] == "pvc://models/minilm/"


def test_scale_paths_point_at_model_fields() -> None:
    assert isvc.SPEC_REPLICAS_PATH == ".spec.replicas.count"
    assert "count" in Replicas.model_fields
    assert isvc.STATUS_REPLICAS_PATH == ".status.replicas.ready"
    assert "selector" in InferenceServiceStatus.model_fields


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("inferenceservice-*.yaml")), ids=lambda p: p.name)
def test_examples_parse(path: Path) -> None:
    svc = InferenceService.model_validate(yaml.safe_load(path.read_text()))
    assert svc.metadata.name


def test_from_trainingjob_example_references_the_tiny_job() -> None:
    svc = InferenceService.model_validate(
        yaml.safe_load((EXAMPLES / "inferenceservice-from-trainingjob.yaml").read_text())
    )
    job = yaml.safe_load((EXAMPLES / "trainingjob-gpt-tiny.yaml").read_text())
    assert svc.spec.model.training_job_ref is not None
    assert svc.spec.model.training_job_ref.name == job["metadata"]["name"]
