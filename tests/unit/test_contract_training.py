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

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.api.common import Precision
from tandem.api.trainingjob import BuiltinTrainer, TrainingJobSpec
from tandem.api.trainingrun import RUN_ENV, RUN_VERSION, TrainingRun
from tandem.errors import UserError
from tandem.operator.trainingjob import builders
from tandem.workloads.models.gpt import config_for
from tandem.workloads.models.tokenizer import VOCAB_SIZE
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
    """Put data where a pvc:// data set's claim would be mounted: token files of the declared dtype and
    vocabulary, text otherwise (enough for the longest sequence)."""
    builtin = spec.trainer.builtin
    if builtin is None:
        return
    d = builtin.dataset
    uris = [d.uri] + ([d.validation.uri] if d.validation is not None and d.validation.uri else [])
    for uri in uris:
        if not uri.startswith("pvc://"):
            continue
        path = data_root / uri.removeprefix("pvc://")
        path.parent.mkdir(parents=True, exist_ok=True)
        if d.token_files:
            assert d.vocab_size is not None
            ids = np.arange(20_000) % d.vocab_size
            ids.astype(np.uint16 if d.token_dtype == "uint16" else np.uint32).tofile(path)
        else:
            path.write_bytes(b"the quick brown fox jumps over the lazy dog\n" * 500)


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
        expected_dir = f"file://{builders.CHECKPOINT_MOUNT}/ns/job" if storage.pvc else storage.uri
        assert cfg.checkpoint_dir == run.checkpoint_uri == expected_dir
        assert cfg.checkpoint_every_steps == spec.checkpoint.every_steps
        assert cfg.checkpoint_every_minutes == spec.checkpoint.every_minutes
        assert cfg.checkpoint_keep == spec.checkpoint.keep
    assert cfg.seed == spec.seed
    assert cfg.deterministic == spec.trainer.deterministic
    builtin = spec.trainer.builtin
    if builtin is not None:
        assert cfg.model_size == builtin.size.value
        assert cfg.max_steps == builtin.max_steps
        assert cfg.learning_rate == builtin.learning_rate
        assert cfg.seq_len == (builtin.sequence_length or DEFAULT_SEQ_LEN[builtin.size.value])
        assert cfg.compile == builtin.compile
        assert cfg.strategy == spec.trainer.strategy.value
        assert_data_agrees(builtin, run, cfg)
        assert_optimizer_agrees(builtin, cfg)
        assert_evaluation_agrees(builtin, cfg)
        assert_fine_tuning_agrees(builtin, cfg)
    else:
        assert cfg.entrypoint == spec.trainer.entrypoint
        assert cfg.user_config == dict(spec.trainer.config or {})


def pod_path(uri: str, run: TrainingRun) -> str:
    """Where the pod reads a data URI: pvc:// under the data root, others as written."""
    return str(Path(run.data_root) / uri.removeprefix("pvc://")) if uri.startswith("pvc://") else uri


def assert_data_agrees(builtin: BuiltinTrainer, run: TrainingRun, cfg: TrainConfig) -> None:
    d = builtin.dataset
    assert cfg.dataset_uri == pod_path(d.uri, run)
    assert cfg.data_format == d.format.value
    assert cfg.token_dtype == d.token_dtype.value
    assert cfg.text_field == d.text_field
    assert cfg.tokenizer_uri == (None if d.tokenizer is None else pod_path(d.tokenizer, run))
    # The data's vocabulary sizes the model: the spec's, else the byte tokenizer's (no tokenizer here).
    assert cfg.vocab_size == (d.vocab_size or VOCAB_SIZE)
    assert config_for(builtin.size.value, vocab_size=cfg.vocab_size).vocab_size % 64 == 0
    assert config_for(builtin.size.value, vocab_size=cfg.vocab_size).vocab_size >= cfg.vocab_size
    v = d.validation
    assert cfg.validation_fraction == (None if v is None else v.fraction)
    assert cfg.validation_uri == (None if v is None or v.uri is None else pod_path(v.uri, run))


