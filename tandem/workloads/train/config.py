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
from typing import TYPE_CHECKING, Any, Final

from pydantic import BaseModel

from tandem.api.common import Precision, Resources
from tandem.api.trainingjob import (
    Batch,
    BuiltinTrainer,
    Checkpoint,
    Dataset,
    Evaluation,
    FailurePolicy,
    Optimizer,
    Trainer,
    TrainingJobSpec,
    Workers,
)
from tandem.api.trainingrun import DATA_ROOT, TrainingRun
from tandem.errors import UserError

if TYPE_CHECKING:
    from tandem.workloads.train.finetune import FineTune

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
    "seed": _default(TrainingJobSpec, "seed"),
    "compile": _default(BuiltinTrainer, "compile"),
    "beta1": _default(Optimizer, "beta1"),
    "beta2": _default(Optimizer, "beta2"),
    "weight_decay": _default(Optimizer, "weight_decay"),
    "grad_clip": _default(Optimizer, "max_grad_norm"),
    "lr_decay": str(_default(Optimizer, "decay")),
    "data_format": str(_default(Dataset, "format")),
    "token_dtype": str(_default(Dataset, "token_dtype")),
    "text_field": _default(Dataset, "text_field"),
    "eval_batches": _default(Evaluation, "batches"),
    "strategy": str(_default(Trainer, "strategy")),
}

