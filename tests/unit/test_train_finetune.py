"""Fine-tuning the built-in GPT on one process with real PyTorch: a base pretrained on the built-in corpus,
then a LoRA (or full) fine-tune on another kind of text through the spec (`from_spec`, as pods build it).

The user-visible promises: a LoRA fine-tune lowers the loss on held-out text it never trained on; its
checkpoints hold the adapter and a reference to the base, not the model; it resumes bit for bit; the
base stays pinned; a model loaded for serving computes what the fine-tuned model computes; and a spec
that does not fit its base fails naming the field.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from pretrained import train_tiny_base

from tandem.errors import UserError
from tandem.workloads.models.gpt import GPT, load_for_inference
from tandem.workloads.models.lora import ADAPTER_FILE
from tandem.workloads.train import checkpoint as ckpt
from tandem.workloads.train.config import TrainConfig, from_spec
from tandem.workloads.train.loop import DistInfo, GPTRun, NullHooks, StepMetrics, run_builtin

SEQ = 32


def arithmetic_text(path: Path, lines: int = 3000) -> Path:
    """Text unlike the base's corpus: `7 plus 5 is 12.` sentences (structure a small adapter can learn)."""
    rng = random.Random(3)
    words = ("plus", "times", "minus")
    out = []
    for _ in range(lines):
        a, b, w = rng.randrange(10), rng.randrange(10), rng.choice(words)
        value = a + b if w == "plus" else a * b if w == "times" else a - b
        out.append(f"{a} {w} {b} is {value}.")
    path.write_text("\n".join(out) + "\n")
    return path