def assert_optimizer_agrees(builtin: BuiltinTrainer, cfg: TrainConfig) -> None:
    o = builtin.optimizer
    warmup = o.warmup_steps if o.warmup_steps is not None else max(1, min(100, builtin.max_steps // 10))
    assert cfg.warmup_steps == warmup
    assert cfg.lr_decay == o.decay.value
    floor = 0.1 if o.min_learning_rate is None else o.min_learning_rate / builtin.learning_rate
    assert cfg.min_lr_ratio == pytest.approx(floor)
    assert (cfg.beta1, cfg.beta2, cfg.weight_decay, cfg.grad_clip) == (
        o.beta1,
        o.beta2,
        o.weight_decay,
        o.max_grad_norm,
    )


def assert_evaluation_agrees(builtin: BuiltinTrainer, cfg: TrainConfig) -> None:
    ev = builtin.evaluation
    if ev is None:
        assert cfg.eval_interval is None
        assert not cfg.keep_best
        assert cfg.early_stop_patience is None
        return
    assert (cfg.eval_interval, cfg.eval_batches, cfg.keep_best) == (
        ev.interval_steps,
        ev.batches,
        ev.keep_best,
    )
    stopping = ev.early_stopping
    assert cfg.early_stop_patience == (None if stopping is None else stopping.patience)
    assert cfg.early_stop_min_delta == (0.0 if stopping is None else stopping.min_delta)


def write_base(spec: TrainingJobSpec, mount: Path) -> None:
    """A fine-tune's base: a real checkpoint of the spec's size where the pod finds it (beside its own
    checkpoint root on the claim, mounted at `mount` here)."""
    from tandem.workloads.train.loop import DistInfo, run_builtin

    builtin = spec.trainer.builtin
    if builtin is None or builtin.fine_tuning is None:
        return
    ref = builtin.fine_tuning.base.training_job_ref
    assert ref is not None, "examples fine-tune a TrainingJob's checkpoint"
    size = builtin.size.value
    base = TrainConfig(
        job_name=ref.name,
        model_size=size,
        dataset_uri="tandem://corpus-small",
        max_steps=1,
        seq_len=DEFAULT_SEQ_LEN[size],
        per_device_batch=1,
        global_batch=1,
        checkpoint_dir=str(mount / "ns" / ref.name),
    )
    run_builtin(base, DistInfo())


def assert_fine_tuning_agrees(builtin: BuiltinTrainer, cfg: TrainConfig) -> None:
    tuning = builtin.fine_tuning
    if tuning is None:
        assert cfg.fine_tuning is None
        return
    assert cfg.fine_tuning is not None
    assert cfg.fine_tuning["lora"] == (None if tuning.lora is None else tuning.lora.to_dict())
    ref = tuning.base.training_job_ref
    assert cfg.fine_tuning["base_job"] == (None if ref is None else ref.name)


def example_specs() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "TrainingJob":
                found.append((path.name, doc["spec"]))
    return found


@pytest.mark.parametrize(("name", "raw"), example_specs(), ids=[n for n, _ in example_specs()])
def test_every_example_reaches_the_pod_as_written(
    name: str, raw: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = TrainingJobSpec.model_validate(raw)
    write_dataset(spec, tmp_path)
    if spec.trainer.builtin is not None and spec.trainer.builtin.fine_tuning is not None:
        # The checkpoint claim, mounted in a folder here: a fine-tune reads its base job's checkpoints there.
        monkeypatch.setattr(builders, "CHECKPOINT_MOUNT", str(tmp_path / "checkpoints"))
        write_base(spec, tmp_path / "checkpoints")
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


def maybe(draw: st.DrawFn, key: str, strategy: st.SearchStrategy[Any]) -> dict[str, Any]:
    """`{key: value}` or nothing: a field set or left to its default."""
    return {key: draw(strategy)} if draw(st.booleans()) else {}


@st.composite
def builtin_trainers(draw: st.DrawFn) -> dict[str, Any]:
    lr = draw(st.floats(1e-6, 1.0, exclude_min=False))
    tokens = draw(st.booleans())
    if tokens:
        dataset: dict[str, Any] = {
            "uri": "pvc://data/sets/train.bin",
            "vocabSize": draw(st.integers(2, 65_536)),
        } | maybe(draw, "tokenDtype", st.sampled_from(["uint16", "uint32"]))
    else:
        dataset = {"uri": draw(st.sampled_from(["tandem://corpus", "pvc://data/sets/a.txt"]))}
    dataset |= maybe(draw, "textField", st.sampled_from(["text", "body"]))
    evaluation: dict[str, Any] = {}
    if draw(st.booleans()):
        held_out = "pvc://data/sets/val.bin" if tokens else "tandem://corpus-small"
        dataset["validation"] = draw(
            st.sampled_from([{"uri": held_out}, {"fraction": 0.1}, {"fraction": 0.5}])
        )
        evaluation = (
            maybe(draw, "intervalSteps", st.integers(1, 10_000))
            | maybe(draw, "batches", st.integers(1, 100))
            | maybe(draw, "earlyStopping", st.fixed_dictionaries({"patience": st.integers(1, 50)}))
        )
    optimizer = (
        maybe(draw, "warmupSteps", st.integers(0, 1000))
        | maybe(draw, "decay", st.sampled_from(["cosine", "linear", "constant"]))
        | maybe(draw, "minLearningRate", st.floats(0, lr))
        | maybe(draw, "beta1", st.floats(0, 0.99))
        | maybe(draw, "beta2", st.floats(0, 0.999))
        | maybe(draw, "weightDecay", st.floats(0, 1))
        | maybe(draw, "maxGradNorm", st.floats(0, 10))
    )
    return (
        {
            "size": draw(st.sampled_from(["tiny", "small", "medium", "124m"])),
            "dataset": dataset,
            "maxSteps": draw(st.integers(1, 100_000)),
            "learningRate": lr,
            "optimizer": optimizer,
        }
        | maybe(draw, "sequenceLength", st.sampled_from([8, 64, 256]))
        | maybe(draw, "compile", st.booleans())
        | ({"evaluation": evaluation} if "validation" in dataset and draw(st.booleans()) else {})
    )


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
        spec["trainer"] = (
            {"builtin": draw(builtin_trainers())}
            | maybe(draw, "strategy", st.sampled_from(["ddp", "fsdp"]))
            | maybe(draw, "deterministic", st.booleans())
        )
        if draw(st.booleans()):
            spec["seed"] = draw(st.integers(0, 2**32 - 1))
    else:
        spec["trainer"] = {"entrypoint": "mypkg.train:main", "config": {"k": draw(st.integers())}} | maybe(
            draw, "deterministic", st.booleans()
        )
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


@pytest.mark.parametrize(
    "trainer",
    [
        pytest.param({"entrypoint": "mypkg.train:main"}, id="entrypoint"),
        pytest.param(
            {
                "builtin": {
                    "dataset": {"uri": "tandem://corpus"},
                    "fineTuning": {"base": {"uri": "file:///base/step-00000010"}, "lora": {}},
                }
            },
            id="lora",
        ),
    ],
)
def test_fsdp_where_it_cannot_work_is_refused_naming_the_field(
    trainer: dict[str, Any], tmp_path: Path
) -> None:
    """fsdp shards the built-in trainer's model: a user's entrypoint (which wraps its own) and a LoRA
    fine-tune (adapter-only checkpoints) are refused before any pod starts, and so is the same job as
    `tandem train --local` reads it; with ddp both are valid."""
    from tandem.workloads.train.config import parse_spec

    raw = {"trainer": trainer | {"strategy": "fsdp"}}
    with pytest.raises(UserError, match=r"spec\.trainer\.strategy: fsdp"):
        parse_spec(raw)
    TrainingJobSpec.model_validate({"trainer": trainer | {"strategy": "ddp"}})


def test_fsdp_reaches_the_pod_and_the_default_is_ddp(tmp_path: Path) -> None:
    base = {"trainer": {"builtin": {"dataset": {"uri": "tandem://corpus"}}}}
    _, default, _ = effective_config(TrainingJobSpec.model_validate(base), data_root=tmp_path)
    assert default.strategy == "ddp"
    sharded = TrainingJobSpec.model_validate({"trainer": base["trainer"] | {"strategy": "fsdp"}})
    run, cfg, _ = effective_config(sharded, data_root=tmp_path)
    assert run.spec.trainer.strategy == "fsdp"
    assert TrainConfig.from_dict(cfg.to_dict()).strategy == "fsdp"  # as Ray ships it to the ranks
