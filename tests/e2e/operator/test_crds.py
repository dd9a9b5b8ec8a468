"""The generated CRDs on a real API server: discovery, and rejection of invalid resources."""

from __future__ import annotations

import pytest

from tandem.devinstall import Kubectl
from tandem.errors import UserError

pytestmark = pytest.mark.usefixtures("crds")

GOOD_JOB = """
apiVersion: tandem.dev/v1alpha1
kind: TrainingJob
metadata: {name: probe}
spec:
  trainer: {builtin: {size: tiny, dataset: {uri: "file:///data/corpus.txt"}}}
  workers: {replicas: 2}
"""
GOOD_SERVICE = """
apiVersion: tandem.dev/v1alpha1
kind: InferenceService
metadata: {name: probe}
spec:
  model: {uri: "file:///models/minilm"}
  runtime: embeddings
  replicas: {min: 1, max: 2}
"""


def test_resources_are_discoverable_by_short_name_and_category(kubectl: Kubectl) -> None:
    listing = kubectl.run("api-resources", "--api-group=tandem.dev", "-o", "wide")
    assert "trainingjobs" in listing
    assert "inferenceservices" in listing
    assert " tj " in listing
    assert " tisvc " in listing
    assert "tandem" in listing  # the category: `kubectl get tandem` lists both kinds


def _server_rejects(kubectl: Kubectl, namespace: str, manifest: str) -> str:
    with pytest.raises(UserError) as rejected:
        kubectl.run("apply", "--dry-run=server", "-n", namespace, "-f", "-", stdin=manifest)
    return str(rejected.value)


def test_valid_resources_pass_server_validation(kubectl: Kubectl, namespace: str) -> None:
    for manifest in (GOOD_JOB, GOOD_SERVICE):
        out = kubectl.run("apply", "--dry-run=server", "-n", namespace, "-f", "-", stdin=manifest)
        assert "(server dry run)" in out


@pytest.mark.parametrize(
    ("manifest", "field"),
    [
        pytest.param(GOOD_JOB.replace("replicas: 2", "replicas: -1"), "spec.workers.replicas", id="negative"),
        pytest.param(
            GOOD_SERVICE.replace("{min: 1, max: 2}", "{min: 5, max: 2}"), "spec.replicas", id="min-gt-max"
        ),
        pytest.param(GOOD_JOB + "  precision: fp8\n", "spec.precision", id="unknown-precision"),
        pytest.param(
            GOOD_SERVICE.replace("  runtime: embeddings\n", "  runtime: onnx\n"), "spec.runtime", id="enum"
        ),
        pytest.param(
            GOOD_JOB.replace(
                '  trainer: {builtin: {size: tiny, dataset: {uri: "file:///data/corpus.txt"}}}\n', ""
            ),
            "spec.trainer",
            id="missing-trainer",
        ),
        pytest.param(
            GOOD_JOB.replace("replicas: 2", "replicas: four"), "spec.workers.replicas", id="wrong-type"
        ),
        pytest.param(
            GOOD_SERVICE.replace('{uri: "file:///models/minilm"}', "{}"),
            "spec.model",
            id="model-needs-one-source",
        ),
        pytest.param(
            GOOD_JOB.replace("size: tiny", "size: huge"), "spec.trainer.builtin.size", id="unknown-size"
        ),
    ],
)
def test_invalid_resources_are_rejected_naming_the_field(
    kubectl: Kubectl, namespace: str, manifest: str, field: str
) -> None:
    message = _server_rejects(kubectl, namespace, manifest)
    assert field in message, message
