"""The training fields of issue 18 on a real API server: the CEL rules of data, evaluation and schedule
reject what the pod would refuse, naming the field; evalLoss shows only in `kubectl get tj -o wide`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tandem.devinstall import Kubectl
from tandem.errors import UserError

pytestmark = pytest.mark.usefixtures("crds")

EXAMPLES = sorted((Path(__file__).resolve().parents[3] / "manifests" / "examples").glob("trainingjob-*.yaml"))


def job(**builtin: object) -> dict[str, object]:
    return {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "probe"},
        "spec": {"trainer": {"builtin": {"size": "tiny", **builtin}}, "workers": {"replicas": 1}},
    }


def dry_run(kubectl: Kubectl, namespace: str, manifest: dict[str, object]) -> str:
    return kubectl.run("apply", "--dry-run=server", "-n", namespace, "-f", "-", stdin=json.dumps(manifest))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_the_training_examples_pass_server_validation(
    kubectl: Kubectl, namespace: str, example: Path
) -> None:
    """Every TrainingJob example passes the real API server's validation, and the built-in trainer's evaluate
    on held-out data: gpt-124m reads GPT-2 tokens (vocabSize, val.bin, keepBest), gpt-tiny and its LoRA
    fine-tune hold out text. (The regression example is user code on the session API: no builtin.)"""
    manifest = yaml.safe_load(example.read_text())
    builtin = manifest["spec"]["trainer"].get("builtin")
    assert builtin is None or builtin["evaluation"], example.name
    assert (builtin is None) == ("entrypoint" in manifest["spec"]["trainer"]), example.name
    assert "(server dry run)" in dry_run(kubectl, namespace, manifest)


@pytest.mark.parametrize(
    ("builtin", "field"),
    [
        pytest.param(
            {"dataset": {"uri": "pvc://d/train.bin"}},
            "spec.trainer.builtin.dataset.vocabSize",
            id="bin-vocab",
        ),
        pytest.param(
            {"dataset": {"uri": "pvc://d/tokens", "format": "tokens"}},
            "spec.trainer.builtin.dataset.vocabSize",
            id="tokens-vocab",
        ),
        pytest.param(
            {"dataset": {"uri": "pvc://d/t.bin", "vocabSize": 50257, "tokenDtype": "int16"}},
            "spec.trainer.builtin.dataset.tokenDtype",
            id="dtype",
        ),
        pytest.param(
            {"dataset": {"uri": "pvc://d/t.txt", "validation": {"uri": "pvc://d/v", "fraction": 0.1}}},
            "spec.trainer.builtin.dataset.validation",
            id="validation-both",
        ),
        pytest.param(
            {"dataset": {"uri": "pvc://d/t.txt"}, "evaluation": {"intervalSteps": 10}},
            "spec.trainer.builtin.dataset.validation",
            id="evaluation-without-data",
        ),
        pytest.param(
            {
                "dataset": {"uri": "pvc://d/t.txt"},
                "learningRate": 0.001,
                "optimizer": {"minLearningRate": 0.01},
            },
            "spec.trainer.builtin.optimizer.minLearningRate",
            id="min-lr-above-peak",
        ),
        pytest.param(
            {"dataset": {"uri": "pvc://d/t.txt"}, "optimizer": {"decay": "step"}},
            "spec.trainer.builtin.optimizer.decay",
            id="decay",
        ),
        pytest.param(
            {"dataset": {"uri": "pvc://d/t.txt"}, "sequenceLength": 4},
            "spec.trainer.builtin.sequenceLength",
            id="seq",
        ),
    ],
)
def test_invalid_training_fields_are_rejected_naming_the_field(
    kubectl: Kubectl, namespace: str, builtin: dict[str, object], field: str
) -> None:
    with pytest.raises(UserError) as rejected:
        dry_run(kubectl, namespace, job(**builtin))
    assert field in str(rejected.value), rejected.value


def test_keep_best_needs_checkpoints_on_the_server_too(kubectl: Kubectl, namespace: str) -> None:
    manifest = job(
        dataset={"uri": "pvc://d/t.txt", "validation": {"fraction": 0.1}}, evaluation={"keepBest": True}
    )
    with pytest.raises(UserError, match=r"spec\.trainer\.builtin\.evaluation\.keepBest"):
        dry_run(kubectl, namespace, manifest)
    spec = manifest["spec"]
    assert isinstance(spec, dict)
    spec["checkpoint"] = {"storage": {"pvc": "c"}}
    assert "(server dry run)" in dry_run(kubectl, namespace, manifest)


def test_eval_loss_is_a_wide_column(kubectl: Kubectl, namespace: str) -> None:
    manifest = job(dataset={"uri": "pvc://d/t.txt", "validation": {"fraction": 0.1}}, evaluation={})
    spec = manifest["spec"]
    assert isinstance(spec, dict)
    spec["suspend"] = True  # no operator here: nothing runs, the status is written below
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(manifest))
    status = {"status": {"progress": {"step": 100, "totalSteps": 2000, "loss": 2.5, "evalLoss": 2.7182}}}
    kubectl.run(
        "patch",
        "tj",
        "probe",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )
    narrow = kubectl.run("get", "tj", "probe", "-n", namespace).splitlines()
    wide = kubectl.run("get", "tj", "probe", "-n", namespace, "-o", "wide").splitlines()
    assert "EVAL LOSS" not in narrow[0]
    columns = wide[0].split()
    assert "EVAL" in columns
    assert "2.7182" in wide[1].split()
