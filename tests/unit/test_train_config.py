"""Bad TrainingJob configs fail before anything starts, with a message naming the field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from tandem.errors import UserError
from tandem.workloads.train.config import TrainConfig, from_spec

SPEC: dict[str, Any] = {
    "trainer": {"builtin": {"size": "tiny", "dataset": {"uri": "tandem://corpus"}, "maxSteps": 50}},
    "workers": {"replicas": 2, "resources": {"cpu": "2"}},
    "precision": "fp32",
    "batch": {"perDevice": 4, "global": 16},
    "checkpoint": {"storage": {"pvc": "ckpt"}, "everySteps": 10, "keep": 2},
}


def spec(**builtin: Any) -> dict[str, Any]:
    s = copy.deepcopy(SPEC)
    s["trainer"]["builtin"].update(builtin)
    return s


def test_a_good_spec_gives_the_run_config(tmp_path: Path) -> None:
    cfg = from_spec(SPEC, job_name="j", checkpoint_dir=str(tmp_path), attempt=3)
    assert cfg.accumulation_steps == 2
    assert cfg.global_batch == 16
    assert cfg.num_workers == 2
    assert cfg.seq_len == 128
    assert cfg.cpus_per_worker == 2.0
    assert cfg.attempt == 3
    assert (cfg.checkpoint_every_steps, cfg.checkpoint_keep) == (10, 2)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda s: s["trainer"]["builtin"].update(size="huge"), "spec.trainer.builtin.size"),
        (lambda s: s["batch"].update({"global": 12}), "spec.batch.global"),
        (
            lambda s: s["trainer"]["builtin"]["dataset"].update(uri="file:///nonexistent/data.txt"),
            "spec.trainer.builtin.dataset.uri",
        ),
        (
            lambda s: s["trainer"]["builtin"]["dataset"].update(uri="gs://bucket/key"),
            "spec.trainer.builtin.dataset.uri",
        ),
        (
            lambda s: s["trainer"]["builtin"]["dataset"].update(uri="tandem://nope"),
            "spec.trainer.builtin.dataset.uri",
        ),
        (lambda s: s["trainer"]["builtin"].pop("dataset"), "spec.trainer.builtin.dataset"),
        (lambda s: s.update(precision="fp8"), "spec.precision"),
    ],
)
def test_bad_config_names_the_field(change: Any, field: str, tmp_path: Path) -> None:
    s = copy.deepcopy(SPEC)
    change(s)
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        from_spec(s, job_name="j", checkpoint_dir=str(tmp_path))


def test_missing_checkpoint_location_names_the_field() -> None:
    with pytest.raises(UserError, match=r"spec\.checkpoint\.storage"):
        from_spec(SPEC, job_name="j")


def test_object_storage_checkpoints_are_refused_before_anything_starts() -> None:
    s = copy.deepcopy(SPEC)
    s["checkpoint"]["storage"] = {"uri": "s3://bucket/ckpt"}
    with pytest.raises(UserError, match=r"spec\.checkpoint\.storage\.uri: .*use a pvc"):
        from_spec(s, job_name="j", checkpoint_dir="s3://bucket/ckpt")
    # A checkpoint location that is not a file system path (whatever the spec says) is refused too.
    with pytest.raises(UserError, match=r"spec\.checkpoint\.storage\.uri: .*'s3://b/c'.*use a pvc"):
        from_spec(SPEC, job_name="j", checkpoint_dir="s3://b/c")


def test_dataset_shorter_than_a_sequence_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_text("too short")
    s = spec(dataset={"uri": f"file://{tmp_path}/short.txt"})
    with pytest.raises(UserError, match=r"spec\.trainer\.builtin\.dataset\.uri: .* fewer than one"):
        from_spec(s, job_name="j", checkpoint_dir=str(tmp_path))


def test_pvc_datasets_resolve_under_the_data_root(tmp_path: Path) -> None:
    (tmp_path / "claim" / "dir").mkdir(parents=True)
    (tmp_path / "claim" / "dir" / "a.txt").write_text("x" * 500)
    s = spec(dataset={"uri": "pvc://claim/dir"})
    cfg = from_spec(s, job_name="j", checkpoint_dir=str(tmp_path), data_root=str(tmp_path))
    assert cfg.dataset_uri == str(tmp_path / "claim" / "dir")
    with pytest.raises(UserError, match="--data-root"):
        from_spec(
            spec(dataset={"uri": "pvc://other/x"}),
            job_name="j",
            checkpoint_dir=str(tmp_path),
            data_root=str(tmp_path),
        )


def test_entrypoint_spec_and_unimportable_entrypoint(tmp_path: Path) -> None:
    from tandem.workloads.train.session import resolve_entrypoint

    s = copy.deepcopy(SPEC)
    s["trainer"] = {"entrypoint": "no_such_pkg.mod:fn", "config": {"steps": 3}}
    cfg = from_spec(s, job_name="j", checkpoint_dir=str(tmp_path))
    assert cfg.entrypoint == "no_such_pkg.mod:fn"
    assert cfg.user_config == {"steps": 3}
    with pytest.raises(
        UserError, match=r"spec\.trainer\.entrypoint: cannot import module 'no_such_pkg\.mod'"
    ):
        resolve_entrypoint(cfg.entrypoint)
    with pytest.raises(UserError, match=r"spec\.trainer\.entrypoint: module 'json' has no function"):
        resolve_entrypoint("json:nope")
