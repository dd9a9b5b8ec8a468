"""Fine-tuning the built-in GPT (`spec.trainer.builtin.fineTuning`): the base, pinned; LoRA checkpoints.

`resolve` runs where the config is built (the head, or `tandem train --local`), before Ray starts: it
finds the base checkpoint (a TrainingJob's, beside this job's checkpoint root, or a URI), verifies it
and checks that the spec fits it, each failure a `UserError` naming the field. The base is pinned: a
job that already wrote checkpoints keeps the base its newest checkpoint records, so `checkpoint:
latest` of a base job still training cannot change the weights under a resumed fine-tune.

`FineTune` is the part the loop uses on every rank (`GPTRun`): load the base weights, wrap the LoRA
layers, and write/read the checkpoint's weights: the adapter only (`adapter.pt`) with LoRA, the whole
model (`model.pt`) for full fine-tuning. The rest of the checkpoint (optimizer, scheduler, RNG, data
position) is the trainer's as always, so a fine-tune resumes exactly like any run.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from tandem.api.finetuning import FineTuning
from tandem.errors import UserError
from tandem.workloads.train import checkpoint as ckpt

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tandem.workloads.models.gpt import GPTConfig
    from tandem.workloads.train.config import TrainConfig

log = logging.getLogger(__name__)

FIELD: Final = "spec.trainer.builtin.fineTuning"
#: The key of a checkpoint's metadata that records the base and the adapter (lineage, serving).
METADATA_KEY: Final = "fineTuning"
TOKENIZER_FILE: Final = "tokenizer.json"


@dataclass(frozen=True)
class FineTune:
    """The resolved fine-tuning of a run: identical on every rank (shipped inside `TrainConfig`)."""

    #: The pinned base checkpoint (one `step-NNNNNNNN`) as the pods name it: recorded in every checkpoint.
    base_uri: str
    #: Where this process reads it (an `s3://` base is downloaded first).
    base_path: str
    base_step: int
    #: The TrainingJob that wrote the base, when the spec named one.
    base_job: str | None
    #: The base's `GPTConfig` (the fine-tune keeps its shape).
    model_config: dict[str, Any]
    #: `rank`, `alpha`, `targetModules`, `dropout` (wire names, as the metadata records them); None: full.
    lora: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> FineTune | None:
        """The run's fine-tuning, or None for a run from random weights."""
        return None if cfg.fine_tuning is None else cls(**cfg.fine_tuning)

    @property
    def gpt_config(self) -> GPTConfig:
        from tandem.workloads.models.gpt import GPTConfig

        return GPTConfig.from_dict(self.model_config)

    # -- the loop's hooks ----------------------------------------------------------------------------

    def prepare(self, model: nn.Module) -> None:
        """Load the base weights into `model` (a fresh GPT of the base's shape) and wrap the LoRA layers."""
        from tandem.workloads.models.gpt import load_for_inference
        from tandem.workloads.models.lora import apply_lora

        base, _, _ = load_for_inference(self.base_path)  # a base that is itself a LoRA fine-tune is merged
        model.load_state_dict(base.state_dict())
        if self.lora is not None:
            apply_lora(
                model,
                self.lora["targetModules"],
                rank=self.lora["rank"],
                alpha=self.lora["alpha"],
                dropout=self.lora["dropout"],
            )

    def save_weights(self, staging: ckpt.Staging, model: nn.Module) -> None:
        """The checkpoint's weights: the adapter alone with LoRA, else the whole model."""
        from tandem.workloads.models.lora import ADAPTER_FILE, adapter_state

        if self.lora is None:
            staging.save_torch(ckpt.MODEL_FILE, model.state_dict())
        else:
            staging.save_torch(ADAPTER_FILE, adapter_state(model))

    def load_weights(self, path: Path, model: nn.Module, device: torch.device) -> None:
        """Inverse of `save_weights` (the base weights are already in `model`)."""
        import torch

        from tandem.workloads.models.lora import ADAPTER_FILE, load_adapter_state

        if self.lora is None:
            model.load_state_dict(torch.load(path / ckpt.MODEL_FILE, map_location=device, weights_only=True))
        else:
            load_adapter_state(model, torch.load(path / ADAPTER_FILE, map_location=device, weights_only=True))

    def metadata(self, model: nn.Module) -> dict[str, Any]:
        """What every checkpoint records: the base (lineage; the server loads it) and the adapter."""
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {
            METADATA_KEY: {
                "method": "full" if self.lora is None else "lora",
                "base": {"uri": self.base_uri, "step": self.base_step, "trainingJob": self.base_job},
                "lora": self.lora,
                "trainableParameters": trainable,
            }
        }


