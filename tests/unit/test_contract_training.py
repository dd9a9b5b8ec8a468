"""The seam between the operator and a training pod: builder output in, the pod's effective config out.

Each case builds the gang with the operator's builders, takes a pod's environment as the kubelet would
give it, parses it with the pod-side code (`TrainingRun.from_env`, `from_run`, `worker_resources`) and
checks the effective configuration against what the spec says, computed here from the spec alone.
A field dropped, renamed or re-defaulted on either side fails these tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.api.common import Precision
from tandem.api.trainingjob import TrainingJobSpec
from tandem.api.trainingrun import RUN_ENV, RUN_VERSION, TrainingRun
from tandem.errors import UserError
from tandem.operator.trainingjob import builders
from tandem.workloads.train.config import DEFAULT_SEQ_LEN, TrainConfig, from_run
from tandem.workloads.train.pod import worker_resources

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"


def pod_environment(pod: dict[str, Any]) -> dict[str, str]:
    """The literal variables of the pod's container (downward-API ones are the kubelet's to fill)."""
    return {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"] if "value" in e}


def effective_config(
    spec: TrainingJobSpec, *, attempt: int = 0, resume_from: str | None = None, data_root: Path
) -> tuple[TrainingRun, TrainConfig, tuple[int, int]]:
    """Build the gang, then read the head's and a worker's environment the way the pods do."""
    pods = builders.gang(
        spec, job="job", uid="u-1", namespace="ns", attempt=attempt, image="img", resume_from=resume_from
    )
    head_env, worker_env = pod_environment(pods[0]), pod_environment(pods[1])
    assert head_env == worker_env, "every pod of a gang gets the same run document"
    run = TrainingRun.from_env(head_env)
    # The pod sees pvc:// data sets where their claim is mounted; here a folder stands in for the mount.
    mounted = run.model_copy(update={"data_root": str(data_root)})
    return mounted, from_run(mounted), worker_resources(run)


def write_dataset(spec: TrainingJobSpec, data_root: Path) -> None:
    """Put text where a pvc:// data set's claim would be mounted."""
    builtin = spec.trainer.builtin
    if builtin is not None and builtin.dataset.uri.startswith("pvc://"):
        path = data_root / builtin.dataset.uri.removeprefix("pvc://")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"the quick brown fox jumps over the lazy dog\n" * 200)


def assert_agrees(
    spec: TrainingJobSpec, run: TrainingRun, cfg: TrainConfig, resources: tuple[int, int]
) -> None:
    """The effective configuration, field by field, as the spec defines it."""
    replicas = spec.workers.replicas
    assert cfg.num_workers == replicas
    assert cfg.precision == spec.precision
    assert isinstance(cfg.precision, Precision)
    assert cfg.per_device_batch == spec.batch.per_device
    assert cfg.global_batch == (spec.batch.global_ or spec.batch.per_device * replicas)
    assert cfg.accumulation_steps == cfg.global_batch // (spec.batch.per_device * replicas)
    assert cfg.use_gpu == (spec.workers.resources.gpu > 0)
    assert cfg.gpus_per_worker == spec.workers.resources.gpu
    assert cfg.max_failures == spec.failure_policy.max_restarts
    cpu = spec.workers.resources.cpu_cores()
    assert cfg.cpus_per_worker == (1.0 if cpu is None else max(cpu, 0.001))
    assert resources == ((max(1, int(cpu)) if cpu is not None else 1), spec.workers.resources.gpu)
    if spec.checkpoint is None:
        assert cfg.checkpoint_dir is None
        assert cfg.checkpoint_every_steps is None
    else:
        storage = spec.checkpoint.storage
        expected_dir = "file:///checkpoints/ns/job" if storage.pvc else storage.uri
        assert cfg.checkpoint_dir == run.checkpoint_uri == expected_dir
        assert cfg.checkpoint_every_steps == spec.checkpoint.every_steps
        assert cfg.checkpoint_every_minutes == spec.checkpoint.every_minutes
        assert cfg.checkpoint_keep == spec.checkpoint.keep
    builtin = spec.trainer.builtin
    if builtin is not None:
        assert cfg.model_size == builtin.size.value
        assert cfg.max_steps == builtin.max_steps
        assert cfg.learning_rate == builtin.learning_rate
        assert cfg.seq_len == DEFAULT_SEQ_LEN[builtin.size.value]
        uri = builtin.dataset.uri
        if uri.startswith("pvc://"):
            assert cfg.dataset_uri == str(Path(run.data_root) / uri.removeprefix("pvc://"))
        else:
            assert cfg.dataset_uri == uri
    else:
        assert cfg.entrypoint == spec.trainer.entrypoint
        assert cfg.user_config == dict(spec.trainer.config or {})


def example_specs() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "TrainingJob":
                found.append((path.name, doc["spec"]))
    return found


