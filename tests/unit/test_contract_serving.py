"""The seam between the operator and a model-server pod: the Deployment's command line in, the server's
effective configuration out.

Each case builds the Deployment with the operator's builder, parses its container command with
`tandem serve`'s own parser and builds the process's `ServerConfig` as `tandem serve` does, then checks
it against the InferenceService spec. A field dropped, renamed or re-defaulted on either side fails.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tandem.api.inferenceservice import InferenceService, InferenceServiceSpec
from tandem.api.serving import HTTP_PORT, Batching, HttpSettings, ModelSettings, ServerOptions
from tandem.operator import crdgen
from tandem.operator.inferenceservice import builders
from tandem.workloads.serve import cli

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"


def server_side(command: list[str], model_dir: Path) -> tuple[ServerOptions, Any]:
    """What `tandem serve` makes of `command`: its options and its effective `ServerConfig`."""
    assert command[:2] == ["tandem", "serve"]
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    options = cli.options_from(parser.parse_args(command[1:]))
    # The model exists where the pod mounts it; here a folder stands in for the mount.
    local = options.model_copy(
        update={"model": options.model.model_copy(update={"model_uri": str(model_dir)})}
    )
    return options, cli.build_config(local)


def serve_parser() -> argparse.ArgumentParser:
    """`tandem serve`'s own parser."""
    subparsers = argparse.ArgumentParser().add_subparsers()
    cli.register(subparsers)
    return subparsers.choices["serve"]


def deployment_command(service: InferenceService, model_uri: str) -> list[str]:
    target = builders.ModelTarget(uri=model_uri)
    built = builders.Service(service.metadata.name or "", "ns", "u-1", service.spec, "img")
    deployment = builders.deployment(built, target, 1)
    command: list[str] = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    return command


def assert_agrees(
    spec: InferenceServiceSpec, name: str, model_uri: str, options: ServerOptions, config: Any
) -> None:
    assert options.model.runtime == spec.runtime == config.runtime
    assert options.model.precision == spec.precision == config.model.precision
    assert options.model.model_name == name == config.model.name
    assert options.model.model_uri == builders.server_uri(model_uri)
    assert options.model.model_cache_dir == (
        builders.MODEL_CACHE_MOUNT if model_uri.startswith("s3://") else None
    )
    assert options.batching == spec.batching
    b = config.batching
    assert (b.max_batch_size, b.max_queue_delay_ms, b.max_queue_size) == (
        spec.batching.max_batch_size,
        spec.batching.max_queue_delay_ms,
        spec.batching.max_queue_size,
    )
    assert b.preferred_batch_sizes == tuple(spec.batching.preferred_batch_sizes or ())
    assert b.max_concurrent_batches == spec.batching.max_concurrent_batches
    assert b.timeout_s == (spec.batching.request_timeout_s or None)
    assert b.max_queue_wait_s == ((spec.batching.max_queue_wait_ms / 1000.0) or None)
    assert config.workers == spec.batching.workers
    assert (config.host, config.port) == ("0.0.0.0", HTTP_PORT)
    assert config.drain_timeout_s == builders.DRAIN_SECONDS
    assert config.limits.max_request_bytes == HttpSettings().max_request_bytes
    assert config.limits.body_timeout_s == HttpSettings().body_timeout_s


def example_services() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "InferenceService":
                found.append((path.name, doc))
    return found


@pytest.mark.parametrize(("name", "raw"), example_services(), ids=[n for n, _ in example_services()])
def test_every_example_reaches_the_server_as_written(name: str, raw: dict[str, Any], tmp_path: Path) -> None:
    service = InferenceService.model_validate(raw)
    uri = service.spec.model.uri or "pvc://ckpt/job/step-00000010"
    options, config = server_side(deployment_command(service, uri), tmp_path)
    assert_agrees(service.spec, service.metadata.name or "", uri, options, config)


@st.composite
def service_specs(draw: st.DrawFn) -> dict[str, Any]:
    max_batch = draw(st.integers(1, 4096))
    batching: dict[str, Any] = {
        "maxBatchSize": max_batch,
        "maxQueueDelayMs": draw(st.one_of(st.integers(0, 60000), st.floats(0, 60000, allow_nan=False))),
        "maxQueueSize": draw(st.integers(max_batch, 1_000_000)),
        "workers": draw(st.integers(1, 16)),
        "maxConcurrentBatches": draw(st.integers(1, 64)),
        "requestTimeoutS": draw(st.one_of(st.just(0), st.floats(0.001, 86400, allow_nan=False))),
        "maxQueueWaitMs": draw(st.one_of(st.just(0), st.floats(0, 3_600_000, allow_nan=False))),
        "preferredBatchSizes": draw(st.lists(st.integers(1, max_batch), max_size=4)),
    }
    return {
        "model": {"uri": draw(st.sampled_from(["pvc://models/m", "file:///opt/m", "s3://bucket/m"]))},
        "runtime": draw(st.sampled_from(["causal-lm", "embeddings", "torchscript", "noop"])),
        "precision": draw(st.sampled_from(["fp32", "bf16", "fp16", "int8"])),
        "batching": {key: batching[key] for key in draw(st.sets(st.sampled_from(sorted(batching))))},
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=service_specs())
def test_any_valid_spec_reaches_the_server_unchanged(raw: dict[str, Any], tmp_path: Path) -> None:
    try:
        service = InferenceService.model_validate({"metadata": {"name": "svc"}, "spec": raw})
    except ValidationError:  # a subset of batching fields can break a rule with the others' defaults
        assume(False)
        raise
    uri = raw["model"]["uri"]
    options, config = server_side(deployment_command(service, uri), tmp_path)
    assert_agrees(service.spec, "svc", uri, options, config)


@pytest.fixture
def changed_default() -> Iterator[int]:
    """`Batching.max_batch_size` re-defaulted in the model, as a developer would change it."""
    field = Batching.model_fields["max_batch_size"]
    original = field.default
    models = (Batching, ServerOptions, InferenceServiceSpec, InferenceService)
    field.default = 7
    for model in models:
        model.model_rebuild(force=True)
    try:
        yield 7
    finally:
        field.default = original
        for model in models:
            model.model_rebuild(force=True)


def test_a_default_changed_in_the_model_changes_crd_cli_and_server_together(
    changed_default: int, tmp_path: Path
) -> None:
    crd = yaml.safe_load(crdgen.render_crds()["inferenceservices.tandem.dev.yaml"])
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert (
        schema["properties"]["spec"]["properties"]["batching"]["properties"]["maxBatchSize"]["default"] == 7
    )
    help_text = serve_parser().format_help()
    assert "most requests in one forward pass (default 7)" in help_text.lower()
    service = InferenceService.model_validate(
        {"metadata": {"name": "s"}, "spec": {"model": {"uri": "file:///m"}}}
    )
    command = deployment_command(service, "file:///m")
    assert "--max-batch-size" not in command  # the server's own default is the same model's
    _, config = server_side(command, tmp_path)
    assert config.batching.max_batch_size == changed_default


def test_options_and_models_name_each_field_once() -> None:
    """Every leaf of the server's options is one `tandem serve` option, with the model's help text."""
    serve = serve_parser()
    flags = {o for action in serve._actions for o in action.option_strings if o.startswith("--")} - {"--help"}
    leaves = {
        "--" + name.replace("_", "-")
        for model in (ModelSettings, Batching, HttpSettings)
        for name in model.model_fields
    }
    assert flags == leaves
