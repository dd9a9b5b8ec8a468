"""`spec.trainer.builtin.fineTuning`: defaults, and each mistake named by its field (pydantic and CEL)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from tandem.api.common import describe_validation_error
from tandem.api.trainingjob import TrainingJobSpec


def spec(fine_tuning: dict[str, Any]) -> dict[str, Any]:
    return {"trainer": {"builtin": {"dataset": {"uri": "tandem://corpus"}, "fineTuning": fine_tuning}}}


def errors(fine_tuning: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as exc:
        TrainingJobSpec.model_validate(spec(fine_tuning))
    return "\n".join(describe_validation_error(exc.value, "spec."))


def test_lora_defaults_in_wire_form() -> None:
    parsed = TrainingJobSpec.model_validate(spec({"base": {"trainingJobRef": {"name": "base"}}, "lora": {}}))
    assert parsed.to_dict()["trainer"]["builtin"]["fineTuning"] == {
        "base": {"trainingJobRef": {"name": "base", "checkpoint": "latest"}},
        "lora": {"rank": 8, "alpha": 16.0, "targetModules": ["attn.c_attn", "attn.c_proj"], "dropout": 0.0},
    }
    assert parsed.trainer.builtin is not None
    assert parsed.trainer.builtin.fine_tuning is not None
    lora = parsed.trainer.builtin.fine_tuning.lora
    assert lora is not None
    assert lora.scale == 2.0


def test_without_fine_tuning_the_spec_is_unchanged() -> None:
    plain = TrainingJobSpec.model_validate({"trainer": {"builtin": {"dataset": {"uri": "tandem://corpus"}}}})
    assert "fineTuning" not in plain.to_dict()["trainer"]["builtin"]


@pytest.mark.parametrize(
    ("fine_tuning", "named"),
    [
        ({"base": {}}, "spec.trainer.builtin.fineTuning.base: set exactly one of trainingJobRef"),
        (
            {"base": {"uri": "file:///a/step-00000001", "trainingJobRef": {"name": "b"}}},
            "spec.trainer.builtin.fineTuning.base: set exactly one",
        ),
        ({"base": {"uri": "http://example.com/ckpt"}}, "spec.trainer.builtin.fineTuning.base.uri:"),
        ({"base": {"uri": "pvc://claim/ckpt"}}, "spec.trainer.builtin.fineTuning.base.uri:"),
        (
            {"base": {"trainingJobRef": {"name": "b", "checkpoint": "newest"}}},
            "spec.trainer.builtin.fineTuning.base.trainingJobRef.checkpoint:",
        ),
        ({"base": {"trainingJobRef": {"name": "Bad_Name"}}}, "fineTuning.base.trainingJobRef.name:"),
        ({"lora": {}}, "spec.trainer.builtin.fineTuning.base: Field required"),
        ({"base": {"uri": "s3://b/k"}, "lora": {"rank": 0}}, "spec.trainer.builtin.fineTuning.lora.rank:"),
        ({"base": {"uri": "s3://b/k"}, "lora": {"alpha": 0}}, "spec.trainer.builtin.fineTuning.lora.alpha:"),
        (
            {"base": {"uri": "s3://b/k"}, "lora": {"dropout": 1}},
            "spec.trainer.builtin.fineTuning.lora.dropout:",
        ),
        (
            {"base": {"uri": "s3://b/k"}, "lora": {"targetModules": ["attn.c_attn", "lm_head"]}},
            "spec.trainer.builtin.fineTuning.lora.targetModules[1]:",
        ),
        (
            {"base": {"uri": "s3://b/k"}, "lora": {"targetModules": []}},
            "spec.trainer.builtin.fineTuning.lora.targetModules:",
        ),
        (
            {"base": {"uri": "s3://b/k"}, "lora": {"targetModules": ["mlp.c_fc", "mlp.c_fc"]}},
            "spec.trainer.builtin.fineTuning.lora.targetModules: each module at most once",
        ),
        ({"base": {"uri": "s3://b/k"}, "lora": {"ranks": 4}}, "spec.trainer.builtin.fineTuning.lora.ranks:"),
    ],
)
def test_each_mistake_names_its_field(fine_tuning: dict[str, Any], named: str) -> None:
    assert named in errors(fine_tuning)


def test_the_crd_carries_the_rules_so_the_api_server_refuses_the_same_specs() -> None:
    schema = crd_schema()  # the committed CRD (test_crdgen keeps it equal to the models)
    tuning = schema["properties"]["spec"]["properties"]["trainer"]["properties"]["builtin"]["properties"][
        "fineTuning"
    ]
    base, lora = tuning["properties"]["base"], tuning["properties"]["lora"]
    assert base["x-kubernetes-validations"][0]["rule"] == "has(self.trainingJobRef) != has(self.uri)"
    assert lora["properties"]["targetModules"]["items"]["enum"] == [
        "attn.c_attn",
        "attn.c_proj",
        "mlp.c_fc",
        "mlp.c_proj",
    ]
    assert any(r.get("fieldPath") == ".targetModules" for r in lora["x-kubernetes-validations"])
    assert tuning["required"] == ["base"]


def crd_schema() -> dict[str, Any]:
    path = Path(__file__).resolve().parents[2] / "manifests" / "crds" / "trainingjobs.tandem.dev.yaml"
    crd = yaml.safe_load(path.read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema
