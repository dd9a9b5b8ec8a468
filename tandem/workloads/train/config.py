"""The training run's settings, built once from the TrainingJob spec and checked before anything starts.

`TrainConfig` is a plain, JSON-able dataclass: the head builds it, Ray ships it to every worker, and the
plain `torch.distributed` path (benchmarks) builds it the same way. `from_spec` raises `UserError`s whose
message names the spec field, so a bad job fails before a Ray cluster, a GPU or a file is touched.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel

from tandem.api.common import Precision, Resources
from tandem.api.trainingjob import Batch, BuiltinTrainer, Checkpoint, FailurePolicy, TrainingJobSpec, Workers
from tandem.api.trainingrun import DATA_ROOT, TrainingRun
from tandem.errors import UserError

BUILTIN_CORPUS_SCHEME = "tandem://"
"""`tandem://corpus` is the small generated corpus (tests, demo); no file needed."""

DEFAULT_SEQ_LEN = {"tiny": 128, "small": 256, "medium": 512, "124m": 1024}


def _default(model: type[BaseModel], name: str) -> Any:
    """A field's default as the API model declares it: the one place each default is written."""
    return model.model_fields[name].get_default(call_default_factory=True)


#: The spec's defaults, read from the API models once (see TrainConfig).
_SPEC_DEFAULTS: Final[dict[str, Any]] = {
    "max_steps": _default(BuiltinTrainer, "max_steps"),
    "learning_rate": _default(BuiltinTrainer, "learning_rate"),
    "precision": _default(TrainingJobSpec, "precision"),
    "num_workers": _default(Workers, "replicas"),
    "per_device_batch": _default(Batch, "per_device"),
    "checkpoint_keep": _default(Checkpoint, "keep"),
    "max_failures": _default(FailurePolicy, "max_restarts"),
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; identical on every rank.

    Fields that come from a TrainingJob spec default to the API models' defaults (`_default`), so a
    run built here and a run built from a spec agree; the rest are the driver's own knobs.
    """

    job_name: str
    # What to train: a built-in model (size + dataset) or a user entrypoint (+ user config).
    model_size: str | None = None
    dataset_uri: str | None = None
    entrypoint: str | None = None
    user_config: dict[str, Any] = field(default_factory=dict)
    # Optimisation.
    max_steps: int = _SPEC_DEFAULTS["max_steps"]
    learning_rate: float = _SPEC_DEFAULTS["learning_rate"]
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seq_len: int = 128
    precision: Precision = _SPEC_DEFAULTS["precision"]
    seed: int = 0
    # Parallelism.
    num_workers: int = _SPEC_DEFAULTS["num_workers"]
    per_device_batch: int = _SPEC_DEFAULTS["per_device_batch"]
    global_batch: int = _SPEC_DEFAULTS["per_device_batch"] * _SPEC_DEFAULTS["num_workers"]
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: int = 0
    # Checkpoints.
    checkpoint_dir: str | None = None
    checkpoint_every_steps: int | None = None
    checkpoint_every_minutes: float | None = None
    checkpoint_keep: int = _SPEC_DEFAULTS["checkpoint_keep"]
    resume_from: str | None = None
    # Run control.
    attempt: int = 0
    max_failures: int = _SPEC_DEFAULTS["max_failures"]
    sync_every: int = 10
    """Steps between the ranks' agreement on stop/checkpoint requests (one tiny all-reduce)."""
    compile: bool = False

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step on each worker."""
        return self.global_batch // (self.per_device_batch * self.num_workers)

    @property
    def tokens_per_step(self) -> int:
        """Tokens consumed by one optimizer step over all workers."""
        return self.global_batch * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (what Ray ships to the workers)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        if "precision" in values:
            values["precision"] = Precision(values["precision"])
        return cls(**values)


def parse_spec(spec: dict[str, Any], *, source: str = "spec") -> TrainingJobSpec:
    """Validate a TrainingJob spec (camelCase wire form) with the API models; `UserError` naming the field."""
    from pydantic import ValidationError

    from tandem.api.common import describe_validation_error

    try:
        return TrainingJobSpec.model_validate(spec)
    except ValidationError as exc:
        lines = describe_validation_error(exc, "spec.")
        raise UserError(f"invalid TrainingJob {source}:\n  " + "\n  ".join(lines)) from None


def data_cache_dir(data_root: str | None = None) -> Path:
    """Where `s3://` data sets are downloaded: `$TANDEM_DATA_CACHE`, else `.s3-cache` in the data root
    when it is a writable directory, else a directory under the system's temp dir."""
    if os.environ.get("TANDEM_DATA_CACHE"):
        return Path(os.environ["TANDEM_DATA_CACHE"])
    root = Path(data_root or DATA_ROOT)
    if root.is_dir() and os.access(root, os.W_OK):
        return root / ".s3-cache"
    return Path(tempfile.gettempdir()) / "tandem-data-cache"


def resolve_data_uri(uri: str, *, data_root: str | None = None, field_name: str = "uri") -> Path:
    """A local path for a data URI: `file:///P`, a plain path, `pvc://CLAIM/P` under the data root, or
    `s3://BUCKET/KEY` downloaded once into `data_cache_dir` (later calls reuse the finished copy)."""
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    if uri.startswith("pvc://"):
        root = data_root or DATA_ROOT
        return Path(root) / uri.removeprefix("pvc://")
    if uri.startswith("s3://"):
        from tandem.workloads.storage import materialize

        return materialize(
            uri,
            data_cache_dir(data_root),
            what=field_name,
            credentials_hint=" (in a TrainingJob's pods: in their environment, or through a service "
            "account bound to a cloud role that can read the bucket)",
        )
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise UserError(
            f"{field_name}: {uri!r} uses the {scheme}:// scheme, which the training driver cannot read; "
            "use file:///PATH, pvc://CLAIM/PATH, s3://BUCKET/KEY or tandem://corpus"
        )
    return Path(uri)


def from_spec(
    spec: dict[str, Any] | TrainingJobSpec,
    *,
    job_name: str,
    checkpoint_dir: str | None = None,
    resume_from: str | None = None,
    data_root: str | None = None,
    attempt: int = 0,
    seed: int = 0,
    seq_len: int | None = None,
    cpus_per_worker: float | None = None,
    num_workers: int | None = None,
) -> TrainConfig:
    """Build and check the run's config from a TrainingJob spec (a dict in wire form, or the model).

    Checks, each naming its field: model size and batch divisibility (the API models), that the data
    set exists and is long enough, and that a checkpoint location exists when the spec asks for one.
    `num_workers` overrides `spec.workers.replicas` (a local run on fewer cores).
    """
    if isinstance(spec, dict):
        spec = parse_spec(spec)
    workers = num_workers or spec.workers.replicas
    per_device = spec.batch.per_device
    global_batch = spec.batch.global_ or per_device * workers
    if global_batch % (per_device * workers):
        raise UserError(
            f"spec.batch.global ({global_batch}) must be a multiple of spec.batch.perDevice ({per_device}) "
            f"x workers ({workers}): change one of them or leave spec.batch.global unset"
        )
    gpus = spec.workers.resources.gpu
    common: dict[str, Any] = {
        "job_name": job_name,
        "precision": spec.precision,
        "seed": seed,
        "num_workers": workers,
        "per_device_batch": per_device,
        "global_batch": global_batch,
        "use_gpu": gpus > 0,
        "gpus_per_worker": gpus,
        "cpus_per_worker": cpus_per_worker if cpus_per_worker is not None else _cpus(spec.workers.resources),
        "attempt": attempt,
        "max_failures": spec.failure_policy.max_restarts,
        "resume_from": resume_from,
    }
    if checkpoint_dir is not None and "://" in checkpoint_dir and not checkpoint_dir.startswith("file://"):
        raise UserError(
            f"spec.checkpoint.storage.uri: the checkpoint location {checkpoint_dir!r} is not a file "
            "system path; checkpoints are written to a shared volume, not object storage: use a pvc "
            "(spec.checkpoint.storage.pvc) or a file:///PATH that every pod mounts"
        )
    ck = spec.checkpoint
    if ck is not None:
        if checkpoint_dir is None:
            raise UserError(
                "spec.checkpoint.storage: no checkpoint directory is available to this run "
                "(pods get it in their run document from the operator; locally pass --checkpoint-dir)"
            )
        common |= {
            "checkpoint_dir": checkpoint_dir,
            "checkpoint_every_steps": ck.every_steps,
            "checkpoint_every_minutes": ck.every_minutes,
            "checkpoint_keep": ck.keep,
        }
    elif checkpoint_dir is not None:
        common["checkpoint_dir"] = checkpoint_dir
    trainer = spec.trainer
    if trainer.builtin is not None:
        b = trainer.builtin
        size = str(b.size.value)
        if size not in DEFAULT_SEQ_LEN:
            raise UserError(
                f"spec.trainer.builtin.size: unknown size {size!r}; use one of {', '.join(DEFAULT_SEQ_LEN)}"
            )
        length = seq_len or DEFAULT_SEQ_LEN[size]
        _check_dataset(b.dataset.uri, data_root=data_root, seq_len=length, global_batch=global_batch)
        cfg = TrainConfig(
            model_size=size,
            dataset_uri=b.dataset.uri
            if not b.dataset.uri.startswith("pvc://") or data_root is None
            else str(resolve_data_uri(b.dataset.uri, data_root=data_root)),
            max_steps=b.max_steps,
            learning_rate=b.learning_rate,
            warmup_steps=max(1, min(100, b.max_steps // 10)),
            seq_len=length,
            **common,
        )
    else:
        assert trainer.entrypoint is not None
        cfg = TrainConfig(entrypoint=trainer.entrypoint, user_config=dict(trainer.config or {}), **common)
    return cfg


def _cpus(resources: Resources) -> float:
    """CPU cores a worker offers Ray (fractions allowed); 1 when the spec leaves it to the cluster."""
    cores = resources.cpu_cores()
    return 1.0 if cores is None else max(cores, 0.001)


def from_run(run: TrainingRun) -> TrainConfig:
    """The effective config of a pod's run document: what `tandem train head` trains."""
    return from_spec(
        run.spec,
        job_name=run.job_name,
        checkpoint_dir=run.checkpoint_uri,
        resume_from=run.resume_from,
        data_root=run.data_root,
        attempt=run.attempt,
    )


def _check_dataset(uri: str, *, data_root: str | None, seq_len: int, global_batch: int) -> None:
    name = "spec.trainer.builtin.dataset.uri"
    if uri.startswith(BUILTIN_CORPUS_SCHEME):
        from tandem.workloads.data.corpus import CORPORA

        key = uri.removeprefix(BUILTIN_CORPUS_SCHEME)
        if key not in CORPORA:
            raise UserError(
                f"{name}: unknown built-in corpus {uri!r}; known: "
                f"{', '.join(BUILTIN_CORPUS_SCHEME + k for k in CORPORA)}"
            )
        return
    path = resolve_data_uri(uri, data_root=data_root, field_name=name)
    if not path.exists():
        hint = (
            " (pvc:// data sets are read from /data/CLAIM/PATH in pods; locally pass --data-root)"
            if uri.startswith("pvc://")
            else ""
        )
        raise UserError(
            f"{name}: data set {uri!r} not found at {path}{hint}; point it at a text file or a "
            "directory of text files, or use tandem://corpus"
        )
    from tandem.workloads.train.data import text_size

    size = text_size(path)
    if size < seq_len + 1:
        raise UserError(
            f"{name}: data set {uri!r} has {size} bytes, fewer than one training sequence "
            f"({seq_len + 1} tokens); use more text"
        )
