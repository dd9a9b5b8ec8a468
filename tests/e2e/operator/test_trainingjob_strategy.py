"""`spec.trainer.strategy` on a real API server: it defaults to ddp, fsdp passes with the built-in
trainer, and the CEL rules refuse fsdp where the pod could not shard (a user's entrypoint, a LoRA
fine-tune), naming the field."""

from __future__ import annotations

import json

import pytest

from tandem.devinstall import Kubectl
from tandem.errors import UserError

pytestmark = pytest.mark.usefixtures("crds")

BUILTIN = {"dataset": {"uri": "pvc://d/t.txt"}}


def job(trainer: dict[str, object]) -> dict[str, object]:
    return {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "probe"},
        "spec": {"trainer": trainer, "workers": {"replicas": 2}, "suspend": True},
    }


def dry_run(kubectl: Kubectl, namespace: str, manifest: dict[str, object]) -> str:
    return kubectl.run("apply", "--dry-run=server", "-n", namespace, "-f", "-", stdin=json.dumps(manifest))


def test_the_server_defaults_ddp_and_accepts_fsdp_for_the_builtin_trainer(
    kubectl: Kubectl, namespace: str
) -> None:
    kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(job({"builtin": BUILTIN})))
    stored = json.loads(kubectl.run("get", "tj", "probe", "-n", namespace, "-o", "json"))
    assert stored["spec"]["trainer"]["strategy"] == "ddp"
    assert "(server dry run)" in dry_run(kubectl, namespace, job({"builtin": BUILTIN, "strategy": "fsdp"}))


@pytest.mark.parametrize(
    "trainer",
    [
        pytest.param({"entrypoint": "pkg.train:main", "strategy": "fsdp"}, id="entrypoint"),
        pytest.param(
            {
                "builtin": BUILTIN | {"fineTuning": {"base": {"uri": "s3://b/k"}, "lora": {}}},
                "strategy": "fsdp",
            },
            id="lora",
        ),
        pytest.param({"builtin": BUILTIN, "strategy": "zero3"}, id="unknown"),
    ],
)
def test_fsdp_where_the_pod_cannot_shard_is_refused_naming_the_field(
    kubectl: Kubectl, namespace: str, trainer: dict[str, object]
) -> None:
    with pytest.raises(UserError) as rejected:
        dry_run(kubectl, namespace, job(trainer))
    assert "spec.trainer.strategy" in str(rejected.value), rejected.value
