"""TrainingJob models: defaults, wire form, cross-field rules, status display fields, examples."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from tandem.api import trainingjob as tj
from tandem.api.common import API_VERSION, describe_validation_error
from tandem.api.trainingjob import (
    TrainingJob,
    TrainingJobPhase,
    TrainingJobSpec,
    TrainingJobStatus,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"

MINIMAL: dict[str, Any] = {"trainer": {"builtin": {"dataset": {"uri": "pvc://data/train.txt"}}}}


def spec_with(**changes: Any) -> dict[str, Any]:
    """MINIMAL with top-level spec keys replaced."""
    spec = copy.deepcopy(MINIMAL)
    spec.update(changes)
    return spec


def test_names() -> None:
    assert tj.KIND == "TrainingJob"
    assert tj.PLURAL == "trainingjobs"
    assert issubclass(TrainingJobPhase, str)
    assert [p.value for p in TrainingJobPhase] == [
        "Pending",
        "Scheduling",
        "Running",
        "Recovering",
        "Suspended",
        "Succeeded",
        "Failed",
    ]
    assert TrainingJobPhase.FAILED.finished
    assert not TrainingJobPhase.RUNNING.finished


def test_defaults() -> None:
    spec = TrainingJobSpec.model_validate(MINIMAL)
    assert spec.to_dict() == {
        "trainer": {
            "builtin": {
                "model": "gpt",
                "size": "tiny",
                "dataset": {
                    "uri": "pvc://data/train.txt",
                    "format": "auto",
                    "tokenDtype": "uint16",
                    "textField": "text",
                },
                "maxSteps": 2000,
                "learningRate": 0.0003,
                "optimizer": {
                    "decay": "cosine",
                    "beta1": 0.9,
                    "beta2": 0.95,
                    "weightDecay": 0.1,
                    "maxGradNorm": 1.0,
                },
                "compile": False,
            },
            "strategy": "ddp",
            "deterministic": False,
        },
        "workers": {"replicas": 1, "resources": {"gpu": 0}},
        "head": {"resources": {"gpu": 0}},
        "precision": "bf16",
        "seed": 0,
        "batch": {"perDevice": 8},
        "failurePolicy": {"maxRestarts": 5, "backoffSeconds": 10},
        "scheduling": {"gangTimeoutSeconds": 300},
        "suspend": False,
    }
    assert spec.checkpoint is None
    assert spec.global_batch == 8
    assert spec.accumulation_steps == 1


def test_camel_case_round_trip() -> None:
    wire = {
        "image": "ghcr.io/example/train:1",
        "trainer": {
            "entrypoint": "my_pkg.train:train_loop",
            "config": {"lr": 0.1, "nested": {"a": [1, 2]}},
            "strategy": "ddp",
            "deterministic": False,
        },
        "workers": {
            "replicas": 4,
            "resources": {"gpu": 1, "cpu": "8", "memory": "32Gi"},
            "gpuProduct": "NVIDIA-H100-80GB-HBM3",
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
        "head": {"resources": {"gpu": 0, "cpu": 2, "memory": "4Gi"}},
        "precision": "fp16",
        "seed": 1337,
        "batch": {"global": 512, "perDevice": 8},
        "checkpoint": {
            "storage": {"uri": "file:///shared/ckpt"},
            "everySteps": 100,
            "everyMinutes": 15,
            "keep": 2,
        },
        "failurePolicy": {"maxRestarts": 1, "backoffSeconds": 0},
        "scheduling": {
            "gangTimeoutSeconds": 60,
            "priorityClassName": "high",
            "queueName": "team-a",
            "schedulerName": "default-scheduler",
        },
        "suspend": True,
        "activeDeadlineSeconds": 3600,
        "ttlSecondsAfterFinished": 0,
    }
    spec = TrainingJobSpec.model_validate(wire)
    assert spec.to_dict() == wire
    assert spec.batch.global_ == 512
    assert spec.accumulation_steps == 16
    assert spec.workers.gpu_product == "NVIDIA-H100-80GB-HBM3"
    # Python names are accepted too.
    again = TrainingJobSpec(**spec.model_dump(by_alias=False))
    assert again == spec


def test_every_training_setting_round_trips() -> None:
    """Data, schedule, compile and evaluation: what a user writes is what the pod reads."""
    builtin = {
        "model": "gpt",
        "size": "124m",
        "dataset": {
            "uri": "pvc://datasets/owt/train.bin",
            "format": "tokens",
            "tokenDtype": "uint32",
            "vocabSize": 100277,
            "tokenizer": "pvc://datasets/owt/tokenizer.json",
            "textField": "body",
            "validation": {"uri": "pvc://datasets/owt/val.bin"},
        },
        "maxSteps": 5000,
        "learningRate": 0.0006,
        "sequenceLength": 512,
        "optimizer": {
            "warmupSteps": 0,
            "decay": "linear",
            "minLearningRate": 0.00006,
            "beta1": 0.8,
            "beta2": 0.99,
            "weightDecay": 0.0,
            "maxGradNorm": 0.0,
        },
        "compile": True,
        "evaluation": {
            "intervalSteps": 250,
            "batches": 5,
            "keepBest": True,
            "earlyStopping": {"patience": 3, "minDelta": 0.01},
        },
    }
    wire = spec_with(trainer={"builtin": builtin}, checkpoint={"storage": {"pvc": "c"}})
    spec = TrainingJobSpec.model_validate(wire)
    assert spec.to_dict()["trainer"]["builtin"] == builtin
    assert spec.trainer.builtin is not None
    assert spec.trainer.builtin.dataset.token_files


def test_unknown_field_is_rejected() -> None:
    with pytest.raises(ValidationError, match="maxStep"):
        TrainingJobSpec.model_validate(
            {"trainer": {"builtin": {"dataset": {"uri": "pvc://d/x"}, "maxStep": 10}}}
        )


INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("no trainer", spec_with(trainer={}), "spec.trainer.builtin"),
    (
        "both trainers",
        spec_with(trainer={"builtin": MINIMAL["trainer"]["builtin"], "entrypoint": "a.b:c"}),
        "spec.trainer.entrypoint",
    ),
    (
        "config without entrypoint",
        spec_with(trainer={"builtin": MINIMAL["trainer"]["builtin"], "config": {"x": 1}}),
        "spec.trainer.config",
    ),
    (
        "global not a multiple",
        spec_with(batch={"global": 100, "perDevice": 8}, workers={"replicas": 2}),
        "spec.batch.global",
    ),
    (
        "global smaller than one pass",
        spec_with(batch={"global": 8, "perDevice": 8}, workers={"replicas": 2}),
        "spec.batch.global",
    ),
    ("no checkpoint storage", spec_with(checkpoint={"storage": {}}), "spec.checkpoint.storage.pvc"),
    (
        "two checkpoint storages",
        spec_with(checkpoint={"storage": {"pvc": "ckpt", "uri": "s3://b/k"}}),
        "spec.checkpoint.storage.uri",
    ),
    (
        "gpuProduct without gpu",
        spec_with(workers={"gpuProduct": "NVIDIA-H100-80GB-HBM3"}),
        "spec.workers.gpuProduct",
    ),
    ("bad size", spec_with(trainer={"builtin": {"size": "huge", "dataset": {"uri": "pvc://d/x"}}}), "size"),
    ("bad precision", spec_with(precision="fp8"), "precision"),
    ("zero replicas", spec_with(workers={"replicas": 0}), "replicas"),
    ("bad entrypoint", spec_with(trainer={"entrypoint": "not a function"}), "entrypoint"),
    ("dataset without scheme", spec_with(trainer={"builtin": {"dataset": {"uri": "/data/x"}}}), "uri"),
    ("float cpu", spec_with(workers={"resources": {"cpu": 0.5}}), "quantity"),
    ("bad pvc name", spec_with(checkpoint={"storage": {"pvc": "Ckpt_1"}}), "pvc"),
    (
        "s3 checkpoints",
        spec_with(checkpoint={"storage": {"uri": "s3://bucket/ckpt"}}),
        "spec.checkpoint.storage.uri: checkpoints are written to a shared file system",
    ),
    ("empty image", spec_with(image=""), "spec.image"),
    (
        "a 1 MiB nodeSelector value",
        spec_with(workers={"nodeSelector": {"pool": "x" * 2**20}}),
        "nodeSelector.pool",
    ),
    (
        "a nodeSelector value no label allows",
        spec_with(workers={"nodeSelector": {"pool": "a b"}}),
        "nodeSelector.pool",
    ),
    (
        "a nodeSelector key no label allows",
        spec_with(workers={"nodeSelector": {"a b/c": "x"}}),
        "not a label key",
    ),
    (
        "a 64-character label name",
        spec_with(workers={"nodeSelector": {"k" * 64: "x"}}),
        "spec.workers.nodeSelector",
    ),
    (
        "33 labels",
        spec_with(workers={"nodeSelector": {f"k{i}": "x" for i in range(33)}}),
        "at most 32 labels",
    ),
    (
        "a gpuProduct no label allows",
        spec_with(workers={"gpuProduct": "H100 80GB"}),
        "spec.workers.gpuProduct",
    ),
    (
        "token file without a vocabulary",
        spec_with(trainer={"builtin": {"dataset": {"uri": "pvc://d/train.bin"}}}),
        "spec.trainer.builtin.dataset.vocabSize",
    ),
    (
        "declared token format without a vocabulary",
        spec_with(trainer={"builtin": {"dataset": {"uri": "pvc://d/tokens", "format": "tokens"}}}),
        "spec.trainer.builtin.dataset.vocabSize",
    ),
    (
        "a token dtype that does not exist",
        spec_with(
            trainer={"builtin": {"dataset": {"uri": "pvc://d/t.bin", "vocabSize": 9, "tokenDtype": "int8"}}}
        ),
        "tokenDtype",
    ),
    (
        "validation with both a uri and a fraction",
        spec_with(
            trainer={
                "builtin": {
                    "dataset": {"uri": "pvc://d/t", "validation": {"uri": "pvc://d/v", "fraction": 0.1}}
                }
            }
        ),
        "spec.trainer.builtin.dataset.validation",
    ),
    (
        "evaluation without held-out data",
        spec_with(trainer={"builtin": {"dataset": {"uri": "pvc://d/t"}, "evaluation": {}}}),
        "spec.trainer.builtin.dataset.validation",
    ),
    (
        "keepBest without checkpoints",
        spec_with(
            trainer={
                "builtin": {
                    "dataset": {"uri": "pvc://d/t", "validation": {"fraction": 0.1}},
                    "evaluation": {"keepBest": True},
                }
            }
        ),
        "spec.trainer.builtin.evaluation.keepBest",
    ),
    (
        "minimum learning rate above the peak",
        spec_with(
            trainer={
                "builtin": {
                    "dataset": {"uri": "pvc://d/t"},
                    "learningRate": 0.001,
                    "optimizer": {"minLearningRate": 0.01},
                }
            }
        ),
        "spec.trainer.builtin.optimizer.minLearningRate",
    ),
    (
        "beta of 1",
        spec_with(trainer={"builtin": {"dataset": {"uri": "pvc://d/t"}, "optimizer": {"beta2": 1.0}}}),
        "beta2",
    ),
    ("negative seed", spec_with(seed=-1), "spec.seed"),
    (
        "too short sequences",
        spec_with(trainer={"builtin": {"dataset": {"uri": "pvc://d/t"}, "sequenceLength": 4}}),
        "sequenceLength",
    ),
    (
        "early stopping with no patience",
        spec_with(
            trainer={
                "builtin": {
                    "dataset": {"uri": "pvc://d/t", "validation": {"fraction": 0.1}},
                    "evaluation": {"earlyStopping": {"patience": 0}},
                }
            }
        ),
        "patience",
    ),
    (
        "non-local file checkpoints",
        spec_with(checkpoint={"storage": {"uri": "file://nfs-host/ckpt"}}),
        "use a pvc (spec.checkpoint.storage.pvc) or a file:///PATH",
    ),
]


@pytest.mark.parametrize(("case", "spec", "field"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_spec_is_rejected_naming_the_field(case: str, spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        TrainingJobSpec.model_validate(spec)
    assert field in "\n".join(describe_validation_error(info.value, prefix="spec.")), case


def test_batch_rule_uses_replicas() -> None:
    spec = TrainingJobSpec.model_validate(
        spec_with(batch={"global": 96, "perDevice": 8}, workers={"replicas": 3})
    )
    assert spec.accumulation_steps == 4


def test_status_display_fields() -> None:
    status = TrainingJobStatus.model_validate(
        {
            "phase": "Running",
            "workers": {"desired": 4, "ready": 2},
            "progress": {"step": 120, "totalSteps": 2000, "loss": 3.25},
            "lastCheckpoint": {"step": 100, "uri": "pvc://ckpt/step-100", "time": "2025-01-02T03:04:05Z"},
            "restarts": 1,
            "cost": {"gpuHours": 0.5, "usd": 1.234},
        }
    )
    wire = status.to_dict()
    assert wire["workersDisplay"] == "2/4"
    assert wire["stepDisplay"] == "120/2000"
    assert wire["costDisplay"] == "$1.23"
    assert wire["lastCheckpoint"]["time"] == "2025-01-02T03:04:05Z"
    assert status.phase is TrainingJobPhase.RUNNING
    # Reading back a written status (display fields included, unknown fields too) works.
    assert TrainingJobStatus.model_validate({**wire, "futureField": 1}) == status
    empty = TrainingJobStatus().to_dict()
    assert empty == {"conditions": []}


def test_resource_round_trip() -> None:
    obj = {
        "apiVersion": API_VERSION,
        "kind": "TrainingJob",
        "metadata": {"name": "gpt-tiny", "namespace": "default", "generation": 2, "uid": "u-1"},
        "spec": MINIMAL,
        "status": {"phase": "Pending", "observedGeneration": 1},
    }
    job = TrainingJob.model_validate(obj)
    assert job.metadata.name == "gpt-tiny"
    assert job.status.phase is TrainingJobPhase.PENDING
    assert job.to_dict()["apiVersion"] == API_VERSION
    with pytest.raises(ValidationError):
        TrainingJob.model_validate({**obj, "kind": "InferenceService"})


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("trainingjob-*.yaml")), ids=lambda p: p.name)
def test_examples_parse(path: Path) -> None:
    job = TrainingJob.model_validate(yaml.safe_load(path.read_text()))
    assert job.metadata.name
    assert job.spec.checkpoint is not None


def test_gpu_example_asks_for_h100_workers() -> None:
    job = TrainingJob.model_validate(
        yaml.safe_load((EXAMPLES / "trainingjob-gpt-124m-h100.yaml").read_text())
    )
    assert job.spec.workers.resources.gpu == 1
    assert "H100" in (job.spec.workers.gpu_product or "")
    assert job.spec.accumulation_steps == 8
