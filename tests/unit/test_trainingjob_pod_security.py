"""Training pods under Pod Security `restricted` with a read-only root file system, and still writable
where the workload writes: Ray's session files and Python's temp files (/tmp), caches under $HOME."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tandem.api.trainingjob import TrainingJobSpec
from tandem.operator.trainingjob import builders

MINIMAL: dict[str, Any] = {"trainer": {"entrypoint": "train:main"}, "workers": {"replicas": 1}}
WITH_STORAGE: dict[str, Any] = {
    "trainer": {"builtin": {"size": "tiny", "dataset": {"uri": "pvc://data/corpus.txt"}}},
    "workers": {"replicas": 1},
    "checkpoint": {"storage": {"pvc": "ckpt"}},
}


def _gang(raw: dict[str, Any]) -> list[dict[str, Any]]:
    spec = TrainingJobSpec.model_validate(raw)
    return builders.gang(spec, job="j", uid="u", namespace="ns", attempt=1, image="img", resume_from=None)


@pytest.mark.parametrize("raw", [MINIMAL, WITH_STORAGE], ids=["minimal", "pvc-checkpoint-and-data"])
def test_every_training_container_is_restricted_with_a_read_only_root(raw: dict[str, Any]) -> None:
    for pod in _gang(raw):
        spec = pod["spec"]
        assert spec["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
        for container in spec["containers"]:
            assert container["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
                "readOnlyRootFilesystem": True,
            }


@pytest.mark.parametrize("raw", [MINIMAL, WITH_STORAGE], ids=["minimal", "pvc-checkpoint-and-data"])
def test_tmp_and_home_are_writable_empty_dirs(raw: dict[str, Any]) -> None:
    """Ray writes /tmp/ray, Python's tempfile /tmp, torch/Triton cache under $HOME: each a volume."""
    for pod in _gang(raw):
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        (container,) = pod["spec"]["containers"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        for path in ("/tmp", builders.HOME_DIR):
            assert path in mounts, f"{pod['metadata']['name']}: {path} is not writable under a read-only root"
            assert not mounts[path].get("readOnly", False)
            assert "emptyDir" in volumes[mounts[path]["name"]]
        names = [v["name"] for v in pod["spec"]["volumes"]]
        assert len(names) == len(set(names)), f"duplicate volume names {names}"


def test_the_writable_home_is_the_workloads_images_home() -> None:
    """The emptyDir must sit where the image points HOME, or ~/.cache writes fail under the read-only root."""
    dockerfile = (Path(__file__).resolve().parents[2] / "images/workloads.Dockerfile").read_text()
    assert re.findall(r"\bHOME=(\S+)", dockerfile) == [builders.HOME_DIR]
