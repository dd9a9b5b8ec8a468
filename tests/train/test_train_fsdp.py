"""`spec.trainer.strategy: fsdp` on 2 CPU ranks (gloo): it trains like DDP, and its checkpoints are DDP's.

The ranks are plain `torch.distributed` processes running the built-in loop (`run_builtin`), as Ray
Train's workers do, so each case takes seconds; the Ray path, a kill and a rerun, is in
test_train_fsdp_resume.py.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from tiny_train import tiny_gpt

from tandem.api.common import Precision
from tandem.api.finetuning import FineTuning
from tandem.workloads.models.gpt import load_for_inference
from tandem.workloads.train import checkpoint as ckpt
from tandem.workloads.train.config import TrainConfig
from tandem.workloads.train.finetune import resolve
from tandem.workloads.train.loop import DistInfo, run_builtin

WORLD = 2
#: fp32 losses of the same steps, DDP against FSDP: the gradients are summed in another order
#: (all-reduce against reduce-scatter, clipping norms from shards), so they agree to rounding, not bits.
LOSS_RTOL = 1e-5


def config(root: Path, strategy: str, **kw: Any) -> TrainConfig:
    """2 ranks x 2 micro-batches of 4 (so accumulation runs without gradient sync), clipping at 1."""
    settings: dict[str, Any] = {
        "job_name": "fsdp",
        "max_steps": 8,
        "global_batch": 16,
        "num_workers": WORLD,
        "seed": 5,
        "sync_every": 2,
        "strategy": strategy,
        "precision": Precision.FP32,
    }
    return tiny_gpt(root, **(settings | kw))


def _rank(rank: int, cfg: dict[str, Any], store: str, out: str) -> None:
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        result = run_builtin(TrainConfig.from_dict(cfg), DistInfo(rank, WORLD, rank))
    finally:
        tdist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps({"history": result.history, "start": result.start_step}))


def train(cfg: TrainConfig, scratch: Path) -> dict[str, Any]:
    """Run `cfg` on 2 ranks; rank 0's loss history and start step (every rank is joined, or killed when
    one fails)."""
    scratch.mkdir(parents=True, exist_ok=True)
    store, out = scratch / f"store-{len(list(scratch.iterdir()))}", scratch / "result.json"
    mp.spawn(  # type: ignore[attr-defined,no-untyped-call]
        _rank, args=(cfg.to_dict(), str(store), str(out)), nprocs=WORLD, join=True
    )
    result: dict[str, Any] = json.loads(out.read_text())
    out.unlink()
    return result


def state(path: Path, name: str = ckpt.MODEL_FILE) -> Any:
    return torch.load(path / name, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One DDP and one FSDP run of the same job, 8 steps, checkpoints at 4 and 8."""
    root = tmp_path_factory.mktemp("runs")
    found: dict[str, Any] = {"root": root}
    for strategy in ("ddp", "fsdp"):
        found[strategy] = train(config(root / strategy, strategy), root / "scratch")
    return found


def test_fsdp_losses_equal_ddp_losses(runs: dict[str, Any]) -> None:
    ddp, fsdp = runs["ddp"]["history"], runs["fsdp"]["history"]
    assert len(ddp) == len(fsdp) == 8
    assert fsdp[-1] < fsdp[0] - 0.5, "the FSDP run did not learn"
    assert fsdp == pytest.approx(ddp, rel=LOSS_RTOL)
    a, b = state(runs["root"] / "ddp" / "step-00000008"), state(runs["root"] / "fsdp" / "step-00000008")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)