# ------------------------------------------------------------------------------------------------
# Resolving the base (config time, before anything starts)
# ------------------------------------------------------------------------------------------------


def _pinned(checkpoint_dir: str | None) -> dict[str, Any] | None:
    """The base the newest checkpoint of this job records, if it wrote any (a resumed fine-tune)."""
    if checkpoint_dir is None:
        return None
    root = ckpt.uri_to_path(checkpoint_dir)
    for ref in reversed(ckpt.list_checkpoints(root)):
        try:
            base = ckpt.read_metadata(ref.path).get(METADATA_KEY, {}).get("base")
        except (OSError, ValueError, ckpt.CorruptCheckpoint):
            continue
        if isinstance(base, dict) and base.get("uri"):
            return base
    return None


def _step_dir(path: Path, what: str) -> ckpt.CheckpointRef:
    """`path` itself when it is one checkpoint, else the newest complete checkpoint under it."""
    if (path / ckpt.METADATA_FILE).is_file():
        name = path.name
        if not name.startswith("step-") or not name[5:].isdigit():
            raise UserError(f"{what}: {path} is not a checkpoint directory (step-NNNNNNNN)")
        ref = ckpt.CheckpointRef(int(name[5:]), path)
        if not (path / ckpt.MARKER_FILE).is_file():
            raise UserError(f"{what}: checkpoint {path} is incomplete (no {ckpt.MARKER_FILE} marker)")
        return ref
    found = ckpt.latest_complete(path)
    if found is None:
        raise UserError(
            f"{what}: no complete checkpoint at {path}: point it at a TrainingJob's checkpoint "
            "(a step-NNNNNNNN directory) or checkpoint root"
        )
    return found


def _beside(own_root: Path, job: str) -> Path:
    """The checkpoint root of TrainingJob `job` beside this job's: `ROOT/../JOB` (pods: the claim's
    `/checkpoints/NAMESPACE/JOB`), or `tandem-runs/JOB/checkpoints` for `tandem train --local`'s layout."""
    sibling = own_root.parent / job
    local = own_root.parent.parent / job / own_root.name
    return local if not sibling.exists() and local.exists() else sibling


def _locate(
    ft: FineTuning, checkpoint_dir: str | None, data_root: str | None
) -> tuple[str, Path, int, str | None]:
    """(URI as the pods name it, local path, step, job) of the base checkpoint the spec asks for."""
    from tandem.workloads.train.config import resolve_data_uri

    base = ft.base
    ref = base.training_job_ref
    if ref is not None:
        what = f"{FIELD}.base.trainingJobRef"
        if checkpoint_dir is None:
            raise UserError(
                f"{what}: a TrainingJob's checkpoints are found beside this job's, on the same storage: "
                "set spec.checkpoint.storage (the claim the base job writes to), or use "
                f"{FIELD}.base.uri"
            )
        root = _beside(ckpt.uri_to_path(checkpoint_dir), ref.name)
        if ref.checkpoint == "latest":
            found = _step_dir(root, f"{what} ({ref.name}, latest)")
        else:
            path = root / ckpt.checkpoint_name(int(ref.checkpoint))
            if not path.is_dir():
                raise UserError(
                    f"{what}.checkpoint: TrainingJob {ref.name} has no checkpoint at step "
                    f"{ref.checkpoint} ({path}); its checkpoints: "
                    f"{[r.step for r in ckpt.list_checkpoints(root)] or 'none'}"
                )
            found = _step_dir(path, f"{what}.checkpoint")
        return ckpt.path_to_uri(found.path), found.path, found.step, ref.name
    assert base.uri is not None  # exactly one of the two (the API model's rule)
    what = f"{FIELD}.base.uri"
    local = resolve_data_uri(base.uri, data_root=data_root, field_name=what)
    if not local.exists():
        raise UserError(f"{what}: {base.uri!r} not found at {local}")
    found = _step_dir(local, what)
    uri = base.uri if found.path == local else f"{base.uri.rstrip('/')}/{found.path.name}"
    return uri, found.path, found.step, None