@pytest.mark.parametrize(("name", "raw"), example_specs(), ids=[n for n, _ in example_specs()])
def test_every_example_reaches_the_pod_as_written(name: str, raw: dict[str, Any], tmp_path: Path) -> None:
    spec = TrainingJobSpec.model_validate(raw)
    write_dataset(spec, tmp_path)
    run, cfg, resources = effective_config(
        spec, attempt=3, resume_from="file:///c/step-00000010", data_root=tmp_path
    )
    assert (run.version, run.job_name, run.namespace, run.attempt) == (RUN_VERSION, "job", "ns", 3)
    assert run.head_address == "job-head.ns.svc:6379"
    assert (cfg.attempt, cfg.resume_from) == (3, "file:///c/step-00000010")
    assert_agrees(spec, run, cfg, resources)


def test_the_document_is_the_only_configuration_a_pod_gets(tmp_path: Path) -> None:
    """One variable for the run; the others are the pod's identity, filled in by the kubelet."""
    spec = TrainingJobSpec.model_validate({"trainer": {"builtin": {"dataset": {"uri": "tandem://corpus"}}}})
    pod = builders.gang(spec, job="j", uid="u", namespace="ns", attempt=0, image="i", resume_from=None)[0]
    names = [e["name"] for e in pod["spec"]["containers"][0]["env"]]
    assert names == [RUN_ENV, "POD_NAME", "POD_NAMESPACE"]


quantities = st.one_of(st.none(), st.sampled_from(["500m", "1", "2", "2500m", "16"]), st.integers(1, 32))


@st.composite
def training_specs(draw: st.DrawFn) -> dict[str, Any]:
    replicas = draw(st.integers(1, 16))
    per_device = draw(st.integers(1, 64))
    spec: dict[str, Any] = {
        "workers": {
            "replicas": replicas,
            "resources": {"gpu": draw(st.integers(0, 8))}
            | ({} if (c := draw(quantities)) is None else {"cpu": c}),
        },
        "batch": {"perDevice": per_device},
        "precision": draw(st.sampled_from(["fp32", "bf16", "fp16"])),
        "failurePolicy": {"maxRestarts": draw(st.integers(0, 20))},
    }
    if draw(st.booleans()):
        spec["batch"]["global"] = per_device * replicas * draw(st.integers(1, 8))
    if draw(st.booleans()):
        spec["trainer"] = {
            "builtin": {
                "size": draw(st.sampled_from(["tiny", "small", "medium", "124m"])),
                "dataset": {"uri": draw(st.sampled_from(["tandem://corpus", "pvc://data/sets/a.txt"]))},
                "maxSteps": draw(st.integers(1, 100_000)),
                "learningRate": draw(st.floats(1e-6, 1.0, exclude_min=False)),
            }
        }
    else:
        spec["trainer"] = {"entrypoint": "mypkg.train:main", "config": {"k": draw(st.integers())}}
    if draw(st.booleans()):
        storage = draw(st.sampled_from([{"pvc": "ckpts"}, {"uri": "file:///shared/ckpts"}]))
        spec["checkpoint"] = {
            "storage": storage,
            "everySteps": draw(st.integers(1, 10_000)),
            "keep": draw(st.integers(1, 100)),
        } | ({"everyMinutes": m} if (m := draw(st.one_of(st.none(), st.integers(1, 1440)))) else {})
    return spec


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=training_specs(), attempt=st.integers(0, 50))
def test_any_valid_spec_reaches_the_pod_unchanged(raw: dict[str, Any], attempt: int, tmp_path: Path) -> None:
    spec = TrainingJobSpec.model_validate(raw)
    write_dataset(spec, tmp_path)
    run, cfg, resources = effective_config(spec, attempt=attempt, data_root=tmp_path)
    assert cfg.attempt == attempt
    assert_agrees(spec, run, cfg, resources)


def test_a_pod_refuses_a_document_it_cannot_read() -> None:
    spec = TrainingJobSpec.model_validate({"trainer": {"builtin": {"dataset": {"uri": "tandem://corpus"}}}})
    good = builders.training_run(spec, "ns", "j", 0, None).to_dict()
    with pytest.raises(UserError, match=RUN_ENV):
        TrainingRun.from_env({})
    with pytest.raises(UserError, match="not valid JSON"):
        TrainingRun.from_env({RUN_ENV: "{"})
    with pytest.raises(UserError, match="same Tandem release"):
        TrainingRun.from_env({RUN_ENV: json.dumps(good | {"version": "tandem.dev/run/v9"})})
    broken = json.loads(json.dumps(good))
    broken["spec"]["workers"]["replicas"] = 0
    with pytest.raises(UserError, match=r"spec\.workers\.replicas"):
        TrainingRun.from_env({RUN_ENV: json.dumps(broken)})


def test_a_checkpoint_folder_the_pod_cannot_write_is_named_before_ray_starts(tmp_path: Path) -> None:
    from tandem.workloads.train.pod import check_writable

    check_writable(f"file://{tmp_path}/ns/job")  # made when missing
    assert (tmp_path / "ns" / "job").is_dir()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root writes anywhere: a file in the way fails for everyone
            blocker = tmp_path / "blocker"
            blocker.write_text("")
            target = f"file://{blocker}/ns/job"
        else:
            target = f"file://{locked}/ns/job"
        with pytest.raises(UserError, match=r"spec\.checkpoint\.storage: cannot write checkpoints"):
            check_writable(target)
    finally:
        locked.chmod(0o700)
