"""InferenceService builders against golden YAML (run with TANDEM_UPDATE_GOLDEN=1 to rewrite, then review)."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tandem.api.inferenceservice import InferenceServiceSpec
from tandem.api.serving import ServerOptions
from tandem.operator.gpu import GPU_TOLERATION
from tandem.operator.inferenceservice import builders
from tandem.operator.inferenceservice.builders import ModelTarget, Service
from tandem.workloads.serve import cli

GOLDEN = Path(__file__).parent / "golden"
GPU_SERVICE: dict[str, Any] = {
    "model": {"uri": "pvc://models/minilm-l6"},
    "runtime": "embeddings",
    "precision": "fp16",
    "batching": {"maxBatchSize": 64, "maxQueueDelayMs": 2, "maxQueueSize": 2048, "workers": 2},
    "resources": {"gpu": 1, "cpu": "4", "memory": "16Gi"},
    "gpuProduct": "NVIDIA-H100-80GB-HBM3",
    "nodeSelector": {"pool": "serving"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "serving", "effect": "NoSchedule"}],
    "replicas": {"min": 1, "max": 8, "count": 3},
}


def service(**spec: Any) -> Service:
    return Service(
        "embed", "ml", "uid-1", InferenceServiceSpec.model_validate({**GPU_SERVICE, **spec}), "img:1"
    )


def _children() -> list[dict[str, Any]]:
    svc = service()
    made = [builders.deployment(svc, ModelTarget(uri="pvc://models/minilm-l6"), builders.replicas(svc.spec))]
    made += builders.children(svc, with_service_monitor=True)
    lineage = Service(
        "gpt",
        "ml",
        "uid-2",
        InferenceServiceSpec.model_validate(
            {
                "model": {"trainingJobRef": {"name": "gpt-tiny"}},
                "runtime": "causal-lm",
                "resources": {"cpu": "2"},
            }
        ),
        "img:1",
    )
    target = ModelTarget("file:///checkpoints/ml/gpt-tiny/step-00000200", "gpt-tiny", 200, "ckpt")
    made.append(builders.deployment(lineage, target, 1))
    return made


@pytest.mark.parametrize("index", range(5))
def test_children_match_golden(index: int) -> None:
    child = _children()[index]
    path = GOLDEN / f"inferenceservice-{child['kind'].lower()}-{child['metadata']['name']}.yaml"
    rendered = yaml.safe_dump(child, sort_keys=True)
    if os.environ.get("TANDEM_UPDATE_GOLDEN"):
        path.write_text(rendered)
    assert path.exists(), f"missing {path}: run with TANDEM_UPDATE_GOLDEN=1 and review the file"
    assert rendered == path.read_text(), f"{path.name} changed: review, then TANDEM_UPDATE_GOLDEN=1"


def parse_server_command(command: list[str]) -> ServerOptions:
    """The options as `tandem serve` itself parses them."""
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    return cli.options_from(parser.parse_args(command[1:]))


def test_deployment_runs_the_model_server_with_the_batching_settings() -> None:
    deployment = _children()[0]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[:2] == ["tandem", "serve"]
    options = parse_server_command(command)
    assert (options.model.model_uri, options.model.runtime, options.model.precision) == (
        "file:///models/models/minilm-l6",
        "embeddings",
        "fp16",
    )
    assert (options.model.model_name, options.model.model_cache_dir) == ("embed", None)
    batching = options.batching
    assert (batching.max_batch_size, batching.max_queue_delay_ms, batching.max_queue_size) == (64, 2, 2048)
    assert batching.workers == 2
    assert (options.http.host, options.http.port, options.http.drain_timeout_s) == ("0.0.0.0", 8080, 30)
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > builders.DRAIN_SECONDS


def test_gpu_replicas_ask_for_gpus_tolerate_the_taint_and_pick_the_product() -> None:
    pod = _children()[0]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert GPU_TOLERATION in pod["tolerations"]
    assert {t["key"] for t in pod["tolerations"]} == {"dedicated", "nvidia.com/gpu"}
    assert pod["nodeSelector"] == {"pool": "serving", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    cpu_pod = _children()[4]["spec"]["template"]["spec"]
    assert "tolerations" not in cpu_pod
    assert "nvidia.com/gpu" not in cpu_pod["containers"][0]["resources"]["limits"]


def _model_volumes(pod: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The pod's volumes and the server's mounts, less the writable dirs every replica has."""
    writable = set(builders.WRITABLE_DIRS)
    return (
        [v for v in pod["volumes"] if v["name"] not in writable],
        [m for m in pod["containers"][0]["volumeMounts"] if m["name"] not in writable],
    )