@pytest.fixture(scope="module")
def base_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoints of a TrainingJob `base` (a tiny GPT pretrained on the built-in corpus), beside which
    fine-tune jobs keep theirs (as on one checkpoint claim: /checkpoints/NAMESPACE/JOB)."""
    root = tmp_path_factory.mktemp("claim") / "base"
    train_tiny_base(root, seq_len=SEQ, checkpoint_every_steps=20)
    assert [r.step for r in ckpt.list_checkpoints(root)] == [20, 30]
    return root


def spec(data: Path, fine_tuning: dict[str, Any], **builtin: Any) -> dict[str, Any]:
    return {
        "trainer": {
            "builtin": {
                "dataset": {"uri": f"file://{data}", "validation": {"fraction": 0.1}},
                "maxSteps": 12,
                "learningRate": 1e-2,
                "sequenceLength": SEQ,
                "optimizer": {"warmupSteps": 2},
                "evaluation": {"intervalSteps": 6, "batches": 4},
                "fineTuning": fine_tuning,
                **builtin,
            }
        },
        "batch": {"perDevice": 8},
        "checkpoint": {"storage": {"pvc": "claim"}, "everySteps": 4, "keep": 5},
        "precision": "fp32",
        "seed": 5,
    }


LORA = {"base": {"trainingJobRef": {"name": "base"}}, "lora": {"rank": 4, "alpha": 8, "dropout": 0.05}}


def fine_tune_config(base_root: Path, tmp_path: Path, job: str, tuning: dict[str, Any] = LORA) -> TrainConfig:
    data = arithmetic_text(tmp_path / "arithmetic.txt")
    return from_spec(spec(data, tuning), job_name=job, checkpoint_dir=str(base_root.parent / job))


def test_lora_lowers_the_held_out_loss_and_checkpoints_only_the_adapter(
    base_root: Path, tmp_path: Path
) -> None:
    cfg = fine_tune_config(base_root, tmp_path, "lora-a")
    before = GPTRun(cfg, DistInfo()).evaluate()  # B starts at zero: the base's own held-out loss
    base_model, _, _ = load_for_inference(base_root / "step-00000030")
    trainable = sum(p.numel() for p in GPTRun(cfg, DistInfo()).raw_model.parameters() if p.requires_grad)
    assert 0 < trainable < base_model.num_parameters() / 10

    result = run_builtin(cfg, DistInfo())
    assert result.status == "completed"
    assert result.step == 12
    assert [s for s, _ in result.evals] == [6, 12]
    assert result.evals[-1][1] < before - 0.3, (before, result.evals)

    step = base_root.parent / "lora-a" / "step-00000012"
    assert not (step / ckpt.MODEL_FILE).exists()
    adapter = torch.load(step / ADAPTER_FILE, weights_only=True)
    assert adapter
    assert all(k.endswith(("lora_a", "lora_b")) for k in adapter)
    assert sum(t.numel() for t in adapter.values()) == trainable
    assert (step / ADAPTER_FILE).stat().st_size < (
        base_root / "step-00000030" / ckpt.MODEL_FILE
    ).stat().st_size / 5
    tuning = ckpt.read_metadata(step)["fineTuning"]
    assert tuning["method"] == "lora"
    assert tuning["base"] == {
        "uri": ckpt.path_to_uri(base_root / "step-00000030"),
        "step": 30,
        "trainingJob": "base",
    }
    assert tuning["lora"] == {
        "rank": 4,
        "alpha": 8.0,
        "targetModules": ["attn.c_attn", "attn.c_proj"],
        "dropout": 0.05,
    }


def test_the_merged_model_for_serving_computes_what_the_fine_tuned_model_computes(
    base_root: Path, tmp_path: Path
) -> None:
    cfg = fine_tune_config(base_root, tmp_path, "lora-b")
    run_builtin(cfg, DistInfo())
    trained = GPTRun(cfg, DistInfo())
    trained.load(ckpt.CheckpointRef(12, base_root.parent / "lora-b" / "step-00000012"))
    trained.raw_model.eval()
    served, _, _config = load_for_inference(base_root.parent / "lora-b")  # the root: its newest
    base, _, _ = load_for_inference(base_root / "step-00000030")
    assert not any("lora" in name for name, _ in served.named_parameters())  # merged into the weights
    idx = torch.tensor([list(b"3 plus 4 is 7.\n5 times 2 is ")])
    with torch.no_grad():
        want, _ = trained.raw_model(idx, idx)
        got, _ = served(idx, idx)
        original, _ = base(idx, idx)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - original).abs().max() > 1e-2  # and that is not the base's output


class CrashAt(NullHooks):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, metrics: StepMetrics) -> None:
        if metrics.step == self.step:
            raise RuntimeError("killed")


def test_a_lora_fine_tune_resumes_bit_for_bit(base_root: Path, tmp_path: Path) -> None:
    full_cfg = fine_tune_config(base_root, tmp_path, "lora-full")
    full = run_builtin(full_cfg, DistInfo())
    part_cfg = fine_tune_config(base_root, tmp_path, "lora-part")
    with pytest.raises(RuntimeError, match="killed"):
        run_builtin(part_cfg, DistInfo(), CrashAt(10))
    resumed = run_builtin(fine_tune_config(base_root, tmp_path, "lora-part"), DistInfo())
    assert resumed.start_step == 8
    a = torch.load(base_root.parent / "lora-full" / "step-00000012" / ADAPTER_FILE, weights_only=True)
    b = torch.load(base_root.parent / "lora-part" / "step-00000012" / ADAPTER_FILE, weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.evals == full.evals[-1:]


def test_the_base_stays_pinned_when_the_base_job_checkpoints_again(base_root: Path, tmp_path: Path) -> None:
    cfg = fine_tune_config(base_root, tmp_path, "lora-pin")
    run_builtin(replace(cfg, max_steps=4), DistInfo())
    newer = base_root / "step-00000040"
    shutil.copytree(base_root / "step-00000030", newer)
    (newer / ckpt.METADATA_FILE).write_text(
        (newer / ckpt.METADATA_FILE).read_text().replace('"step": 30', '"step": 40')
    )
    try:
        again = fine_tune_config(base_root, tmp_path, "lora-pin")
        assert again.fine_tuning is not None
        assert again.fine_tuning["base_step"] == 30
        fresh = fine_tune_config(base_root, tmp_path, "lora-new")
        assert fresh.fine_tuning is not None
        assert fresh.fine_tuning["base_step"] == 40
    finally:
        shutil.rmtree(newer)


def test_full_fine_tuning_starts_from_the_base_weights_and_trains_them_all(
    base_root: Path, tmp_path: Path
) -> None:
    tuning = {"base": {"uri": ckpt.path_to_uri(base_root)}}  # a checkpoint root: its newest
    cfg = fine_tune_config(base_root, tmp_path, "full-ft", tuning)
    run = GPTRun(cfg, DistInfo())
    base, _, _ = load_for_inference(base_root / "step-00000030")
    assert all(
        torch.equal(a, b)
        for a, b in zip(run.raw_model.state_dict().values(), base.state_dict().values(), strict=True)
    )
    assert all(p.requires_grad for p in run.raw_model.parameters())
    run_builtin(replace(cfg, max_steps=4, eval_interval=None), DistInfo())
    step = base_root.parent / "full-ft" / "step-00000004"
    assert (step / ckpt.MODEL_FILE).exists()
    assert not (step / ADAPTER_FILE).exists()
    assert (
        ckpt.read_metadata(step)["fineTuning"]["base"]["uri"]
        == ckpt.path_to_uri(base_root) + "/step-00000030"
    )
    served, _, _ = load_for_inference(step)
    assert isinstance(served, GPT)


@pytest.mark.parametrize(
    ("tuning", "builtin", "field", "checkpoint"),
    [
        (LORA, {"size": "small"}, "spec.trainer.builtin.size: the base checkpoint", True),
        (LORA, {"sequenceLength": 256}, "spec.trainer.builtin.sequenceLength (256)", True),
        (LORA, {}, "spec.trainer.builtin.fineTuning.base.trainingJobRef: a TrainingJob's", False),
        (
            {"base": {"trainingJobRef": {"name": "base", "checkpoint": 25}}},
            {},
            "spec.trainer.builtin.fineTuning.base.trainingJobRef.checkpoint: TrainingJob base has no",
            True,
        ),
        (
            {"base": {"trainingJobRef": {"name": "nobody"}}},
            {},
            "spec.trainer.builtin.fineTuning.base.trainingJobRef (nobody, latest): no complete checkpoint",
            True,
        ),
        (
            {"base": {"uri": "file:///nowhere/step-00000001"}},
            {},
            "spec.trainer.builtin.fineTuning.base.uri",
            True,
        ),
    ],
)
def test_a_spec_that_does_not_fit_its_base_fails_naming_the_field(
    base_root: Path,
    tmp_path: Path,
    tuning: dict[str, Any],
    builtin: dict[str, Any],
    field: str,
    checkpoint: bool,
) -> None:
    raw = spec(arithmetic_text(tmp_path / "a.txt"), tuning, **builtin)
    if not checkpoint:
        del raw["checkpoint"]
    with pytest.raises(UserError) as err:
        from_spec(raw, job_name="ft", checkpoint_dir=str(base_root.parent / "ft") if checkpoint else None)
    assert field in str(err.value)


def test_a_base_of_another_tokenizer_is_refused_naming_the_dataset_tokenizer(
    base_root: Path, tmp_path: Path
) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    data = arithmetic_text(tmp_path / "a.txt")
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train([str(data)], trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "<|endoftext|>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    raw = spec(data, LORA)
    raw["trainer"]["builtin"]["dataset"]["tokenizer"] = f"file://{tmp_path / 'tokenizer.json'}"
    with pytest.raises(
        UserError, match=r"spec\.trainer\.builtin\.dataset\.tokenizer: the base checkpoint .* bytes"
    ):
        from_spec(raw, job_name="ft", checkpoint_dir=str(base_root.parent / "ft"))


def test_a_local_run_finds_its_base_job_in_the_local_layout(base_root: Path, tmp_path: Path) -> None:
    """`tandem train --local` keeps a job's checkpoints in tandem-runs/JOB/checkpoints."""
    runs = tmp_path / "tandem-runs"
    shutil.copytree(base_root / "step-00000030", runs / "base" / "checkpoints" / "step-00000030")
    data = arithmetic_text(tmp_path / "a.txt")
    cfg = from_spec(spec(data, LORA), job_name="ft", checkpoint_dir=str(runs / "ft" / "checkpoints"))
    assert cfg.fine_tuning is not None
    assert cfg.fine_tuning["base_path"] == str(runs / "base" / "checkpoints" / "step-00000030")