def resolve(
    ft: FineTuning,
    *,
    size: str,
    sequence_length: int | None,
    checkpoint_dir: str | None,
    data_root: str | None = None,
) -> FineTune:
    """Find, pin and verify the base checkpoint; check that the spec's model fits it."""
    from tandem.workloads.train.config import resolve_data_uri

    pinned = _pinned(checkpoint_dir)
    if pinned is not None:
        uri, step, job = str(pinned["uri"]), int(pinned["step"]), pinned.get("trainingJob")
        path = resolve_data_uri(uri, data_root=data_root, field_name=f"{FIELD}.base")
        if not (path / ckpt.MARKER_FILE).is_file():
            raise UserError(
                f"{FIELD}.base: this job's checkpoints were trained on the base {uri}, which is gone "
                f"(pruned by the base job's spec.checkpoint.keep?): restore it, or start a new job"
            )
        log.info("fine-tuning resumes on its pinned base %s (step %d)", uri, step)
    else:
        uri, path, step, job = _locate(ft, checkpoint_dir, data_root)
    try:
        meta = ckpt.verify(ckpt.CheckpointRef(step, path))
    except ckpt.CorruptCheckpoint as exc:
        raise UserError(f"{FIELD}.base: the base checkpoint is damaged: {exc}") from None
    model = meta.get("model")
    if not isinstance(model, dict) or model.get("family") != "gpt" or "config" not in model:
        raise UserError(
            f"{FIELD}.base: {uri} is not a built-in GPT checkpoint (a TrainingJob with "
            "spec.trainer.builtin wrote none of its kind)"
        )
    if model.get("size") not in (None, size):
        raise UserError(
            f"spec.trainer.builtin.size: the base checkpoint {uri} is a {model['size']!r} GPT, "
            f"not {size!r}: set size: {model['size']}"
        )
    block = int(model["config"]["block_size"])
    if sequence_length is not None and sequence_length > block:
        raise UserError(
            f"spec.trainer.builtin.sequenceLength ({sequence_length}) is longer than the base "
            f"checkpoint's context ({block} tokens): use at most {block} or leave it unset"
        )
    lora = None if ft.lora is None else ft.lora.to_dict()
    return FineTune(
        base_uri=uri,
        base_path=str(path),
        base_step=step,
        base_job=job,
        model_config=dict(model["config"]),
        lora=lora,
    )


def check_data(fine: FineTune, cfg: TrainConfig, tokenizer_path: Path | None) -> None:
    """The data speaks the base's language: the same vocabulary and the same tokenizer."""
    from tandem.workloads.models.tokenizer import pad_vocab

    base_vocab = int(fine.model_config["vocab_size"])
    carried = Path(fine.base_path) / TOKENIZER_FILE
    name = "spec.trainer.builtin.dataset.tokenizer"
    if carried.is_file() and tokenizer_path is None:
        raise UserError(
            f"{name}: the base checkpoint {fine.base_uri} was trained on a tokenizer: set {name} to its "
            f"tokenizer.json (the base carries a copy: {fine.base_uri}/{TOKENIZER_FILE})"
        )
    if not carried.is_file() and tokenizer_path is not None:
        raise UserError(
            f"{name}: the base checkpoint {fine.base_uri} was trained on bytes (no tokenizer): "
            "remove the tokenizer"
        )
    if (
        carried.is_file()
        and tokenizer_path is not None
        and carried.read_bytes() != tokenizer_path.read_bytes()
    ):
        raise UserError(
            f"{name}: not the tokenizer the base checkpoint {fine.base_uri} was trained on: use its "
            f"{TOKENIZER_FILE}"
        )
    if cfg.vocab_size is not None and pad_vocab(cfg.vocab_size) != base_vocab:
        raise UserError(
            f"spec.trainer.builtin.dataset.vocabSize: the data's vocabulary ({cfg.vocab_size}, a table "
            f"of {pad_vocab(cfg.vocab_size)}) is not the base checkpoint's ({base_vocab}): use the "
            "base's tokenizer and vocabulary"
        )
