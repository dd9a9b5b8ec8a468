"""Fine-tuning on a real API server: the CRDs with `spec.trainer.builtin.fineTuning` and the served model's
`status.model.base` install, the LoRA examples pass server validation, the CEL rules and schema reject what
the pod would refuse naming the field, and `kubectl get tisvc` shows both models of a served fine-tune."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tandem.devinstall import Kubectl
from tandem.errors import UserError

pytestmark = pytest.mark.usefixtures("crds")

EXAMPLES = Path(__file__).resolve().parents[3] / "manifests" / "examples"


def job(fine_tuning: dict[str, object]) -> dict[str, object]:
    return {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "probe"},
        "spec": {"trainer": {"builtin": {"dataset": {"uri": "pvc://d/t.txt"}, "fineTuning": fine_tuning}}},
    }


def dry_run(kubectl: Kubectl, namespace: str, manifest: dict[str, object]) -> str:
    return kubectl.run("apply", "--dry-run=server", "-n", namespace, "-f", "-", stdin=json.dumps(manifest))


@pytest.mark.parametrize("name", ["trainingjob-gpt-tiny-lora.yaml", "inferenceservice-lora.yaml"])
def test_the_lora_examples_pass_server_validation(kubectl: Kubectl, namespace: str, name: str) -> None:
    manifest = yaml.safe_load((EXAMPLES / name).read_text())
    assert "(server dry run)" in dry_run(kubectl, namespace, manifest)


def test_the_server_keeps_the_lora_defaults(kubectl: Kubectl, namespace: str) -> None:
    manifest = job({"base": {"trainingJobRef": {"name": "base"}}, "lora": {}})
    spec = manifest["spec"]
    assert isinstance(spec, dict)
    spec["suspend"] = True  # no operator here: nothing runs
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(manifest))
    stored = json.loads(kubectl.run("get", "tj", "probe", "-n", namespace, "-o", "json"))
    assert stored["spec"]["trainer"]["builtin"]["fineTuning"] == {
        "base": {"trainingJobRef": {"name": "base", "checkpoint": "latest"}},
        "lora": {"rank": 8, "alpha": 16, "targetModules": ["attn.c_attn", "attn.c_proj"], "dropout": 0},
    }


@pytest.mark.parametrize(
    ("fine_tuning", "field"),
    [
        pytest.param({"base": {}}, "spec.trainer.builtin.fineTuning.base", id="no-base"),
        pytest.param(
            {"base": {"uri": "file:///m/step-00000001", "trainingJobRef": {"name": "b"}}},
            "spec.trainer.builtin.fineTuning.base",
            id="two-bases",
        ),
        pytest.param({"base": {"uri": "http://m/x"}}, "spec.trainer.builtin.fineTuning.base.uri", id="uri"),
        pytest.param(
            {"base": {"uri": "s3://b/k"}, "lora": {"rank": 0}},
            "spec.trainer.builtin.fineTuning.lora.rank",
            id="rank",
        ),
        pytest.param(
            {"base": {"uri": "s3://b/k"}, "lora": {"targetModules": ["lm_head"]}},
            "spec.trainer.builtin.fineTuning.lora.targetModules",
            id="target",
        ),
        pytest.param(
            {"base": {"uri": "s3://b/k"}, "lora": {"targetModules": ["mlp.c_fc", "mlp.c_fc"]}},
            "spec.trainer.builtin.fineTuning.lora.targetModules",
            id="duplicate-target",
        ),
        pytest.param(
            {"base": {"uri": "s3://b/k"}, "lora": {"dropout": 1}},
            "spec.trainer.builtin.fineTuning.lora.dropout",
            id="dropout",
        ),
    ],
)
def test_invalid_fine_tuning_is_rejected_naming_the_field(
    kubectl: Kubectl, namespace: str, fine_tuning: dict[str, object], field: str
) -> None:
    with pytest.raises(UserError) as rejected:
        dry_run(kubectl, namespace, job(fine_tuning))
    assert field in str(rejected.value), rejected.value


def test_a_served_fine_tune_shows_both_models_in_kubectl_get(kubectl: Kubectl, namespace: str) -> None:
    manifest = yaml.safe_load((EXAMPLES / "inferenceservice-lora.yaml").read_text())
    manifest["spec"]["suspend"] = True  # no operator here: the status is written below
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(manifest))
    model = {
        "uri": "file:///checkpoints/ns/gpt-tiny-lora/step-00000300",
        "trainingJob": "gpt-tiny-lora",
        "checkpointStep": 300,
        "base": {"method": "lora", "trainingJob": "gpt-tiny", "checkpoint": "latest"},
    }
    status = {"status": {"model": model, "modelDisplay": "gpt-tiny-lora@300<-gpt-tiny@latest"}}
    kubectl.run(
        "patch",
        "tisvc",
        "gpt-tiny-lora",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )
    stored = json.loads(kubectl.run("get", "tisvc", "gpt-tiny-lora", "-n", namespace, "-o", "json"))
    assert stored["status"]["model"]["base"] == model["base"]  # the schema keeps the lineage
    assert "gpt-tiny-lora@300<-gpt-tiny@latest" in kubectl.run(
        "get", "tisvc", "gpt-tiny-lora", "-n", namespace
    )
