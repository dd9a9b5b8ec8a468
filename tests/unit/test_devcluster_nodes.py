"""Simulated node manifests and the kwok stages that drive them (no cluster needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tandem.devcluster import components, nodes, paths


def _stages() -> dict[str, dict[str, Any]]:
    found = {}
    for name in components.KWOK_STAGE_FILES:
        for doc in yaml.safe_load_all((paths.KWOK_CONFIG_DIR / name).read_text()):
            if doc:
                found[doc["metadata"]["name"]] = doc
    return found


def test_default_nodes_are_two_gpu_nodes_and_one_cpu_node() -> None:
    names = [n.name for n in nodes.default_nodes()]
    assert names == ["gpu-node-0", "gpu-node-1", "cpu-node-0"]
    assert [n.name for n in nodes.default_nodes(gpu_nodes=3, cpu_nodes=0)] == [
        "gpu-node-0",
        "gpu-node-1",
        "gpu-node-2",
    ]


def test_gpu_node_advertises_eight_h100s_and_is_tainted() -> None:
    manifest = nodes.node_manifest(nodes.gpu_node(0))
    status, labels = manifest["status"], manifest["metadata"]["labels"]
    assert status["capacity"]["nvidia.com/gpu"] == "8"
    assert status["allocatable"]["nvidia.com/gpu"] == "8"
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert labels["nvidia.com/gpu.count"] == "8"
    assert labels["nvidia.com/gpu.present"] == "true"
    assert manifest["spec"]["taints"] == [
        {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    ]
    assert manifest["metadata"]["annotations"][nodes.KWOK_NODE_ANNOTATION] == nodes.KWOK_NODE_ANNOTATION_VALUE


def test_cpu_node_has_no_gpus_labels_or_taints() -> None:
    manifest = nodes.node_manifest(nodes.cpu_node(0))
    assert "nvidia.com/gpu" not in manifest["status"]["capacity"]
    assert not any(key.startswith("nvidia.com/") for key in manifest["metadata"]["labels"])
    assert manifest["spec"]["taints"] == []
    assert manifest["metadata"]["labels"]["kubernetes.io/hostname"] == "cpu-node-0"


def test_manifests_do_not_share_mutable_state() -> None:
    first = nodes.node_manifest(nodes.gpu_node(0))
    first["spec"]["taints"][0]["value"] = "changed"
    first["status"]["capacity"]["cpu"] = "1"
    second = nodes.node_manifest(nodes.gpu_node(0))
    assert second["spec"]["taints"][0]["value"] == "present"
    assert second["status"]["allocatable"]["cpu"] == "192"


def test_gpu_toleration_matches_the_taint() -> None:
    taint, toleration = nodes.GPU_TAINT, nodes.GPU_TOLERATION
    assert (toleration["key"], toleration["value"], toleration["effect"]) == (
        taint["key"],
        taint["value"],
        taint["effect"],
    )


def test_kwok_keeps_its_default_stages() -> None:
    assert {"node-initialize", "node-heartbeat-with-lease", "pod-ready", "pod-complete", "pod-delete"} <= set(
        _stages()
    )


def test_crash_stage_uses_the_documented_annotations() -> None:
    crash = _stages()["tandem-pod-crash"]
    keys = [e["key"] for e in crash["spec"]["selector"]["matchExpressions"]]
    assert f'.metadata.annotations["{nodes.CRASH_POD_ANNOTATION}"]' in keys
    template = crash["spec"]["next"]["statusTemplate"]
    assert nodes.CRASH_EXIT_CODE_ANNOTATION in template
    assert nodes.CRASH_REASON_ANNOTATION in template
    assert "phase: Failed" in template
    # It must outweigh pod-complete (weight 0) so crashing Job pods fail instead of succeeding.
    assert crash["spec"]["weight"] > 0


def test_crash_annotation_is_documented() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "devcluster.md").read_text()
    assert nodes.CRASH_POD_ANNOTATION in docs
    assert nodes.CRASH_EXIT_CODE_ANNOTATION in docs
