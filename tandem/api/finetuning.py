"""Fine-tuning the built-in GPT: start from pretrained weights, train them all or a LoRA adapter.

`spec.trainer.builtin.fineTuning` of a TrainingJob. The base is a checkpoint of another TrainingJob or
a checkpoint at a URI; with `lora` only low-rank adapters of the chosen linear layers train, and each
checkpoint holds the adapter plus a reference to the base (a few hundred kilobytes instead of the
model). An InferenceService serving such a checkpoint loads the base, merges the adapter and records
both in its lineage.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar

from pydantic import Field

from tandem.api.common import Rule, SpecModel
from tandem.api.inferenceservice import TrainingJobRef

#: A base checkpoint URI: a path in the pod (`file:///...`, e.g. a shared volume) or object storage.
BASE_URI_PATTERN = r"^(file:///.+|s3://[^/]+/.+)$"


class BaseCheckpoint(SpecModel):
    """The pretrained weights to start from: exactly one of `trainingJobRef` or `uri`."""

    training_job_ref: TrainingJobRef | None = None
    """A checkpoint of a TrainingJob in this namespace that writes to the same checkpoint claim
    (`spec.checkpoint.storage.pvc`) as this job. `checkpoint: latest` is its newest complete checkpoint
    when this job first starts; that step stays this job's base through every restart."""
    uri: str | None = Field(default=None, max_length=2048, pattern=BASE_URI_PATTERN)
    """A built-in GPT checkpoint (`.../step-NNNNNNNN`, or a checkpoint root: its newest complete one):
    `file:///PATH` inside the pods (the training and the serving pods alike) or `s3://BUCKET/KEY`
    (downloaded with the pods' AWS credentials)."""

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            rule="has(self.trainingJobRef) != has(self.uri)",
            message="spec.trainer.builtin.fineTuning.base: set exactly one of trainingJobRef (a "
            "TrainingJob's checkpoint) or uri (a checkpoint at file:///PATH or s3://BUCKET/KEY)",
            check=lambda b: (b.training_job_ref is None) != (b.uri is None),
        ),
    )


class LoraTarget(StrEnum):
    """A linear layer of every transformer block of the built-in GPT."""

    ATTENTION_QKV = "attn.c_attn"
    """The attention's query/key/value projection."""
    ATTENTION_OUT = "attn.c_proj"
    """The attention's output projection."""
    MLP_IN = "mlp.c_fc"
    """The feed-forward block's widening layer."""
    MLP_OUT = "mlp.c_proj"
    """The feed-forward block's narrowing layer."""


class LoRA(SpecModel):
    """Low-rank adaptation (Hu et al., 2021): W x + (alpha / rank) B A x, with W frozen."""

    rank: int = Field(default=8, ge=1, le=1024)
    """Rank of the update B A (its parameters: rank x (in + out) per layer)."""
    alpha: float = Field(default=16.0, gt=0, le=65536)
    """Scale of the update, applied as alpha / rank (so the learning rate need not change with rank)."""
    target_modules: list[LoraTarget] = Field(
        # a default (not a factory): the CRD carries it, so the API server defaults the field too
        default=[LoraTarget.ATTENTION_QKV, LoraTarget.ATTENTION_OUT],
        min_length=1,
        max_length=4,
    )
    """Which linear layers of every block get an adapter: `attn.c_attn`, `attn.c_proj`, `mlp.c_fc`,
    `mlp.c_proj`."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on the adapter's input while training (none at evaluation or serving)."""

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            rule="!has(self.targetModules) || "
            "self.targetModules.all(m, self.targetModules.exists_one(n, n == m))",
            message="spec.trainer.builtin.fineTuning.lora.targetModules: each module at most once",
            check=lambda lora: len(set(lora.target_modules)) == len(lora.target_modules),
            field_path=".targetModules",
        ),
    )

    @property
    def scale(self) -> float:
        """The factor on B A: alpha / rank."""
        return self.alpha / self.rank


class FineTuning(SpecModel):
    """Start from pretrained weights instead of a random initialisation."""

    base: BaseCheckpoint
    """The weights to start from. Their shape is the model's: `size` must name the base's size, a
    `sequenceLength` must not exceed the base's, and the data must use the base's tokenizer."""
    lora: LoRA | None = None
    """Train low-rank adapters only; checkpoints hold the adapter and a reference to the base. Unset:
    full fine-tuning (every weight trains; checkpoints hold the whole model)."""
