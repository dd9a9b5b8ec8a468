"""TrainingJob builders against golden YAML (run with TANDEM_UPDATE_GOLDEN=1 to rewrite, then review)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from tandem.api.trainingjob import TrainingJobSpec
from tandem.api.trainingrun import TrainingRun
from tandem.operator.trainingjob import builders

GOLDEN = Path(__file__).parent / "golden"
GPU_JOB: dict[str, Any] = {
    "trainer": {"builtin": {"size": "124m", "dataset": {"uri": "pvc://datasets/owt"}, "maxSteps": 5000}},
    "workers": {
        "replicas": 2,
        "resources": {"gpu": 8, "cpu": "32", "memory": "256Gi"},
        "gpuProduct": "NVIDIA-H100-80GB-HBM3",
        "tolerations": [
            {"key": "dedicated", "operator": "Equal", "value": "training", "effect": "NoSchedule"}
        ],
    },
    "head": {"resources": {"cpu": "4", "memory": "16Gi"}},
    "batch": {"global": 512, "perDevice": 16},
    "checkpoint": {"storage": {"pvc": "ckpt"}, "everySteps": 500},
    "scheduling": {"queueName": "research", "schedulerName": "volcano", "priorityClassName": "training-high"},
}


def pod_environment(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"] if "value" in e}


def _gang() -> list[dict[str, Any]]:
    spec = TrainingJobSpec.model_validate(GPU_JOB)
    children = [
        builders.head_service("gpt", "uid-1", "ml"),
        builders.head_endpoints("gpt", "uid-1", "ml", "gpt-3-head", "10.1.2.3"),
    ]
    children += builders.gang(
        spec, job="gpt", uid="uid-1", namespace="ml", attempt=3, image="img:1", resume_from="file:///c/step-1"
    )
    return children


@pytest.mark.parametrize("index", range(5))
def test_children_match_golden(index: int) -> None:
    child = _gang()[index]
    path = GOLDEN / f"trainingjob-{child['kind'].lower()}-{child['metadata']['name']}.yaml"
    rendered = yaml.safe_dump(child, sort_keys=True)
    if os.environ.get("TANDEM_UPDATE_GOLDEN"):
        path.write_text(rendered)
    assert path.exists(), f"missing {path}: run with TANDEM_UPDATE_GOLDEN=1 and review the file"
    assert rendered == path.read_text(), f"{path.name} changed: review, then TANDEM_UPDATE_GOLDEN=1"


def test_gang_is_one_head_and_every_worker_with_the_gang_annotations() -> None:
    service, endpoints, head, *workers = _gang()
    assert service["kind"] == "Service"
    assert endpoints["kind"] == "EndpointSlice"
    assert head["metadata"]["name"] == "gpt-3-head"
    assert [w["metadata"]["name"] for w in workers] == ["gpt-3-worker-0", "gpt-3-worker-1"]
    for pod in (head, *workers):
        assert pod["metadata"]["annotations"]["tandem.dev/gang-size"] == "3"
        assert pod["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == "gpt-3"
        assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "research"
        assert pod["spec"]["schedulerName"] == "volcano"
        assert pod["metadata"]["ownerReferences"][0]["controller"] is True


def test_worker_asks_for_its_gpus_and_tolerates_gpu_and_user_taints() -> None:
    worker = _gang()[3]
    container = worker["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": "8"}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    keys = {t["key"] for t in worker["spec"]["tolerations"]}
    assert keys == {"dedicated", "nvidia.com/gpu"}
    assert worker["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


def test_every_pod_of_the_gang_gets_one_run_document() -> None:
    _, _, head, worker, _ = _gang()
    runs = [TrainingRun.from_env(pod_environment(pod)) for pod in (head, worker)]
    assert runs[0] == runs[1]
    run = runs[0]
    assert run.resume_from == "file:///c/step-1"
    assert run.checkpoint_uri == "file:///checkpoints/ml/gpt"
    assert run.head_address == "gpt-head.ml.svc:6379"
    assert run.spec.workers.replicas == 2


def test_spec_hash_ignores_lifecycle_fields_but_not_shape() -> None:
    spec = TrainingJobSpec.model_validate(GPU_JOB)
    same = TrainingJobSpec.model_validate({**GPU_JOB, "suspend": True, "activeDeadlineSeconds": 60})
    reshaped = TrainingJobSpec.model_validate({**GPU_JOB, "precision": "fp16"})
    assert builders.pod_spec_hash(spec) == builders.pod_spec_hash(same)
    assert builders.pod_spec_hash(spec) != builders.pod_spec_hash(reshaped)


def test_each_job_has_an_account_that_may_only_patch_its_current_head_pod() -> None:
    account, role, binding = builders.trainer_identity("gpt", "uid-1", "ml", attempt=3)
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "resourceNames": ["gpt-3-head"], "verbs": ["patch"]}
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"] == "gpt-trainer"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "gpt-trainer", "namespace": "ml"}]
    for doc in (account, role, binding):  # the job's own: collected with it
        assert doc["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    next_attempt = builders.trainer_identity("gpt", "uid-1", "ml", attempt=4)[1]
    assert next_attempt["rules"][0]["resourceNames"] == ["gpt-4-head"]


def test_training_containers_leave_their_last_log_lines_when_they_fail() -> None:
    """Kubernetes copies a failed container's log tail into its termination message only when asked:
    the operator's failure record then says what the head or a worker died of."""
    policies = {pod["spec"]["containers"][0]["terminationMessagePolicy"] for pod in _gang()[2:]}
    assert policies == {"FallbackToLogsOnError"}


def test_only_the_head_mounts_an_api_token() -> None:
    pods = _gang()[2:]
    assert {pod["spec"]["serviceAccountName"] for pod in pods} == {"gpt-trainer"}
    mounts = {
        pod["metadata"]["labels"]["tandem.dev/role"]: pod["spec"]["automountServiceAccountToken"]
        for pod in pods
    }
    assert mounts == {"head": True, "worker": False}


def test_pod_spec_hash_ignores_defaults_written_out_and_sees_real_changes() -> None:
    """An upgrade that adds a defaulted field, or a default written out, must not replace running gangs."""
    spec = TrainingJobSpec.model_validate(GPU_JOB)
    explicit = TrainingJobSpec.model_validate(spec.to_dict())  # every default written out
    assert builders.pod_spec_hash(explicit) == builders.pod_spec_hash(spec)
    changed = spec.to_dict()
    changed["workers"]["replicas"] = 2 * spec.workers.replicas
    assert builders.pod_spec_hash(TrainingJobSpec.model_validate(changed)) != builders.pod_spec_hash(spec)