#: The minimum learning rate when the spec leaves it unset: this share of the peak.
DEFAULT_MIN_LR_RATIO: Final = 0.1


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
    #: How the data is read (`tandem.api.trainingjob.DataFormat`), the token files' integer type, the
    #: data's vocabulary (None: the byte tokenizer's), a `tokenizer.json` (None: bytes), the JSONL key.
    data_format: str = _SPEC_DEFAULTS["data_format"]
    token_dtype: str = _SPEC_DEFAULTS["token_dtype"]
    vocab_size: int | None = None
    tokenizer_uri: str | None = None
    text_field: str = _SPEC_DEFAULTS["text_field"]
    #: Held-out data: a data set of its own, or the share of the training tokens taken from their end.
    validation_uri: str | None = None
    validation_fraction: float | None = None
    entrypoint: str | None = None
    user_config: dict[str, Any] = field(default_factory=dict)
    # Optimisation.
    max_steps: int = _SPEC_DEFAULTS["max_steps"]
    learning_rate: float = _SPEC_DEFAULTS["learning_rate"]
    min_lr_ratio: float = DEFAULT_MIN_LR_RATIO
    warmup_steps: int = 100
    lr_decay: str = _SPEC_DEFAULTS["lr_decay"]
    weight_decay: float = _SPEC_DEFAULTS["weight_decay"]
    beta1: float = _SPEC_DEFAULTS["beta1"]
    beta2: float = _SPEC_DEFAULTS["beta2"]
    grad_clip: float = _SPEC_DEFAULTS["grad_clip"]
    seq_len: int = 128
    precision: Precision = _SPEC_DEFAULTS["precision"]
    seed: int = _SPEC_DEFAULTS["seed"]
    # Evaluation (None: no evaluation).
    eval_interval: int | None = None
    eval_batches: int = _SPEC_DEFAULTS["eval_batches"]
    keep_best: bool = False
    early_stop_patience: int | None = None
    early_stop_min_delta: float = 0.0
    # Strategy.
    #: `spec.trainer.strategy`: `ddp` (whole model per rank) or `fsdp` (FSDP2, sharded per block).
    strategy: str = _SPEC_DEFAULTS["strategy"]
    #: `spec.trainer.deterministic`: deterministic algorithms (bit-for-bit repeatable on GPUs).
    deterministic: bool = False
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
    # Tracking (`spec.tracking`, `tracking.tracking_config`): where event files go, an MLflow server.
    tensorboard_dir: str | None = None
    mlflow_uri: str | None = None
    mlflow_experiment: str | None = None
    # Run control.
    attempt: int = 0
    max_failures: int = _SPEC_DEFAULTS["max_failures"]
    sync_every: int = 10
    """Steps between the ranks' agreement on stop/checkpoint requests (one tiny all-reduce)."""
    compile: bool = _SPEC_DEFAULTS["compile"]
    #: The resolved `spec.trainer.builtin.fineTuning` (`finetune.FineTune.to_dict()`); None: random weights.
    fine_tuning: dict[str, Any] | None = None

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
        "seed": spec.seed,
        "num_workers": workers,
        "per_device_batch": per_device,
        "global_batch": global_batch,
        "use_gpu": gpus > 0,
        "gpus_per_worker": gpus,
        "cpus_per_worker": cpus_per_worker if cpus_per_worker is not None else _cpus(spec.workers.resources),
        "attempt": attempt,
        "max_failures": spec.failure_policy.max_restarts,
        "resume_from": resume_from,
        "deterministic": spec.trainer.deterministic,
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
    if spec.tracking is not None:
        from tandem.workloads.train.tracking import tracking_config

        common |= tracking_config(spec.tracking, common.get("checkpoint_dir"), job_name)
    trainer = spec.trainer
    if trainer.builtin is not None:
        b = trainer.builtin
        size = str(b.size.value)
        if size not in DEFAULT_SEQ_LEN:
            raise UserError(
                f"spec.trainer.builtin.size: unknown size {size!r}; use one of {', '.join(DEFAULT_SEQ_LEN)}"
            )
        fine = None if b.fine_tuning is None else _fine_tune(b, size, checkpoint_dir, data_root)
        length = b.sequence_length or (DEFAULT_SEQ_LEN[size] if fine is None else fine.gpt_config.block_size)
        data = _check_data(b, data_root=data_root, seq_len=length)
        opt = b.optimizer
        ev = b.evaluation
        stopping = None if ev is None else ev.early_stopping
        cfg = TrainConfig(
            model_size=size,
            max_steps=b.max_steps,
            learning_rate=b.learning_rate,
            warmup_steps=opt.warmup_steps
            if opt.warmup_steps is not None
            else max(1, min(100, b.max_steps // 10)),
            lr_decay=str(opt.decay),
            min_lr_ratio=DEFAULT_MIN_LR_RATIO
            if opt.min_learning_rate is None
            else opt.min_learning_rate / b.learning_rate,
            beta1=opt.beta1,
            beta2=opt.beta2,
            weight_decay=opt.weight_decay,
            grad_clip=opt.max_grad_norm,
            seq_len=length,
            compile=b.compile,
            eval_interval=None if ev is None else ev.interval_steps,
            eval_batches=_SPEC_DEFAULTS["eval_batches"] if ev is None else ev.batches,
            keep_best=ev is not None and ev.keep_best,
            early_stop_patience=None if stopping is None else stopping.patience,
            early_stop_min_delta=0.0 if stopping is None else stopping.min_delta,
            fine_tuning=None if fine is None else fine.to_dict(),
            strategy=str(trainer.strategy),
            **data,
            **common,
        )
        if fine is not None:
            from tandem.workloads.train.finetune import check_data

            tokenizer = (
                None
                if cfg.tokenizer_uri is None
                else resolve_data_uri(cfg.tokenizer_uri, data_root=data_root)
            )
            check_data(fine, cfg, tokenizer)
    else:
        assert trainer.entrypoint is not None
        cfg = TrainConfig(entrypoint=trainer.entrypoint, user_config=dict(trainer.config or {}), **common)
    return cfg


def _fine_tune(b: BuiltinTrainer, size: str, checkpoint_dir: str | None, data_root: str | None) -> FineTune:
    """The pinned, verified base of `spec.trainer.builtin.fineTuning` (see `finetune.resolve`)."""
    from tandem.workloads.train.finetune import resolve

    assert b.fine_tuning is not None
    return resolve(
        b.fine_tuning,
        size=size,
        sequence_length=b.sequence_length,
        checkpoint_dir=checkpoint_dir,
        data_root=data_root,
    )


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


def _pod_uri(uri: str, data_root: str | None) -> str:
    """`pvc://` URIs as the pod's path under the data root (other URIs as written)."""
    if uri.startswith("pvc://") and data_root is not None:
        return str(resolve_data_uri(uri, data_root=data_root))
    return uri


def _check_data(b: BuiltinTrainer, *, data_root: str | None, seq_len: int) -> dict[str, Any]:
    """Check the data set, its tokenizer and held-out data; the `TrainConfig` fields they give.

    The vocabulary is the spec's `vocabSize`, else the tokenizer's, else the byte tokenizer's; the
    model's embedding table is sized from it, so model and data always agree.
    """
    from tandem.workloads.models.tokenizer import VOCAB_SIZE

    d = b.dataset
    prefix = "spec.trainer.builtin.dataset"
    vocab = _vocabulary(d, data_root)
    fields: dict[str, Any] = {
        "dataset_uri": _pod_uri(d.uri, data_root),
        "data_format": str(d.format),
        "token_dtype": str(d.token_dtype),
        "tokenizer_uri": None if d.tokenizer is None else _pod_uri(d.tokenizer, data_root),
        "text_field": d.text_field,
        "vocab_size": vocab or VOCAB_SIZE,
        "validation_uri": None,
        "validation_fraction": None,
    }
    uris = [(d.uri, f"{prefix}.uri")]
    if d.validation is not None:
        fields["validation_fraction"] = d.validation.fraction
        if d.validation.uri is not None:
            fields["validation_uri"] = _pod_uri(d.validation.uri, data_root)
            uris.append((d.validation.uri, f"{prefix}.validation.uri"))
    for uri, name in uris:
        fraction = d.validation.fraction if d.validation is not None and name == f"{prefix}.uri" else None
        _check_data_file(d, uri, name, data_root=data_root, vocab=vocab, seq_len=seq_len, fraction=fraction)
    return fields


def _vocabulary(d: Dataset, data_root: str | None) -> int | None:
    """The data's vocabulary: `vocabSize`, else its tokenizer's (loaded and checked here), else None."""
    from tandem.workloads.models.tokenizer import HFTokenizer

    name = "spec.trainer.builtin.dataset.tokenizer"
    if d.tokenizer is None:
        return d.vocab_size
    path = resolve_data_uri(d.tokenizer, data_root=data_root, field_name=name)
    if not path.is_file():
        raise UserError(
            f"{name}: {d.tokenizer!r} not found at {path}; point it at a tokenizer.json "
            "(make one with `tandem tokenizer train CORPUS -o tokenizer.json`)"
        )
    try:
        tokenizer_vocab = HFTokenizer.from_file(path).vocab_size
    except ValueError as exc:
        raise UserError(f"{name}: {exc}") from None
    if d.vocab_size is not None and d.vocab_size < tokenizer_vocab:
        raise UserError(
            f"spec.trainer.builtin.dataset.vocabSize ({d.vocab_size}) is smaller than the tokenizer's "
            f"vocabulary ({tokenizer_vocab}): raise it or leave it unset"
        )
    return d.vocab_size or tokenizer_vocab


def _check_data_file(
    d: Dataset,
    uri: str,
    name: str,
    *,
    data_root: str | None,
    vocab: int | None,
    seq_len: int,
    fraction: float | None,
) -> None:
    """One data set exists, holds whole tokens below the vocabulary, and at least one sequence."""
    from tandem.workloads.data import sources

    if uri.startswith(BUILTIN_CORPUS_SCHEME):
        _check_corpus(uri, name)
        return
    path = resolve_data_uri(uri, data_root=data_root, field_name=name)
    if not path.exists():
        hint = (
            " (pvc:// data sets are read from /data/CLAIM/PATH in pods; locally pass --data-root)"
            if uri.startswith("pvc://")
            else ""
        )
        raise UserError(
            f"{name}: data set {uri!r} not found at {path}{hint}; point it at a token file (.bin), a "
            "text or JSONL file or a directory of them, or use tandem://corpus"
        )
    source = sources.DataSource(path, str(d.format), str(d.token_dtype), None, d.text_field)
    if source.kind == "tokens":
        assert vocab is not None  # the API model's rule: token files need vocabSize or a tokenizer
        files = sources.token_files(path)
        if not files:
            raise UserError(f"{name}: no .bin token files in {path}")
        try:
            size = sum(sources.check_token_file(f, str(d.token_dtype), vocab, field=name) for f in files)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        unit = "tokens"
    elif d.tokenizer is None and source.kind == "text":
        size, unit = text_size(path), "bytes"
    else:
        return  # tokenized at start-up; its length is known only then
    held = int(size * fraction) if fraction else 0
    if size - held < seq_len + 1:
        left = f" ({size - held} left for training)" if held else ""
        raise UserError(
            f"{name}: data set {uri!r} has {size} {unit}{left}, fewer than one training sequence "
            f"({seq_len + 1} tokens): use more data or a shorter spec.trainer.builtin.sequenceLength"
        )
    if fraction and held < seq_len + 1:
        raise UserError(
            f"spec.trainer.builtin.dataset.validation.fraction: {fraction} of {uri!r} is {held} {unit}, "
            f"fewer than one sequence ({seq_len + 1} tokens): raise the fraction or use more data"
        )


def _check_corpus(uri: str, name: str) -> None:
    from tandem.workloads.data.corpus import CORPORA

    key = uri.removeprefix(BUILTIN_CORPUS_SCHEME)
    if key not in CORPORA:
        raise UserError(
            f"{name}: unknown built-in corpus {uri!r}; known: "
            f"{', '.join(BUILTIN_CORPUS_SCHEME + k for k in CORPORA)}"
        )


def text_size(path: Path) -> int:
    """Bytes of text at `path` (a file or a directory of text files)."""
    from tandem.workloads.data.sources import files_of

    return sum(p.stat().st_size for p in files_of(path))