def test_pvc_models_are_mounted_read_only() -> None:
    pod = _children()[0]["spec"]["template"]["spec"]
    volumes, mounts = _model_volumes(pod)
    assert volumes == [{"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}]
    assert mounts == [{"name": "model", "mountPath": "/models/models", "readOnly": True}]
    checkpoint_pod = _children()[4]["spec"]["template"]["spec"]
    (checkpoints,) = _model_volumes(checkpoint_pod)[0]
    assert checkpoints["persistentVolumeClaim"] == {"claimName": "ckpt", "readOnly": True}
    assert "--model-uri" in checkpoint_pod["containers"][0]["command"]
    assert "file:///checkpoints/ml/gpt-tiny/step-00000200" in checkpoint_pod["containers"][0]["command"]


def test_every_child_is_owned_and_selected_by_the_service_label() -> None:
    for child in _children()[:4]:
        owner = child["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
            "InferenceService",
            "embed",
            "uid-1",
            True,
        )
        assert child["metadata"]["labels"]["tandem.dev/inferenceservice"] == "embed"
    deployment, svc, pdb, monitor, _ = _children()
    assert deployment["spec"]["selector"] == {"matchLabels": {"tandem.dev/inferenceservice": "embed"}}
    assert deployment["spec"]["template"]["metadata"]["labels"]["tandem.dev/inferenceservice"] == "embed"
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert monitor["kind"] == "ServiceMonitor"
    assert builders.selector("embed") == "tandem.dev/inferenceservice=embed"


@pytest.mark.parametrize(
    ("replicas", "suspend", "expected"),
    [
        ({"min": 1, "max": 8, "count": 3}, False, 3),
        ({"min": 2, "max": 8, "count": 1}, False, 2),
        ({"min": 1, "max": 4, "count": 9}, False, 4),
        ({"min": 1, "max": 4, "count": 3}, True, 0),
    ],
)
def test_replicas_are_the_count_clamped_or_zero_when_suspended(
    replicas: dict[str, int], suspend: bool, expected: int
) -> None:
    assert builders.replicas(service(replicas=replicas, suspend=suspend).spec) == expected


def test_the_service_monitor_is_built_only_when_asked() -> None:
    assert [c["kind"] for c in builders.children(service(), with_service_monitor=False)] == [
        "Service",
        "PodDisruptionBudget",
    ]


def test_spec_hash_follows_the_manifest() -> None:
    svc = service()
    model = ModelTarget(uri="pvc://models/minilm-l6")
    one = builders.deployment(svc, model, 3)["metadata"]["annotations"][builders.ANNOTATION_SPEC_HASH]
    same = builders.deployment(svc, model, 3)["metadata"]["annotations"][builders.ANNOTATION_SPEC_HASH]
    other = builders.deployment(svc, model, 4)["metadata"]["annotations"][builders.ANNOTATION_SPEC_HASH]
    assert one == same != other


# ---------------------------------------------------------------------------------------------
# s3:// models: each replica downloads the model into an emptyDir before it listens
# ---------------------------------------------------------------------------------------------


def _s3_deployment(**model: Any) -> dict[str, Any]:
    spec = InferenceServiceSpec.model_validate(
        {
            "model": {"uri": "s3://tandem-models/minilm", "credentialsSecret": "s3-reader", **model},
            "runtime": "embeddings",
            "resources": {"cpu": "2", "memory": "4Gi"},
        }
    )
    svc = Service("minilm-s3", "ml", "uid-3", spec, "img:1")
    assert spec.model.uri is not None
    return builders.deployment(svc, ModelTarget(uri=spec.model.uri), 1)


def test_s3_deployment_matches_golden() -> None:
    child = _s3_deployment()
    path = GOLDEN / f"inferenceservice-{child['kind'].lower()}-{child['metadata']['name']}.yaml"
    rendered = yaml.safe_dump(child, sort_keys=True)
    if os.environ.get("TANDEM_UPDATE_GOLDEN"):
        path.write_text(rendered)
    assert path.exists(), f"missing {path}: run with TANDEM_UPDATE_GOLDEN=1 and review the file"
    assert rendered == path.read_text(), f"{path.name} changed: review, then TANDEM_UPDATE_GOLDEN=1"


def test_s3_models_get_a_cache_volume_credentials_and_time_to_download() -> None:
    pod = _s3_deployment()["spec"]["template"]["spec"]
    container = pod["containers"][0]
    flags = dict(zip(container["command"][2::2], container["command"][3::2], strict=True))
    # The server gets the s3:// URI itself and downloads into the emptyDir.
    assert flags["--model-uri"] == "s3://tandem-models/minilm"
    assert flags["--model-cache-dir"] == builders.MODEL_CACHE_MOUNT
    volumes, mounts = _model_volumes(pod)
    assert volumes == [{"name": "model-cache", "emptyDir": {}}]
    assert mounts == [{"name": "model-cache", "mountPath": builders.MODEL_CACHE_MOUNT}]
    # The Secret's keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...) become the environment.
    assert container["envFrom"] == [{"secretRef": {"name": "s3-reader"}}]
    # The port opens only after the download: the startup probe holds liveness and readiness back
    # for MODEL_DOWNLOAD_SECONDS, then liveness takes over as for any model.
    startup = container["startupProbe"]
    assert startup["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] == builders.MODEL_DOWNLOAD_SECONDS >= 600
    assert (
        container["livenessProbe"]
        == _children()[0]["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]
    )


def test_s3_without_a_secret_uses_the_pods_own_credentials() -> None:
    container = _s3_deployment(credentialsSecret=None)["spec"]["template"]["spec"]["containers"][0]
    assert "envFrom" not in container
    assert "startupProbe" in container


def test_other_models_get_no_cache_no_startup_probe_no_credentials() -> None:
    for child in (_children()[0], _children()[4]):
        container = child["spec"]["template"]["spec"]["containers"][0]
        assert "--model-cache-dir" not in container["command"]
        assert not {"startupProbe", "envFrom"} & set(container)
        assert "model-cache" not in [v["name"] for v in child["spec"]["template"]["spec"]["volumes"]]


# ---------------------------------------------------------------------------------------------
# Pod Security "restricted" with a read-only root, writable where the server writes
# ---------------------------------------------------------------------------------------------


def _every_replica_pod() -> list[dict[str, Any]]:
    """The replica pods of a pvc:// model, a checkpoint lineage, a GPU service and an s3:// model."""
    deployments = [c for c in _children() if c["kind"] == "Deployment"] + [_s3_deployment()]
    return [d["spec"]["template"]["spec"] for d in deployments]


def test_every_replica_is_restricted_with_a_read_only_root() -> None:
    for pod in _every_replica_pod():
        assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
        for container in pod["containers"]:
            assert container["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
                "readOnlyRootFilesystem": True,
            }


def test_tmp_home_and_the_model_cache_are_writable_empty_dirs() -> None:
    """The server's run dir and torch's inductor cache in /tmp, ~/.cache (Triton, Hugging Face, the
    default model cache) under HOME, an s3:// download in its cache: each a writable emptyDir."""
    for pod in _every_replica_pod():
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        wanted = ["/tmp", builders.HOME_DIR]
        if "--model-cache-dir" in container["command"]:
            wanted.append(container["command"][container["command"].index("--model-cache-dir") + 1])
        for path in wanted:
            assert path in mounts, f"{path} is not writable under a read-only root"
            assert not mounts[path].get("readOnly", False)
            assert "emptyDir" in volumes[mounts[path]["name"]]
        assert len(volumes) == len(pod["volumes"]), f"duplicate volume names in {pod['volumes']}"


def test_the_writable_home_is_the_workloads_images_home() -> None:
    """The emptyDir must sit where the image points HOME, or ~/.cache writes fail under the read-only root."""
    dockerfile = (Path(__file__).resolve().parents[2] / "images/workloads.Dockerfile").read_text()
    assert re.findall(r"\bHOME=(\S+)", dockerfile) == [builders.HOME_DIR]