def test_an_fsdp_checkpoint_has_the_ddp_format_and_serves(runs: dict[str, Any]) -> None:
    ddp, fsdp = runs["root"] / "ddp" / "step-00000008", runs["root"] / "fsdp" / "step-00000008"
    meta = ckpt.verify(ckpt.CheckpointRef(8, fsdp))
    assert (meta["strategy"], meta["worldSize"]) == ("fsdp", WORLD)
    assert sorted(p.name for p in fsdp.iterdir()) == sorted(p.name for p in ddp.iterdir())
    a, b = state(ddp), state(fsdp)
    assert list(a) == list(b)  # unsharded tensors under the plain model's names: no wrapper prefix
    assert all((a[k].shape, a[k].dtype) == (b[k].shape, b[k].dtype) for k in a)
    assert all(not isinstance(t, torch.distributed.tensor.DTensor) for t in b.values())
    oa, ob = state(ddp, ckpt.OPTIMIZER_FILE), state(fsdp, ckpt.OPTIMIZER_FILE)
    assert oa["param_groups"] == ob["param_groups"]  # parameters by index, the same groups
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        assert {n: t.shape for n, t in oa["state"][i].items()} == {
            n: t.shape for n, t in ob["state"][i].items()
        }
    # The model server's loader reads it as it reads a DDP checkpoint, to the same predictions.
    model, _, _ = load_for_inference(fsdp)
    reference, _, _ = load_for_inference(ddp)
    tokens = torch.arange(32).remainder(200).unsqueeze(0)
    with torch.no_grad():
        got, want = model(tokens)[0], reference(tokens)[0]
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(("before", "after"), [("ddp", "fsdp"), ("fsdp", "ddp")])
def test_a_run_resumes_under_the_other_strategy(
    runs: dict[str, Any], tmp_path: Path, before: str, after: str
) -> None:
    """Step 4's checkpoint of one run, resumed under the other strategy, continues that run: the
    losses of steps 5-8 are the uninterrupted run's (to the DDP/FSDP rounding)."""
    root = tmp_path / "resumed"
    shutil.copytree(runs["root"] / before / "step-00000004", root / "step-00000004")
    resumed = train(config(root, after), tmp_path / "scratch")
    assert resumed["start"] == 4
    assert resumed["history"] == pytest.approx(runs[before]["history"][4:], rel=LOSS_RTOL)
    # The optimizer's settings come back as they were (types too), so its next checkpoint is the same.
    uninterrupted = state(runs["root"] / before / "step-00000008", ckpt.OPTIMIZER_FILE)
    assert state(root / "step-00000008", ckpt.OPTIMIZER_FILE)["param_groups"] == uninterrupted["param_groups"]


@pytest.mark.parametrize("precision", [Precision.BF16, Precision.FP16])
def test_mixed_precision_under_fsdp_learns_and_keeps_fp32_master_weights(
    tmp_path: Path, precision: Precision
) -> None:
    """bf16 through FSDP's MixedPrecisionPolicy, fp16 through autocast and the sharded gradient scaler
    (whose state is checkpointed like DDP's)."""
    cfg = config(tmp_path / "run", "fsdp", precision=precision, max_steps=4)
    history = train(cfg, tmp_path / "scratch")["history"]
    assert all(math.isfinite(x) for x in history)
    assert history[-1] < history[0] - 0.5
    last = tmp_path / "run" / "step-00000004"
    assert all(t.dtype == torch.float32 for t in state(last).values())
    scaler = torch.load(last / ckpt.TRAINER_STATE_FILE, weights_only=False)["scaler"]
    assert bool(scaler) == (precision == Precision.FP16)  # the scaler is only enabled for fp16


def test_a_full_fine_tune_under_fsdp_starts_from_an_fsdp_checkpoint(
    runs: dict[str, Any], tmp_path: Path
) -> None:
    """An FSDP checkpoint is a fine-tune's base like any other, and a full fine-tune shards too: its base
    weights are loaded before sharding and its checkpoints hold the whole model."""
    base = runs["root"] / "fsdp" / "step-00000008"
    tuning = FineTuning.model_validate({"base": {"uri": f"file://{base}"}})
    fine = resolve(tuning, size="tiny", sequence_length=32, checkpoint_dir=None)
    cfg = config(
        tmp_path / "tuned", "fsdp", fine_tuning=fine.to_dict(), max_steps=2, checkpoint_every_steps=2
    )
    history = train(cfg, tmp_path / "scratch")["history"]
    # It starts where the base ended (a loss near the base's last), not from random weights (about 5.8).
    assert history[0] < runs["fsdp"]["history"][-1] + 0.5 < runs["fsdp"]["history"][0]
    tuned = tmp_path / "tuned" / "step-00000002"
    assert ckpt.read_metadata(tuned)["fineTuning"]["method"] == "full"
    assert state(tuned).keys() == state(base).keys()
    load_for_inference(tuned)
