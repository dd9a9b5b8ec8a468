"""Checkpoints: atomic publish, keep-K, interrupted writes ignored, corruption skipped with a warning."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from tandem.workloads.train import checkpoint as ckpt


def publish(root: Path, step: int, value: float = 1.0) -> ckpt.CheckpointRef:
    with ckpt.staging(root, step) as st:
        st.save_torch("state.pt", {"w": torch.full((4,), value)})
        return st.publish({"job": "t"})


def test_publish_writes_layout_marker_and_metadata(tmp_path: Path) -> None:
    ref = publish(tmp_path, 7)
    assert ref.path == tmp_path / "step-00000007"
    assert ref.uri == f"file://{ref.path}"
    assert sorted(p.name for p in ref.path.iterdir()) == ["COMPLETE", "metadata.json", "state.pt"]
    meta = ckpt.verify(ref)
    assert meta["step"] == 7
    assert meta["format"] == 1
    assert meta["job"] == "t"
    assert meta["files"]["state.pt"]["bytes"] == (ref.path / "state.pt").stat().st_size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging")]


def test_failed_write_leaves_nothing_visible(tmp_path: Path) -> None:
    def write() -> None:
        with ckpt.staging(tmp_path, 3) as st:
            st.save_torch("state.pt", {"w": torch.ones(2)})
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write()
    assert list(tmp_path.iterdir()) == []
    assert ckpt.latest_complete(tmp_path) is None


def test_keep_k_prunes_oldest_and_republish_replaces(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        publish(tmp_path, step)
        ckpt.prune(tmp_path, 2)
    assert [r.step for r in ckpt.list_checkpoints(tmp_path)] == [3, 4]
    publish(tmp_path, 4, value=9.0)  # the step re-reached after a restart
    ref = ckpt.latest_complete(tmp_path)
    assert ref is not None
    assert ref.step == 4
    assert torch.load(ref.path / "state.pt")["w"][0].item() == 9.0


def test_checkpoint_without_marker_is_ignored(tmp_path: Path) -> None:
    publish(tmp_path, 10)
    torn = tmp_path / "step-00000020"
    shutil.copytree(tmp_path / "step-00000010", torn)
    (torn / "COMPLETE").unlink()  # the writer died before the marker
    (tmp_path / ".staging-step-00000030-abcd").mkdir()  # and one died mid-write
    ref = ckpt.latest_complete(tmp_path)
    assert ref is not None
    assert ref.step == 10
    ckpt.clean_staging(tmp_path)
    assert not (tmp_path / ".staging-step-00000030-abcd").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "metadata", "missing"])
def test_corrupted_checkpoint_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    publish(tmp_path, 10)
    bad = publish(tmp_path, 20)
    data = bad.path / "state.pt"
    if damage == "flip":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[:-10])
    elif damage == "metadata":
        (bad.path / "metadata.json").write_text("{not json")
    else:
        data.unlink()
    with caplog.at_level(logging.WARNING, logger="tandem.workloads.train.checkpoint"):
        ref = ckpt.latest_complete(tmp_path)
    assert ref is not None
    assert ref.step == 10
    assert "skipping corrupted checkpoint" in caplog.text
    assert "step-00000020" in caplog.text


def test_a_preferred_checkpoint_never_wins_over_a_newer_complete_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The hint (Ray's last record, the operator's last seen) can lag behind storage: the newest wins."""
    old = publish(tmp_path, 10)
    publish(tmp_path, 20)
    ref = ckpt.latest_complete(tmp_path, prefer=old.uri)
    assert ref is not None
    assert ref.step == 20
    elsewhere = publish(tmp_path / "other-root", 30)  # a complete checkpoint newer than all of root's
    ref = ckpt.latest_complete(tmp_path, prefer=elsewhere.uri)
    assert ref is not None
    assert ref.path == elsewhere.path
    with caplog.at_level(logging.WARNING):
        ref = ckpt.latest_complete(tmp_path, prefer=f"file://{tmp_path}/step-00000099")
    assert ref is not None
    assert ref.step == 20
    assert "not a complete checkpoint" in caplog.text


def test_marker_content_and_uri_helpers(tmp_path: Path) -> None:
    ref = publish(tmp_path, 5)
    assert json.loads((ref.path / "COMPLETE").read_text())["step"] == 5
    assert ckpt.uri_to_path(ref.uri) == ref.path
    with pytest.raises(ValueError, match="only file://"):
        ckpt.uri_to_path("s3://bucket/x")
